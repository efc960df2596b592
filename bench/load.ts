/**
 * Load generators: curl for the bulk download, wrk for requests per second and latency. Both
 * reach the server as `https://localhost:PORT` (SNI `localhost`, the proxy's route) on
 * 127.0.0.1. Each run also records the CPU the machine and the watched processes used during
 * it; runs of several rounds are summarized into one result per column.
 *
 * @module
 */
import { BIG_PATH, PACED_PATH, SMALL_BYTES, SMALL_PATH } from "./nginx.ts";
import {
  exitedChildrenCpuSeconds,
  machineCpuSeconds,
  processCpuSeconds,
  sh,
  sleep,
  spawn,
  tcpMemoryShare,
} from "./procs.ts";

/** CPU seconds (or a per-unit share of them) used during a measurement. */
export interface CpuUse {
  /** whole machine: user+nice+system+irq+softirq (kernel-spliced bytes only show here) */
  machine: number;
  /** the proxy process (0 for direct) */
  proxy: number;
  /** the nginx master and worker */
  nginx: number;
  /** the load generator (curl or wrk) */
  client: number;
}

/** The processes whose CPU a run records. */
export interface Watch {
  proxy: number[];
  nginx: number[];
}

/** Runs `fn` and returns its result with the CPU used meanwhile. */
async function withCpu<T>(watch: Watch, fn: () => Promise<T>): Promise<[T, CpuUse]> {
  const m0 = machineCpuSeconds();
  const p0 = processCpuSeconds(watch.proxy);
  const n0 = processCpuSeconds(watch.nginx);
  const c0 = exitedChildrenCpuSeconds();
  const result = await fn();
  return [result, {
    machine: machineCpuSeconds() - m0,
    proxy: processCpuSeconds(watch.proxy) - p0,
    nginx: processCpuSeconds(watch.nginx) - n0,
    client: exitedChildrenCpuSeconds() - c0,
  }];
}

function scaleCpu(c: CpuUse, factor: number): CpuUse {
  return {
    machine: c.machine * factor,
    proxy: c.proxy * factor,
    nginx: c.nginx * factor,
    client: c.client * factor,
  };
}

function sumCpu(cs: CpuUse[]): CpuUse {
  const sum = { machine: 0, proxy: 0, nginx: 0, client: 0 };
  for (const c of cs) {
    sum.machine += c.machine;
    sum.proxy += c.proxy;
    sum.nginx += c.nginx;
    sum.client += c.client;
  }
  return sum;
}

/** One bulk download. */
export interface BulkRun {
  /** MB/s (10^6 bytes) */
  mbs: number;
  bytes: number;
  /** CPU seconds during the download */
  cpu: CpuUse;
}

/** Downloads the big file once with curl; checks its size. */
export async function bulkRun(port: number, bigBytes: number, watch: Watch): Promise<BulkRun> {
  const [out, cpu] = await withCpu(watch, () =>
    sh("curl", [
      "-sSkf",
      "--max-time",
      "120",
      "-o",
      "/dev/null",
      "--resolve",
      `localhost:${port}:127.0.0.1`,
      "-w",
      "%{speed_download} %{size_download}",
      `https://localhost:${port}${BIG_PATH}`,
    ]));
  const [speed, size] = out.trim().split(" ").map(Number);
  if (size !== bigBytes) throw new Error(`bulk download got ${size} bytes, not ${bigBytes}`);
  return { mbs: speed / 1e6, bytes: size, cpu };
}

/** The bulk runs of one column, summarized. */
export interface BulkResult {
  /** median of the runs, MB/s */
  mbs: number;
  /** every run, MB/s, in order */
  runs: number[];
  /** CPU seconds per GiB over all runs */
  cpuPerGiB: CpuUse;
}

/** Median speed and CPU per GiB of several downloads. */
export function summarizeBulk(runs: BulkRun[]): BulkResult {
  const gib = runs.reduce((s, r) => s + r.bytes, 0) / 2 ** 30;
  return {
    mbs: median(runs.map((r) => r.mbs)),
    runs: runs.map((r) => r.mbs),
    cpuPerGiB: scaleCpu(sumCpu(runs.map((r) => r.cpu)), 1 / gib),
  };
}

/** wrk parameters shared by all runs. */
export interface WrkOptions {
  threads: number;
  connections: number;
  duration: string;
}

/** One wrk run. */
export interface WrkRun {
  rps: number;
  requests: number;
  p50ms: number;
  p99ms: number;
  /** wrk's "Socket errors" line, if any */
  socketErrors: string | null;
  /** CPU seconds during the run */
  cpu: CpuUse;
}

/**
 * Runs wrk against `/small`: keep-alive, or (`newConnection`) `Connection: close` so every
 * request is a new TCP connection and TLS handshake. Fails on error responses or responses
 * too small to be the real ones.
 */
export async function wrkRun(
  port: number,
  newConnection: boolean,
  opts: WrkOptions,
  watch: Watch,
): Promise<WrkRun> {
  const [out, cpu] = await withCpu(watch, () =>
    sh("wrk", [
      `-t${opts.threads}`,
      `-c${opts.connections}`,
      `-d${opts.duration}`,
      "--latency",
      ...(newConnection ? ["-H", "Connection: close"] : []),
      `https://localhost:${port}${SMALL_PATH}`,
    ]));
  const rps = Number(/Requests\/sec:\s+([0-9.]+)/.exec(out)?.[1]);
  const requests = Number(/(\d+) requests in/.exec(out)?.[1]);
  if (!(rps > 0) || !(requests > 0)) throw new Error(`wrk measured no requests:\n${out}`);
  const non2xx = /Non-2xx or 3xx responses: (\d+)/.exec(out)?.[1];
  if (non2xx) throw new Error(`wrk got ${non2xx} error responses:\n${out}`);
  // every response is a 1 KiB body plus a head: far fewer bytes than that means the
  // "requests" were not real responses
  const transfer = /Transfer\/sec:\s+([0-9.]+)(B|KB|MB|GB)/.exec(out);
  if (transfer) {
    const unit = { B: 1, KB: 1024, MB: 1024 ** 2, GB: 1024 ** 3 }[transfer[2]]!;
    if (Number(transfer[1]) * unit < rps * SMALL_BYTES * 0.9) {
      throw new Error(`wrk transferred less than ${SMALL_BYTES} bytes per request:\n${out}`);
    }
  }
  return {
    rps,
    requests,
    p50ms: latency(out, "50"),
    p99ms: latency(out, "99"),
    socketErrors: /Socket errors: (.*)/.exec(out)?.[1]?.trim() ?? null,
    cpu,
  };
}

/** The busy test's parameters. */
export interface BusyOptions {
  /** bulk transfers running meanwhile */
  bulkConns: number;
  /** the rate nginx sends each download at (nginx `limit_rate`, e.g. `1m`) */
  bulkRate: string;
  /** seconds of new connections, after the bulk transfers had a second to get going */
  seconds: number;
  /** new connections made at a time (each loop: connect, handshake, request, close) */
  concurrency: number;
}

/** One busy run: new connections made while bulk transfers ran. */
export interface BusyRun {
  /** connect-to-last-byte time of every new connection, ms (a failed one: until it failed) */
  latenciesMs: number[];
  /** connections that failed or timed out */
  errors: number;
  firstError: string;
  seconds: number;
  /** the bulk transfers together, MB/s (10^6 bytes) */
  bulkMBs: number;
  /** the machine's peak TCP memory meanwhile, share of the pressure threshold */
  tcpMemoryPeak: number;
}

/** Time the bulk transfers of the busy test get to connect and get going before the probe. */
const BUSY_RAMP_MS = 1000;
/** A probe connection taking longer than this counts as failed (at this latency). */
const PROBE_TIMEOUT_MS = 10_000;

/**
 * New-connection latency under load: `bulkConns` downloads of the big file run (one curl,
 * `--parallel`, a connection each; none finishes within the run), each sent by nginx at
 * `bulkRate` and read by curl as it comes (so that no hop's socket buffers fill up: a reader
 * slower than its sender would fill them on every hop until the machine's TCP memory limit
 * drops packets, and the test would measure that), while this process opens new connections, `concurrency` at a time, each timed from connect() to the end of the
 * response: TCP connect, TLS handshake (the ClientHello is what the proxy routes on), request,
 * response. wrk's latency would start after the handshake.
 */
export async function busyRun(port: number, caCert: string, opts: BusyOptions): Promise<BusyRun> {
  const seconds = BUSY_RAMP_MS / 1000 + opts.seconds + 1;
  const url = `https://localhost:${port}${PACED_PATH}?rate=${opts.bulkRate}`;
  const bulk = spawn("curl", {
    args: [
      "-sk",
      "--http1.1",
      "--parallel",
      "--parallel-immediate",
      "--parallel-max",
      String(opts.bulkConns),
      "--max-time",
      String(seconds),
      "--resolve",
      `localhost:${port}:127.0.0.1`,
      "-w",
      "%{size_download}\n",
      ...Array.from({ length: opts.bulkConns }, () => ["-o", "/dev/null", url]).flat(),
    ],
    stdout: "piped",
    stderr: "null",
  }).output();
  // the downloads fill socket buffers on every hop; near tcp_mem the kernel drops packets, and
  // a dropped SYN costs a new connection a 1 s retransmit
  let tcpMemoryPeak = tcpMemoryShare();
  const sampler = setInterval(() => tcpMemoryPeak = Math.max(tcpMemoryPeak, tcpMemoryShare()), 200);
  try {
    await sleep(BUSY_RAMP_MS);
    const probe = await newConnections(port, caCert, opts.seconds, opts.concurrency);
    const out = await bulk;
    // 28: the transfers ended at --max-time, as meant
    if (out.code !== 28 && out.code !== 0) throw new Error(`bulk curl failed (exit ${out.code})`);
    const bytes = new TextDecoder().decode(out.stdout).trim().split("\n").map(Number)
      .reduce((s, n) => s + n, 0);
    if (!(bytes > 0)) throw new Error("the bulk transfers moved no bytes");
    return { ...probe, seconds: opts.seconds, bulkMBs: bytes / 1e6 / seconds, tcpMemoryPeak };
  } finally {
    clearInterval(sampler);
    await bulk.catch(() => {});
  }
}

const REQUEST = new TextEncoder().encode(
  `GET ${SMALL_PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n`,
);

/** New connections for `seconds`, `concurrency` at a time: their latencies and failures. */
async function newConnections(
  port: number,
  caCert: string,
  seconds: number,
  concurrency: number,
): Promise<{ latenciesMs: number[]; errors: number; firstError: string }> {
  const end = performance.now() + seconds * 1000;
  const latenciesMs: number[] = [];
  let errors = 0;
  let firstError = "";
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (performance.now() < end) {
      const t0 = performance.now();
      try {
        await oneRequest(port, caCert);
      } catch (e) {
        errors++;
        firstError ||= String(e);
      }
      latenciesMs.push(performance.now() - t0);
    }
  }));
  return { latenciesMs, errors, firstError };
}

/** One request on a new TLS connection, read to the end; throws if it fails or times out. */
async function oneRequest(port: number, caCert: string): Promise<void> {
  let conn: Deno.Conn | null = null;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      conn?.close();
    } catch { /* closed */ }
  }, PROBE_TIMEOUT_MS);
  let got = 0;
  try {
    const raw = await Deno.connect({ hostname: "127.0.0.1", port });
    conn = raw;
    // like wrk and curl: without it, the request waits for the ACK of the handshake's last
    // flight (Nagle), which the server delays by 40 ms
    raw.setNoDelay(true);
    const tls = await Deno.startTls(raw, { hostname: "localhost", caCerts: [caCert] });
    conn = tls;
    await tls.write(REQUEST);
    const buf = new Uint8Array(16 * 1024);
    try {
      for (let n; (n = await tls.read(buf)) !== null;) got += n;
    } catch (e) {
      // nginx may close without close_notify after a full response
      if (got < SMALL_BYTES) throw e;
    }
  } catch (e) {
    throw timedOut ? new Error(`no response within ${PROBE_TIMEOUT_MS} ms`) : e;
  } finally {
    clearTimeout(timer);
    try {
      conn?.close();
    } catch { /* closed */ }
  }
  if (got < SMALL_BYTES) throw new Error(`short response: ${got} bytes`);
}

/**
 * The busy runs of one column, summarized: medians over the runs of each run's percentiles (not
 * percentiles over all runs' connections: the probe waits for each connection, so a run where
 * connections take seconds has a few of them, and pooled they would vanish among a fast run's
 * thousands).
 */
export interface BusyResult {
  p50ms: number;
  p99ms: number;
  /** new connections per second (closed loop: as fast as the latency allows) */
  rps: number;
  bulkMBs: number;
  /** the highest of the runs */
  tcpMemoryPeak: number;
  connections: number;
  errors: number;
  firstError: string;
  /** every run's p99, ms, in order */
  p99Runs: number[];
  /** every run's new connections, in order */
  connectionRuns: number[];
}

export function summarizeBusy(runs: BusyRun[]): BusyResult {
  const p99Runs = runs.map((r) => percentile(r.latenciesMs, 99));
  return {
    p50ms: median(runs.map((r) => percentile(r.latenciesMs, 50))),
    p99ms: median(p99Runs),
    rps: median(runs.map((r) => r.latenciesMs.length / r.seconds)),
    bulkMBs: median(runs.map((r) => r.bulkMBs)),
    tcpMemoryPeak: Math.max(...runs.map((r) => r.tcpMemoryPeak)),
    connections: runs.reduce((s, r) => s + r.latenciesMs.length, 0),
    errors: runs.reduce((s, r) => s + r.errors, 0),
    firstError: runs.find((r) => r.firstError)?.firstError ?? "",
    p99Runs,
    connectionRuns: runs.map((r) => r.latenciesMs.length),
  };
}

/** The `pct` percentile (nearest rank) of `xs`; NaN if empty. */
export function percentile(xs: number[], pct: number): number {
  if (!xs.length) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((pct / 100) * s.length) - 1)];
}

/** The wrk runs of one column, summarized. */
export interface WrkResult {
  /** median of the runs */
  rps: number;
  /** every run, requests/s, in order */
  runs: number[];
  requests: number;
  /** medians of the runs' percentiles */
  p50ms: number;
  p99ms: number;
  /** the runs' "Socket errors" lines */
  socketErrors: string[];
  /** CPU microseconds per request over all runs */
  cpuUsPerRequest: CpuUse;
}

/** Medians and CPU per request of several wrk runs. */
export function summarizeWrk(runs: WrkRun[]): WrkResult {
  const requests = runs.reduce((s, r) => s + r.requests, 0);
  return {
    rps: median(runs.map((r) => r.rps)),
    runs: runs.map((r) => r.rps),
    requests,
    p50ms: median(runs.map((r) => r.p50ms)),
    p99ms: median(runs.map((r) => r.p99ms)),
    socketErrors: runs.flatMap((r) => r.socketErrors ? [r.socketErrors] : []),
    cpuUsPerRequest: scaleCpu(sumCpu(runs.map((r) => r.cpu)), 1e6 / requests),
  };
}

/** A percentile from wrk's --latency distribution, in ms. */
function latency(text: string, pct: string): number {
  const m = new RegExp(`^\\s*${pct}%\\s+([0-9.]+)(us|ms|s)`, "m").exec(text);
  if (!m) return NaN;
  const v = Number(m[1]);
  return m[2] === "us" ? v / 1000 : m[2] === "s" ? v * 1000 : v;
}

/** The median of `xs`. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}
