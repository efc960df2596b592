/**
 * The rows of the results table: what each row reads from a column's {@link ModeResult}, how it
 * is printed and which way is better; and the comparisons the table and the targets share
 * (the best peer of a row, "at least as good as", number and ratio formats).
 *
 * @module
 */
import type { CpuUse, WrkResult } from "./load.ts";
import type { IdleResult } from "./idle_conns.ts";
import type { ModeResult } from "./measure.ts";
import { FLOW_CONCURRENCY } from "./quic.ts";
import { type Settings, TARGETS } from "./settings.ts";
import { PROBE_TIMEOUT_MS } from "./starve.ts";

/** One row of the table. */
export interface Metric {
  label: string;
  get: (r: ModeResult, direct?: ModeResult) => number | undefined;
  digits: number;
  /** which way is better: picks the best peer and judges "kernel ≥ userspace" (none: neither) */
  better?: "higher" | "lower";
  /** false: no ratio columns (a difference of small numbers, whose ratio means nothing) */
  ratio?: boolean;
}

/** A row as written in {@link metrics}: label, value, digits, better side, ratio. */
type Row = [
  label: string,
  get: Metric["get"],
  digits: number,
  better?: Metric["better"] | null,
  ratio?: boolean,
];

/** Label start of the busy test's rows. */
function busyRow(s: Settings): string {
  return `busy (${s.busyConns} downloads):`;
}

/** Label of the busy test's p99 row (a target reads it). */
export function busyP99Label(s: Settings): string {
  return `${busyRow(s)} new-connection p99 ms, connect to last byte`;
}

/** Label start of the starvation test's rows. */
function starveRow(s: Settings): string {
  return `starve (${s.starve.transfers} duplex transfers):`;
}

/** Label of the starvation test's p99 row (a target reads it). */
export function starveP99Label(s: Settings): string {
  return `${starveRow(s)} new connection to ServerHello p99 ms`;
}

/** Label of the starvation test's row of probes without an answer (a target reads it). */
export function starvedLabel(s: Settings): string {
  return `${starveRow(s)} probes without ServerHello in ${PROBE_TIMEOUT_MS / 1000} s, all rounds`;
}

/** Label of the churn test's settled RSS row (a target reads it). */
export function churnSettledLabel(s: Settings): string {
  return `churn (${s.churnConns} short connections): RSS 15 s after, % of baseline`;
}

/** Label of the syscall row (a target reads it). */
export const SYSCALLS_LABEL = "new-connection: proxy syscalls per connection";

/** Label of the row of total idle RSS at the target's connection count, measured or linear. */
export function idleTotalLabel(s: Settings): string {
  return s.idleConns === TARGETS.idleTotalConns
    ? `total RSS MB with ${s.idleConns} idle connections`
    : `total RSS MB with ${TARGETS.idleTotalConns} idle (linear from ${s.idleConns})`;
}

/** Total RSS, MB (10^6 bytes), at `conns` idle connections: measured, or linear from it. */
function idleTotalMB(idle: IdleResult | undefined, conns: number): number | undefined {
  if (!idle) return undefined;
  return (idle.rssAfterKiB + idle.kibPerConn * (conns - idle.connections)) * 1024 / 1e6;
}

/** The rows of a wrk test: rate, p50, p99, machine and proxy CPU per request. */
function wrkRows(
  test: string,
  rate: string,
  per: string,
  pick: (r: ModeResult) => WrkResult | undefined,
): Row[] {
  return [
    [rate, (r) => pick(r)?.rps, 0, "higher"],
    [`${test} p50 ms`, (r) => pick(r)?.p50ms, 2, "lower"],
    [`${test} p99 ms`, (r) => pick(r)?.p99ms, 2, "lower"],
    [`${test}: machine CPU µs per ${per}`, (r) => pick(r)?.cpuUsPerRequest.machine, 1, "lower"],
    [
      `${test}: proxy CPU µs per ${per}`,
      (r) => proxyOnly(r, pick(r)?.cpuUsPerRequest.proxy),
      1,
      "lower",
    ],
  ];
}

/** The rows of the bulk download. */
function bulkRows(): Row[] {
  return [
    ["bulk download MB/s", (r) => r.bulk?.mbs, 0, "higher"],
    ["bulk: machine CPU s per GiB", (r) => r.bulk?.cpuPerGiB.machine, 2, "lower"],
    [
      "bulk: machine CPU s per GiB above direct",
      (r, d) =>
        d?.bulk && r !== d
          ? r.bulk && r.bulk.cpuPerGiB.machine - d.bulk.cpuPerGiB.machine
          : undefined,
      2,
      "lower",
    ],
    [
      "bulk: proxy process CPU s per GiB",
      (r) => proxyOnly(r, r.bulk?.cpuPerGiB.proxy),
      2,
      "lower",
    ],
  ];
}

/** The rows of the new-connection test under bulk load (none when it does not run). */
function busyRows(s: Settings): Row[] {
  if (s.busyConns <= 0) return [];
  const row = busyRow(s);
  return [
    [`${row} new-connection p50 ms, connect to last byte`, (r) => r.busy?.p50ms, 2, "lower"],
    [busyP99Label(s), (r) => r.busy?.p99ms, 2, "lower"],
    [
      `${row} new connections/s, ${s.busy.concurrency} at a time`,
      (r) => r.busy?.rps,
      0,
      "higher",
    ],
    [`${row} MB/s of the downloads together`, (r) => r.busy?.bulkMBs, 0, "higher"],
    [
      `${row} peak TCP memory of the machine, % of tcp_mem pressure`,
      (r) => r.busy && r.busy.tcpMemoryPeak * 100,
      0,
    ],
  ];
}

/** The rows of the starvation test (none when it does not run). */
function starveRows(s: Settings): Row[] {
  if (s.starve.transfers <= 0) return [];
  const row = starveRow(s);
  return [
    [`${row} new connection to ServerHello p50 ms`, (r) => r.starve?.p50ms, 1, "lower"],
    [starveP99Label(s), (r) => r.starve?.p99ms, 1, "lower"],
    [starvedLabel(s), (r) => r.starve?.starved, 0, "lower", false],
    [`${row} MB/s of the transfers, both ways`, (r) => r.starve?.transferMBs, 0, "higher"],
    [
      `${row} peak TCP memory of the machine, % of tcp_mem pressure`,
      (r) => r.starve && r.starve.tcpMemoryPeak * 100,
      0,
    ],
  ];
}

/** The rows of the churn test (none when it does not run). */
function churnRows(s: Settings): Row[] {
  if (s.churnConns <= 0) return [];
  const row = `churn (${s.churnConns} short connections):`;
  const mb = (kib: number | undefined) => kib === undefined ? undefined : kib * 1024 / 1e6;
  return [
    [`${row} RSS MB before`, (r) => mb(r.churn?.baselineKiB), 1, "lower"],
    [`${row} RSS MB right after`, (r) => mb(r.churn?.peakKiB), 1, "lower"],
    [`${row} RSS MB 15 s after`, (r) => mb(r.churn?.settledKiB), 1, "lower"],
    [
      churnSettledLabel(s),
      (r) => r.churn && (r.churn.settledKiB / r.churn.baselineKiB) * 100,
      0,
      "lower",
    ],
  ];
}

/** Label of the QUIC row of MB per second of forwarding CPU (a target reads it). */
export const QUIC_MB_PER_CPU_LABEL =
  "QUIC: MB per CPU second of forwarding (client+server+proxy+irq CPU above direct's)";
/** Label of the QUIC row of the proxy process's CPU per GiB (a target reads it). */
export const QUIC_PROXY_CPU_LABEL = "QUIC: proxy process CPU s per GiB";

/**
 * MB of the QUIC downloads per CPU second that forwarding added: the CPU of the client, the
 * server, the proxy and the machine's interrupts (where the kernel forwards) minus direct's for
 * the same bytes, at least one clock tick (0.01 s) over all downloads. Not the machine's CPU:
 * other programs on a shared machine would count.
 */
function quicMBPerCpu(r: ModeResult, d: ModeResult | undefined): number | undefined {
  const above = quicCpuAboveDirect(r, d);
  return above === undefined ? undefined : r.quic!.bulk.bytes / 1e6 / Math.max(above, 0.01);
}

/** The CPU seconds the QUIC downloads of column `r` took above direct's for the same bytes. */
export function quicCpuAboveDirect(r: ModeResult, d: ModeResult | undefined): number | undefined {
  const [q, dq] = [r.quic?.bulk, d?.quic?.bulk];
  if (!q || !dq || r === d) return undefined;
  return q.ownCpuS - dq.ownCpuS * (q.bytes / dq.bytes);
}

/** The rows of the QUIC test (none when it does not run). */
function quicRows(s: Settings): Row[] {
  const o = s.quic;
  if (o.flows <= 0) return [];
  const perDownload = (r: ModeResult, n: number | undefined) =>
    r.proxied && r.quic && n !== undefined ? n / o.downloads : undefined;
  return [
    [
      `QUIC handshake ms (median of ${o.handshakes}), client's Initial out to server's flight in (strace)`,
      (r) => r.quic?.handshakeMs,
      2,
      "lower",
    ],
    ["QUIC tiny download ms (median), client start to exit", (r) => r.quic?.tinyMs, 1, "lower"],
    [
      `QUIC download MB/s (${o.downloads} x ${o.fileBytes / 2 ** 20} MiB, gtlsclient)`,
      (r) => r.quic?.mbs,
      0,
      "higher",
    ],
    // no better side: other programs on a shared machine count here (the next row is ours)
    [
      "QUIC: machine CPU s per GiB",
      (r) => r.quic && r.quic.bulk.machineCpuS / (r.quic.bulk.bytes / 2 ** 30),
      2,
    ],
    [
      "QUIC: client+server+proxy+irq CPU s per GiB",
      (r) => r.quic && r.quic.bulk.ownCpuS / (r.quic.bulk.bytes / 2 ** 30),
      2,
      "lower",
    ],
    [QUIC_MB_PER_CPU_LABEL, quicMBPerCpu, 0, "higher"],
    [
      QUIC_PROXY_CPU_LABEL,
      (r) => proxyOnly(r, r.quic && r.quic.bulk.proxyCpuS / (r.quic.bulk.bytes / 2 ** 30)),
      3,
      "lower",
    ],
    [
      `QUIC: proxy CPU µs per new flow (${o.flows} tiny downloads, ${FLOW_CONCURRENCY} at a time)`,
      (r) => proxyOnly(r, r.quic && (r.quic.flows.proxyCpuS / r.quic.flows.count) * 1e6),
      0,
      "lower",
    ],
    [
      "QUIC: datagrams per download through the proxy process",
      (r) => perDownload(r, r.quic?.bulk.processDatagrams),
      0,
      null,
      false,
    ],
    [
      "QUIC: datagrams per download forwarded in the kernel",
      (r) => perDownload(r, r.quic?.bulk.kernelDatagrams),
      0,
      null,
      false,
    ],
  ];
}

/** The rows of the idle-connection test. */
function idleRows(s: Settings): Row[] {
  const conns = s.idleConns;
  if (conns <= 0) return [];
  const total = TARGETS.idleTotalConns;
  return [
    [`RSS KiB per idle connection (${conns})`, (r) => r.idle?.kibPerConn, 1, "lower"],
    ["idle: of which anonymous KiB per connection", (r) => r.idle?.anonKibPerConn, 1, "lower"],
    [
      "idle: RSS KiB per connection 1.5 s after opening",
      (r) => r.idle?.kibPerConnEarly,
      1,
      "lower",
    ],
    [
      `total RSS MB with ${conns} idle connections`,
      (r) => idleTotalMB(r.idle, conns),
      1,
      "lower",
    ],
    ...(conns !== total
      ? [[idleTotalLabel(s), (r) => idleTotalMB(r.idle, total), 1, "lower"]] satisfies Row[]
      : []),
    [`idle: seconds to open ${conns} TLS connections`, (r) => r.idle?.openSeconds, 1],
    ["idle: seconds until the proxy closed them all", (r) => r.idle?.closeSeconds, 1],
  ];
}

/** Every row of the table, in order. */
export function metrics(s: Settings): Metric[] {
  const rows: Row[] = s.quicOnly ? quicRows(s) : [
    ...bulkRows(),
    ...wrkRows("keep-alive", "keep-alive requests/s", "request", (r) => r.keepAlive),
    ["keep-alive: nginx CPU µs per request", (r) => r.keepAlive?.cpuUsPerRequest.nginx, 1],
    ["keep-alive: wrk CPU µs per request", (r) => r.keepAlive?.cpuUsPerRequest.client, 1],
    [
      "keep-alive: rest of machine µs per request",
      (r) => rest(r.keepAlive?.cpuUsPerRequest),
      1,
      null,
      false,
    ],
    ...wrkRows("new-connection", "new connections/s", "connection", (r) => r.newConnection),
    [SYSCALLS_LABEL, (r) => proxyOnly(r, r.syscalls?.perConnection), 1, "lower"],
    ...busyRows(s),
    ...starveRows(s),
    ...idleRows(s),
    ...churnRows(s),
    ...quicRows(s),
  ];
  return rows.map(([label, get, digits, better, ratio]) => ({
    label,
    get,
    digits,
    better: better ?? undefined,
    ratio,
  }));
}

/** Machine CPU not used by the proxy, nginx or the load generator: softirq work others were
 * charged for, and other programs on a shared machine. */
function rest(c: CpuUse | undefined): number | undefined {
  return c && c.machine - c.proxy - c.nginx - c.client;
}

/** A proxy-process figure, undefined for the direct column (no proxy there). */
function proxyOnly(r: ModeResult, v: number | undefined): number | undefined {
  return r.proxied ? v : undefined;
}

/** Whether `a` is at least as good as `b` for a row whose better side is `better`. */
export function atLeast(a: number, b: number, better: "higher" | "lower"): boolean {
  return better === "higher" ? a >= b : a <= b;
}

/** The best peer's value of a row (undefined: no peer measured it, or the row has no side). */
export function bestPeer(
  results: Map<string, ModeResult>,
  m: Metric,
): { name: string; value: number } | undefined {
  const direct = results.get("direct");
  let best: { name: string; value: number } | undefined;
  for (const [name, r] of results) {
    const v = r.peer ? m.get(r, direct) : undefined;
    if (v === undefined || !Number.isFinite(v) || !m.better) continue;
    if (!best || !atLeast(best.value, v, m.better)) best = { name, value: v };
  }
  return best;
}

/** A row's value with its digits, or "–" when not measured. */
export const fmt = (v: number | undefined, digits: number): string =>
  v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits);

/** x/y, or "–" unless both are measured and x ≥ 0 < y (a difference below 0 has no ratio). */
export const ratioText = (x: number | undefined, y: number | undefined): string =>
  x === undefined || y === undefined || !(x >= 0) || !(y > 0) || !Number.isFinite(x / y)
    ? "–"
    : `${(x / y).toFixed(2)}x`;
