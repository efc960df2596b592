/**
 * New connections under unthrottled bulk (issue 18): while `transfers` duplex transfers of
 * 16–64 MiB each way run through the column as fast as it moves them (bench/duplex.ts, in
 * processes of their own), a probe opens a new connection every 50 ms, sends a real
 * ClientHello for `localhost` and times connect() to the first byte of the answer (nginx's
 * ServerHello). A probe without an answer after 5 s counts as starved.
 *
 * The duplex server runs once for the whole bench ({@link startDuplexServer}); each column routes
 * the transfers' name ({@link DUPLEX_NAME}) to it.
 *
 * @module
 */
import { clientHelloBytes } from "../tests/harness/hello.ts";
import type { DuplexTotals } from "./duplex.ts";
import { median, percentile } from "./load.ts";
import { sleep, spawn, stop, tcpMemoryShare } from "./procs.ts";

/** The SNI of the bulk transfers: every column routes it to the duplex server. */
export const DUPLEX_NAME = "bulk.localhost";
/** A probe every this many ms (open loop: one does not wait for the one before). */
const PROBE_EVERY_MS = 50;
/** A probe without a ServerHello this long is starved. */
export const PROBE_TIMEOUT_MS = 5000;
/** The longest wait for the machine's TCP memory to come back down after a run. */
const SETTLE_MS = 10_000;
/** Time the transfers get to connect and get going before the first probe. */
const RAMP_MS = 1500;

const DUPLEX = new URL("./duplex.ts", import.meta.url).pathname;

/** The starvation test's parameters. */
export interface StarveOptions {
  /** duplex transfers kept running */
  transfers: number;
  /** seconds of probes */
  seconds: number;
}

/** Where one column's probes and transfers go. */
export interface StarveTarget {
  /** where the probes connect (they ask for `localhost`, routed to nginx) */
  probePort: number;
  /** where the transfers connect (the proxy, or the duplex server for direct) */
  bulkPort: number;
}

/** One run: the probes' times and what the transfers moved meanwhile. */
export interface StarveRun {
  /** connect to first byte of every probe, ms; a starved or failed probe counts as the timeout */
  latenciesMs: number[];
  /** probes without a ServerHello within the timeout (none came, or the connection failed) */
  starved: number;
  firstError: string;
  /** the transfers' bytes, both ways together, MB/s (10^6 bytes) */
  transferMBs: number;
  /** transfers that failed before the end (connect refused, reset), and the first error */
  transferErrors: number;
  transferFirstError: string;
  /** the machine's peak TCP memory meanwhile, share of the pressure threshold */
  tcpMemoryPeak: number;
}

/** Starts the duplex server (the transfers' backend); resolves with its port and stop(). */
export async function startDuplexServer(): Promise<{ port: number; stop(): Promise<void> }> {
  const proc = spawn(Deno.execPath(), {
    args: ["run", "-A", "--unstable-net", DUPLEX, "server"],
    stdout: "piped",
    stderr: "inherit",
  });
  const reader = proc.stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) throw new Error("the duplex server exited before printing its port");
    text += value;
  }
  reader.releaseLock();
  proc.stdout.cancel().catch(() => {});
  return { port: JSON.parse(text.split("\n")[0]).port, stop: () => stop(proc, "SIGTERM") };
}

/** One starvation run against a column. */
export async function starveRun(target: StarveTarget, opts: StarveOptions): Promise<StarveRun> {
  const hello = await clientHelloBytes("localhost");
  const client = spawn(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--unstable-net",
      DUPLEX,
      "client",
      String(target.bulkPort),
      String(opts.transfers),
      DUPLEX_NAME,
    ],
    stdout: "piped",
    stderr: "inherit",
  });
  const output = client.output();
  const tcpMemoryBefore = tcpMemoryShare();
  let tcpMemoryPeak = tcpMemoryBefore;
  const sampler = setInterval(() => tcpMemoryPeak = Math.max(tcpMemoryPeak, tcpMemoryShare()), 200);
  const t0 = performance.now();
  try {
    await sleep(RAMP_MS);
    const probes = await probeEvery(target.probePort, hello, opts.seconds);
    client.kill("SIGTERM"); // it prints its totals and exits
    const out = await output;
    const seconds = (performance.now() - t0) / 1000;
    const totals = JSON.parse(new TextDecoder().decode(out.stdout).trim()) as DuplexTotals;
    if (!(totals.bytesUp + totals.bytesDown > 0)) {
      throw new Error(`the duplex transfers moved no bytes (${totals.firstError})`);
    }
    return {
      ...probes,
      transferMBs: (totals.bytesUp + totals.bytesDown) / 1e6 / seconds,
      transferErrors: totals.errors,
      transferFirstError: totals.firstError,
      tcpMemoryPeak,
    };
  } finally {
    clearInterval(sampler);
    await stop(client, "SIGKILL", 0).catch(() => {});
    await settle(tcpMemoryBefore);
  }
}

/**
 * Waits (up to {@link SETTLE_MS}) until the machine's TCP memory is back near where it was before
 * the run: the sockets of the stopped transfers are closing with full buffers, and the next
 * column's run should not start under their pressure.
 */
async function settle(before: number): Promise<void> {
  const end = performance.now() + SETTLE_MS;
  while (tcpMemoryShare() > before + 0.05 && performance.now() < end) await sleep(200);
}

/** Probes every {@link PROBE_EVERY_MS} for `seconds`; resolves when each has its answer. */
async function probeEvery(
  port: number,
  hello: Uint8Array,
  seconds: number,
): Promise<{ latenciesMs: number[]; starved: number; firstError: string }> {
  const start = performance.now();
  const probes: Promise<number>[] = [];
  let starved = 0;
  let firstError = "";
  for (let i = 0; i < (seconds * 1000) / PROBE_EVERY_MS; i++) {
    await sleep(Math.max(0, start + i * PROBE_EVERY_MS - performance.now()));
    probes.push(
      probe(port, hello).catch((e) => {
        starved++;
        firstError ||= e instanceof Error ? e.message : String(e);
        return PROBE_TIMEOUT_MS;
      }),
    );
  }
  return { latenciesMs: await Promise.all(probes), starved, firstError };
}

/** One probe: ms from connect() to the answer's first byte; throws without one in time. */
async function probe(port: number, hello: Uint8Array): Promise<number> {
  const t0 = performance.now();
  let conn: Deno.TcpConn | null = null;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      conn?.close();
    } catch { /* closed */ }
  }, PROBE_TIMEOUT_MS);
  try {
    conn = await Deno.connect({ hostname: "127.0.0.1", port });
    if (timedOut) throw new Error("timed out");
    for (let off = 0; off < hello.length;) off += await conn.write(hello.subarray(off));
    const n = await conn.read(new Uint8Array(1024));
    if (n === null) throw new Error("closed without an answer");
    return performance.now() - t0;
  } catch (e) {
    throw timedOut ? new Error(`no ServerHello within ${PROBE_TIMEOUT_MS} ms`) : e;
  } finally {
    clearTimeout(timer);
    try {
      conn?.close();
    } catch { /* closed */ }
  }
}

/** The starvation runs of one column: medians of each run's percentiles, starved probes summed. */
export interface StarveResult {
  p50ms: number;
  p99ms: number;
  probes: number;
  starved: number;
  firstError: string;
  transferMBs: number;
  transferErrors: number;
  transferFirstError: string;
  tcpMemoryPeak: number;
  /** every run's p99, ms, and starved probes, in order */
  p99Runs: number[];
  starvedRuns: number[];
}

export function summarizeStarve(runs: StarveRun[]): StarveResult {
  const p99Runs = runs.map((r) => percentile(r.latenciesMs, 99));
  return {
    p50ms: median(runs.map((r) => percentile(r.latenciesMs, 50))),
    p99ms: median(p99Runs),
    probes: runs.reduce((s, r) => s + r.latenciesMs.length, 0),
    starved: runs.reduce((s, r) => s + r.starved, 0),
    firstError: runs.find((r) => r.firstError)?.firstError ?? "",
    transferMBs: median(runs.map((r) => r.transferMBs)),
    transferErrors: runs.reduce((s, r) => s + r.transferErrors, 0),
    transferFirstError: runs.find((r) => r.transferFirstError)?.transferFirstError ?? "",
    tcpMemoryPeak: Math.max(...runs.map((r) => r.tcpMemoryPeak)),
    p99Runs,
    starvedRuns: runs.map((r) => r.starved),
  };
}
