/**
 * Load generators: curl for the bulk download, wrk for requests per second and latency. Both
 * reach the server as `https://localhost:PORT` (SNI `localhost`, the proxy's route) on
 * 127.0.0.1. Each run also records the CPU the machine and the watched processes used during
 * it; runs of several rounds are summarized into one result per column.
 *
 * @module
 */
import { BIG_PATH, SMALL_BYTES, SMALL_PATH } from "./nginx.ts";
import { exitedChildrenCpuSeconds, machineCpuSeconds, processCpuSeconds, sh } from "./procs.ts";

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

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
}
