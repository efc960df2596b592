/**
 * Memory per idle proxied connection: open N TLS connections through the proxy (a full
 * handshake with nginx behind it, so the proxy has routed, connected and relayed both ways),
 * leave them idle and compare the proxy's RSS before and after. A peer with several processes
 * (nginx: master and worker) counts with all of them.
 *
 * @module
 */
import { rssBreakdownKiB, rssKiB, sleep } from "./procs.ts";

/** Result of the idle test. */
export interface IdleResult {
  connections: number;
  /** RSS growth per connection, KiB, both samples {@link SETTLE_MS} after the last connection */
  kibPerConn: number;
  /** the same, with the connections sampled {@link EARLY_MS} after they were open */
  kibPerConnEarly: number;
  /** of which anonymous memory (heap, buffers), KiB per connection */
  anonKibPerConn: number;
  /** RSS before opening them and with all of them open, KiB */
  rssBeforeKiB: number;
  rssAfterKiB: number;
  /** seconds to open all connections */
  openSeconds: number;
  /** seconds from the client closing them until the proxy had closed its sockets too */
  closeSeconds: number;
}

/** Connections opened at a time. */
const BATCH = 100;
/**
 * When the main RSS samples are taken: this long after the last connection (of the warm-up, and
 * of the N). A proxy frees what opening connections left behind once quiet (sni-proxy after 3 s
 * without socket events): what idle connections cost is what stays.
 */
const SETTLE_MS = 6000;
/** The early sample: the proxy has finished its side (backend handshake bytes relayed). */
const EARLY_MS = 1500;

/** Opens `n` TLS connections to 127.0.0.1:`port` (SNI localhost); closes them via the result. */
async function openIdle(port: number, n: number, caCert: string): Promise<Deno.TlsConn[]> {
  const conns: Deno.TlsConn[] = [];
  let failed = 0;
  let firstError = "";
  try {
    for (let i = 0; i < n; i += BATCH) {
      const batch = await Promise.allSettled(
        Array.from({ length: Math.min(BATCH, n - i) }, async () => {
          const raw = await Deno.connect({ hostname: "127.0.0.1", port });
          const tls = await Deno.startTls(raw, { hostname: "localhost", caCerts: [caCert] });
          conns.push(tls);
          await tls.handshake();
        }),
      );
      for (const r of batch) {
        if (r.status === "rejected") {
          failed++;
          firstError ||= `${r.reason} (with ${conns.length} open)`;
        }
      }
      if (failed) break;
    }
  } catch (e) {
    closeAll(conns);
    throw e;
  }
  if (failed) {
    closeAll(conns);
    throw new Error(`idle connections failed: ${firstError}`);
  }
  return conns;
}

function closeAll(conns: Deno.TlsConn[]): void {
  for (const c of conns) {
    try {
      c.close();
    } catch { /* closed */ }
  }
}

/**
 * Measures the RSS growth per idle connection of the processes `pids` (added up) at `n`
 * connections. A warm-up of a few hundred connections first, so one-time costs (code compiled
 * on first use, first buffers) do not count as per-connection memory.
 */
export async function idleRss(
  port: number,
  pids: number[],
  n: number,
  caCert: string,
): Promise<IdleResult> {
  closeAll(await openIdle(port, Math.min(200, n), caCert));
  await sleep(SETTLE_MS);
  const fdsBefore = fdCount(pids);
  const before = sum(pids, rssKiB);
  const anonBefore = sum(pids, (p) => rssBreakdownKiB(p).anon);
  const t0 = performance.now();
  const conns = await openIdle(port, n, caCert);
  const openSeconds = (performance.now() - t0) / 1000;
  let after: number;
  let anonAfter: number;
  let early: number;
  try {
    // let the proxy finish its side (backend handshake bytes relayed, timers set)
    await sleep(EARLY_MS);
    early = sum(pids, rssKiB);
    await sleep(SETTLE_MS - EARLY_MS);
    after = sum(pids, rssKiB);
    anonAfter = sum(pids, (p) => rssBreakdownKiB(p).anon);
  } finally {
    closeAll(conns);
  }
  // wait for the proxy to close its 2n sockets, so that stopping it next is a clean drain
  const t1 = performance.now();
  while (fdCount(pids) > fdsBefore + 10) {
    if (performance.now() - t1 > CLOSE_WAIT_MS) {
      throw new Error(
        `the proxy still holds ${fdCount(pids) - fdsBefore} sockets ${CLOSE_WAIT_MS} ms after ` +
          `its ${n} idle clients closed`,
      );
    }
    await sleep(50);
  }
  return {
    connections: n,
    kibPerConn: (after - before) / n,
    kibPerConnEarly: (early - before) / n,
    anonKibPerConn: (anonAfter - anonBefore) / n,
    rssBeforeKiB: before,
    rssAfterKiB: after,
    openSeconds,
    closeSeconds: (performance.now() - t1) / 1000,
  };
}

/** How long the proxy may take to close its side of the idle connections. */
const CLOSE_WAIT_MS = 20_000;

/** Open file descriptors of the processes. */
function fdCount(pids: number[]): number {
  return sum(pids, (pid) => [...Deno.readDirSync(`/proc/${pid}/fd`)].length);
}

function sum(pids: number[], f: (pid: number) => number): number {
  return pids.reduce((s, pid) => s + f(pid), 0);
}
