/**
 * Memory after many short connections (issue 18: "back within 10 % of baseline 15 s after
 * 50,000 short connections"): on a fresh instance, RSS (all its processes added up) after a
 * warm-up, right after N new TLS connections with one request each (wrk, `Connection: close`,
 * stopped by its script once N responses came), and {@link SETTLE_MS} later.
 *
 * @module
 */
import { SMALL_PATH } from "./nginx.ts";
import { rssKiB, sh, sleep } from "./procs.ts";

/** How long after the connections the RSS must be back. */
export const SETTLE_MS = 15_000;
/** Connections of the warm-up, before the baseline (code compiled on first use, first buffers). */
const WARM_UP = 200;
/**
 * How long after the warm-up the baseline is taken: a proxy frees what the warm-up left behind
 * once quiet (sni-proxy after 3 s without socket events), so the baseline is what stays.
 */
const BASELINE_SETTLE_MS = 6000;
/** The longest a run of N connections may take. */
const MAX_SECONDS = 180;

/** RSS around N short connections, KiB. */
export interface ChurnResult {
  connections: number;
  baselineKiB: number;
  /** right after the last connection */
  peakKiB: number;
  /** {@link SETTLE_MS} after the last connection */
  settledKiB: number;
  /** seconds the N connections took */
  seconds: number;
}

/**
 * wrk's script: counts the responses with status 200 and ends the process at the count given after `--` (wrk
 * itself only stops at its duration).
 */
const STOP_AT_COUNT = `local done = 0
local limit = 0
function init(args) limit = tonumber(args[1]) end
function response(status, headers, body)
  if status == 200 then done = done + 1 end
  if done >= limit then io.write("reached\\n"); io.flush(); os.exit(0) end
end
`;

/** `n` new connections, 50 at a time, each one request; throws if they do not all succeed. */
async function connections(dir: string, port: number, n: number): Promise<void> {
  const script = `${dir}/stop_at_count.lua`;
  await Deno.writeTextFile(script, STOP_AT_COUNT);
  const out = await sh("wrk", [
    "-t1",
    `-c${Math.min(50, n)}`,
    `-d${MAX_SECONDS}s`,
    "-H",
    "Connection: close",
    "-s",
    script,
    `https://localhost:${port}${SMALL_PATH}`,
    "--",
    String(n),
  ]);
  if (!out.includes("reached")) {
    throw new Error(`wrk made fewer than ${n} connections in ${MAX_SECONDS} s:\n${out}`);
  }
}

/** The churn test on the processes `pids` of an instance listening on `port`. */
export async function churnRss(
  dir: string,
  port: number,
  pids: number[],
  n: number,
): Promise<ChurnResult> {
  const rss = () => pids.reduce((s, pid) => s + rssKiB(pid), 0);
  await connections(dir, port, WARM_UP);
  await sleep(BASELINE_SETTLE_MS);
  const baselineKiB = rss();
  const t0 = performance.now();
  await connections(dir, port, n);
  const seconds = (performance.now() - t0) / 1000;
  const peakKiB = rss();
  await sleep(SETTLE_MS);
  return { connections: n, baselineKiB, peakKiB, settledKiB: rss(), seconds };
}
