/**
 * The report of a run: the header, the results table with its ratios, the issue's targets met
 * or missed, the notes; printed and written to bench/out/results.{md,json}.
 *
 * @module
 */
import type { ModeResult } from "./measure.ts";
import {
  atLeast,
  bestPeer,
  churnSettledLabel,
  fmt,
  idleTotalLabel,
  type Metric,
  metrics,
  QUIC_MB_PER_CPU_LABEL,
  QUIC_PROXY_CPU_LABEL,
  quicCpuAboveDirect,
  ratioText,
  starvedLabel,
  starveP99Label,
  SYSCALLS_LABEL,
} from "./metrics.ts";
import { SMALL_BYTES } from "./nginx.ts";
import { tcpMemoryShare } from "./procs.ts";
import { type Settings, TARGETS } from "./settings.ts";
import { PROBE_TIMEOUT_MS } from "./starve.ts";
import { columnOrder } from "./subjects.ts";

const OUT_DIR = new URL("./out/", import.meta.url).pathname;

/** One target: what was compared and whether it was met. */
export interface TargetRow {
  target: string;
  measured: string;
  /** undefined: not measured (a column or test missing) */
  met: boolean | undefined;
}

/** What a target compares with: a value and where it comes from (undefined: not measured). */
type Bound = { value: number | undefined; what: string } | undefined;
/** A target: its sentence, the row it reads, what the row's value must reach. */
type Check = [target: string, label: string, bound: Bound];

/** The machine and the settings of the run, in one line above the tables. */
export async function header(s: Settings): Promise<string> {
  const cpu = (await Deno.readTextFile("/proc/cpuinfo")).match(/model name\s*:\s*(.*)/)?.[1];
  const load = (await Deno.readTextFile("/proc/loadavg")).split(" ").slice(0, 3).join(" ");
  const tcpMem = (tcpMemoryShare() * 100).toFixed(0);
  return `sni-proxy bench ${new Date().toISOString()} — \`${s.command}\` — ` +
    `${navigator.hardwareConcurrency} CPUs (${cpu}), load before ${load}, TCP memory before ` +
    `${tcpMem}% of tcp_mem pressure, kernel ${Deno.osRelease()}, deno ${Deno.version.deno}; ` +
    `${s.rounds} rounds, columns interleaved, medians: bulk ${s.bigBytes / 2 ** 20} MiB (curl); ` +
    `wrk -t${s.wrk.threads} -c${s.wrk.connections} -d${s.wrk.duration}, ${SMALL_BYTES} B ` +
    `responses; busy: ${s.busyConns} downloads sent at nginx limit_rate ${s.busy.bulkRate} ` +
    `each (curl), ${s.busy.concurrency} new connections at a time for ${s.busy.seconds} s; ` +
    `starve: ${s.starve.transfers} duplex transfers of 16–64 MiB each way, a new connection ` +
    `every 50 ms for ${s.starve.seconds} s; syscalls: perf stat over ${s.syscallSeconds} s of ` +
    `new connections; churn: ${s.churnConns} short connections on a fresh instance; ` +
    `${s.idleConns} idle connections; nginx 1 worker; peers 1 worker / 1 thread; QUIC: ` +
    `gtlsclient from gtlsserver, ${s.quic.handshakes} handshakes, ${s.quic.downloads} x ` +
    `${s.quic.fileBytes / 2 ** 20} MiB, ${s.quic.flows} tiny downloads, proxy workers 1` +
    (s.quicOnly ? " (QUIC only)" : "");
}

/**
 * The Markdown table: one column per mode and peer, then ratios: every column to direct, every
 * proxy mode to the best peer of the row (the fastest, the leanest) and later proxy modes to
 * the first one.
 */
export function table(results: Map<string, ModeResult>, s: Settings): string {
  const names = [...results.keys()].sort((a, b) => columnOrder(a) - columnOrder(b));
  const direct = results.get("direct");
  const others = names.filter((n) => n !== "direct");
  const modes = others.filter((n) => !results.get(n)!.peer);
  const hasPeers = others.length > modes.length;
  const head = [
    "metric",
    ...names,
    ...(direct ? others.map((n) => `${n}/direct`) : []),
    ...(hasPeers ? modes.map((n) => `${n}/better peer`) : []),
    ...modes.slice(1).map((n) => `${n}/${modes[0]}`),
  ];
  const rows = metrics(s).map((m) => {
    const value = (n: string) => m.get(results.get(n)!, direct);
    const ratio = (x: number | undefined, y: number | undefined) =>
      m.ratio === false ? "–" : ratioText(x, y);
    const best = bestPeer(results, m);
    return [
      m.label,
      ...names.map((n) => fmt(value(n), m.digits)),
      ...(direct ? others.map((n) => ratio(value(n), value("direct"))) : []),
      ...(hasPeers ? modes.map((n) => ratio(value(n), best?.value)) : []),
      ...modes.slice(1).map((n) => ratio(value(n), value(modes[0]))),
    ];
  });
  return [
    `| ${head.join(" | ")} |`,
    `| ${head.map(() => "---").join(" | ")} |`,
    ...rows.map((r) => `| ${r.join(" | ")} |`),
  ].join("\n");
}

/** The results read by row label, for the targets. */
interface Lookup {
  results: Map<string, ModeResult>;
  /** the row of a label (undefined: the test that has it did not run) */
  metric(label: string): Metric | undefined;
  /** a column's value of a row (undefined: the column or the value was not measured) */
  get(name: string, label: string): number | undefined;
}

function lookup(results: Map<string, ModeResult>, s: Settings): Lookup {
  const direct = results.get("direct");
  const all = metrics(s);
  const byLabel = new Map(all.map((m) => [m.label, m]));
  const metric = (label: string) => byLabel.get(label);
  return {
    results,
    metric,
    get: (name, label) => {
      const r = results.get(name);
      return r && metric(label)?.get(r, direct);
    },
  };
}

/** The better peer's value of a row (times k), as a bound. */
function peerBound(look: Lookup, label: string, k = 1): Bound {
  const m = look.metric(label);
  const b = m && bestPeer(look.results, m);
  const what = `${k === 1 ? "" : `${k}x `}better peer: ${b?.name}`;
  return b && { value: b.value * k, what };
}

/** Another column's value of a row as a bound. */
function columnBound(look: Lookup, name: string, label: string): Bound {
  return { value: look.get(name, label), what: name };
}

/** A fixed number as a bound. */
function fixedBound(value: number, unit: string): Bound {
  return { value, what: `target ${value} ${unit}` };
}

/** `mode`'s value of a row against a bound: a number, or another column's value times k. */
function compare(look: Lookup, mode: string, [target, label, bound]: Check): TargetRow {
  const m = look.metric(label);
  const v = look.get(mode, label);
  const known = m && v !== undefined && Number.isFinite(v) && bound?.value !== undefined;
  const digits = m?.digits ?? 0;
  return {
    target: `${mode}: ${target}`,
    measured: `${fmt(v, digits)} vs ${bound ? `${fmt(bound.value, digits)} (${bound.what})` : "–"}`,
    met: known ? atLeast(v!, bound!.value!, m.better!) : undefined,
  };
}

/** Issue 18's targets on CPU, rates and latency, against the better peer of each row. */
function peerChecks(look: Lookup): Check[] {
  const k = TARGETS.cpuVsBetterPeer;
  const cpuNew = "new-connection: proxy CPU µs per connection";
  const cpuKeepAlive = "keep-alive: proxy CPU µs per request";
  return [
    [`proxy CPU per new connection ≤ ${k}x the better peer's`, cpuNew, peerBound(look, cpuNew, k)],
    [
      `proxy CPU per keep-alive request ≤ ${k}x the better peer's`,
      cpuKeepAlive,
      peerBound(look, cpuKeepAlive, k),
    ],
    ...([
      ["new connections/s ≥ the better peer's", "new connections/s"],
      ["keep-alive req/s ≥ the better peer's", "keep-alive requests/s"],
      ["keep-alive p99 ≤ the better peer's", "keep-alive p99 ms"],
    ] as const).map(([t, label]): Check => [t, label, peerBound(look, label)]),
  ];
}

/** Issue 18's memory targets: idle connections, and RSS after many short connections. */
function memoryChecks(look: Lookup, s: Settings): Check[] {
  const perConn = `RSS KiB per idle connection (${s.idleConns})`;
  const n = s.churnConns || TARGETS.churnConns; // the target's count when the test did not run
  return [
    ["RSS per idle connection ≤ HAProxy's", perConn, columnBound(look, "haproxy", perConn)],
    [
      `total with ${TARGETS.idleTotalConns} idle connections ≤ ${TARGETS.idleTotalMB} MB`,
      idleTotalLabel(s),
      fixedBound(TARGETS.idleTotalMB, "MB"),
    ],
    [
      `back within ${TARGETS.churnSettledPct - 100} % of baseline 15 s after ${n} short ` +
      `connections${n === TARGETS.churnConns ? "" : ` (the target: ${TARGETS.churnConns})`}`,
      churnSettledLabel(s),
      fixedBound(TARGETS.churnSettledPct, "% of baseline"),
    ],
  ];
}

/** Issue 18's bulk target: kernel modes against HAProxy, userspace against nginx stream. */
function bulkChecks(look: Lookup, mode: string): Check[] {
  const bulk = "bulk download MB/s";
  const cpu = "bulk: machine CPU s per GiB";
  if (mode === "userspace") {
    return [["bulk: userspace ≥ nginx stream's", bulk, columnBound(look, "nginx-stream", bulk)]];
  }
  return [
    ["bulk: kernel mode MB/s ≥ HAProxy's", bulk, columnBound(look, "haproxy", bulk)],
    ["bulk: machine CPU per GiB ≤ HAProxy's", cpu, columnBound(look, "haproxy", cpu)],
  ];
}

/** Issue 18's targets on the cost and the fairness of new connections. */
function newConnectionChecks(look: Lookup, s: Settings): Check[] {
  const under = `with ${
    s.starve.transfers || TARGETS.starveTransfers
  } unthrottled duplex transfers`;
  return [
    [
      "syscalls per new connection ≤ nginx's",
      SYSCALLS_LABEL,
      columnBound(look, "nginx-stream", SYSCALLS_LABEL),
    ],
    [
      `new connections never starved by bulk: ${under}, ServerHello p99 ≤ HAProxy's`,
      starveP99Label(s),
      columnBound(look, "haproxy", starveP99Label(s)),
    ],
    [
      `new connections never starved by bulk: ${under}, none waits ` +
      `${PROBE_TIMEOUT_MS / 1000} s`,
      starvedLabel(s),
      fixedBound(0, "probes"),
    ],
  ];
}

/** The targets of one proxy mode. */
function modeChecks(look: Lookup, mode: string, s: Settings): Check[] {
  return [
    ...peerChecks(look),
    ...memoryChecks(look, s),
    ...bulkChecks(look, mode),
    ...newConnectionChecks(look, s),
  ];
}

/** The target "kernel mode ≥ userspace mode on every row", over every row with a better side. */
function kernelVsUserspace(look: Lookup, s: Settings, mode: string): TargetRow {
  const worse: string[] = [];
  let compared = 0;
  for (const m of metrics(s)) {
    const k = look.get(mode, m.label);
    const u = look.get("userspace", m.label);
    if (!m.better || k === undefined || u === undefined) continue;
    if (!Number.isFinite(k) || !Number.isFinite(u)) continue;
    compared++;
    if (!atLeast(k, u, m.better)) {
      worse.push(`${m.label} ${fmt(k, m.digits)} vs ${fmt(u, m.digits)}`);
    }
  }
  return {
    target: `${mode}: kernel mode ≥ userspace mode on every row`,
    measured: worse.length
      ? `worse on ${worse.length} of ${compared} rows: ${worse.join("; ")}`
      : `${compared} rows`,
    met: compared ? worse.length === 0 : undefined,
  };
}

/** Issue 19's QUIC target, part one: the process never sees an established flow's datagram. */
function quicDatagramTarget(look: Lookup): TargetRow | undefined {
  const k = look.results.get("kernel")?.quic?.bulk;
  if (!k) return undefined;
  const all = k.processDatagrams + k.kernelDatagrams;
  const share = all > 0 ? k.processDatagrams / all : 1;
  const cpu = look.get("kernel", QUIC_PROXY_CPU_LABEL);
  const userCpu = look.get("userspace", QUIC_PROXY_CPU_LABEL);
  return {
    target: "kernel: QUIC kernel forwarding costs the proxy process no CPU per established-flow " +
      "datagram (at most the first flight, ≤ 1 % of the downloads' datagrams, reaches it; its " +
      "CPU per GiB ≤ 5 % of userspace's: the sweep timer)",
    measured: `${k.processDatagrams} of ${all} datagrams through the process ` +
      `(${(share * 100).toFixed(2)} %), proxy CPU ${fmt(cpu, 3)} vs ${fmt(userCpu, 3)} s per GiB`,
    met: cpu === undefined || userCpu === undefined
      ? undefined
      : share <= 0.01 && cpu <= 0.05 * userCpu,
  };
}

/** Issue 19's QUIC targets (kernel forwarding against userspace forwarding). */
function quicTargets(look: Lookup): TargetRow[] {
  const row = quicDatagramTarget(look);
  if (!row) return [];
  const u = look.get("userspace", QUIC_MB_PER_CPU_LABEL);
  return [
    row,
    compare(look, "kernel", [
      "QUIC kernel forwarding's MB per CPU second ≥ 2x userspace forwarding's",
      QUIC_MB_PER_CPU_LABEL,
      { value: u === undefined ? undefined : 2 * u, what: "2x userspace" },
    ]),
  ];
}

/** The issue's targets, met or missed, for each proxy mode measured. */
export function targetRows(results: Map<string, ModeResult>, s: Settings): TargetRow[] {
  const look = lookup(results, s);
  const modes = [...results.keys()].filter((n) => n !== "direct" && !results.get(n)!.peer)
    .filter((n) => n !== "workers")
    .sort((a, b) => columnOrder(a) - columnOrder(b));
  const rows = modes.filter(() => !s.quicOnly).flatMap((mode) =>
    modeChecks(look, mode, s).map((check) => compare(look, mode, check))
  );
  rows.push(...quicTargets(look));
  if (modes.includes("userspace")) {
    for (const m of modes.filter((n) => n !== "userspace")) {
      rows.push(kernelVsUserspace(look, s, m));
    }
  }
  return rows;
}

function targetTable(rows: TargetRow[]): string {
  return [
    "| target | measured | met |",
    "| --- | --- | --- |",
    ...rows.map((r) =>
      `| ${r.target} | ${r.measured} | ${
        r.met === undefined ? "not measured" : r.met ? "met" : "MISSED"
      } |`
    ),
  ].join("\n");
}

/**
 * Notes under the tables: wrk socket errors, failed connections of the busy test, starved
 * probes and failed transfers of the starvation test.
 */
function notes(results: Map<string, ModeResult>): string[] {
  const lines: string[] = [];
  for (const [name, r] of results) {
    for (const e of [r.keepAlive, r.newConnection].flatMap((w) => w?.socketErrors ?? [])) {
      lines.push(`${name}: wrk socket errors: ${e}`);
    }
    if (r.starve?.starved) {
      lines.push(
        `${name}: ${r.starve.starved} of ${r.starve.probes} probes of the starvation test got ` +
          `no ServerHello within ${PROBE_TIMEOUT_MS} ms (per round: ` +
          `${r.starve.starvedRuns.join(", ")}), first: ${r.starve.firstError}`,
      );
    }
    if (r.starve?.transferErrors) {
      lines.push(
        `${name}: ${r.starve.transferErrors} duplex transfers of the starvation test failed, ` +
          `first: ${r.starve.transferFirstError}`,
      );
    }
    const above = quicCpuAboveDirect(r, results.get("direct"));
    if (above !== undefined && above < 0.01) {
      lines.push(
        `${name}: QUIC downloads took ${above.toFixed(3)} CPU s above direct's (under one ` +
          "clock tick): its MB per CPU second of forwarding is counted with 0.01 s, a floor",
      );
    }
    if (r.busy?.errors) {
      lines.push(
        `${name}: ${r.busy.errors} of ${r.busy.connections} new connections of the busy test ` +
          `failed (counted at the time they took), first: ${r.busy.firstError}`,
      );
    }
  }
  return lines;
}

/** What a run found, for its report. */
export interface ReportOptions {
  /** the header line, taken before the run (the machine's load before it) */
  head: string;
  settings: Settings;
  results: Map<string, ModeResult>;
  skipped: Record<string, string>;
  /** when the run started (performance.now()) */
  t0: number;
}

/** Prints the report and writes it to bench/out/results.md and results.json. */
export async function writeReport(o: ReportOptions): Promise<void> {
  const { head, settings: s, results, skipped } = o;
  const targets = targetRows(results, s);
  const md = [
    head,
    "",
    table(results, s),
    "",
    targetTable(targets),
    "",
    ...notes(results).map((l) => `- ${l}`),
    ...Object.entries(skipped).map(([m, why]) => `- ${m} skipped: ${why}`),
    "",
    `(${((performance.now() - o.t0) / 1000).toFixed(0)} s)`,
  ].join("\n");
  console.log(`\n${md}`);
  await Deno.mkdir(OUT_DIR, { recursive: true });
  await Deno.writeTextFile(`${OUT_DIR}results.md`, `${md}\n`);
  const json = {
    header: head,
    command: s.command,
    settings: {
      bigBytes: s.bigBytes,
      rounds: s.rounds,
      wrk: s.wrk,
      busy: s.busy,
      idleConns: s.idleConns,
      starve: s.starve,
      churnConns: s.churnConns,
      syscallSeconds: s.syscallSeconds,
      quic: s.quic,
    },
    targets: { bounds: TARGETS, rows: targets },
    results: Object.fromEntries([...results].sort(([a], [b]) => columnOrder(a) - columnOrder(b))),
    skipped,
  };
  await Deno.writeTextFile(`${OUT_DIR}results.json`, JSON.stringify(json, null, 2));
  console.log(`\nwritten: ${OUT_DIR}results.md, ${OUT_DIR}results.json`);
}
