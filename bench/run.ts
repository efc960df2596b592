/**
 * Benchmark (not a test): on loopback, an nginx TLS backend measured directly, through the
 * proxy in each proxy mode (userspace; kernel = eBPF sockmap) and through peer SNI proxies
 * (nginx `stream` with `ssl_preread`, HAProxy in tcp mode), in one run.
 *
 *   deno task bench                          direct, userspace, kernel, nginx-stream, haproxy
 *   deno task bench --quick                  shorter runs
 *   deno task bench --modes direct,userspace only these columns
 *   deno task bench --idle 0                 skip the idle-connection test
 *   deno task bench --busy 0                 skip the new-connection test under bulk load
 *
 * Reports bulk MB/s (curl TLS download), requests/s with keep-alive and with a new connection
 * per request (wrk), p50/p99 latency, new-connection latency while bulk transfers run, CPU per
 * GiB and per request (the whole machine from /proc/stat, since bytes spliced in the kernel
 * cost softirq time and no process time; and the proxy or peer, nginx and the load generator),
 * and RSS per idle proxied connection. The load tests run in rounds with the columns
 * interleaved; the table shows medians, ratios to direct and to the best peer, and the targets
 * met or missed. See README.md. Writes bench/out/results.{json,md}. Every process it starts is
 * stopped at the end, on an error and on SIGINT/SIGTERM.
 *
 * @module
 */
import { parseArgs } from "node:util";
import {
  type BulkResult,
  type BulkRun,
  bulkRun,
  type BusyOptions,
  type BusyResult,
  type BusyRun,
  busyRun,
  type CpuUse,
  summarizeBulk,
  summarizeBusy,
  summarizeWrk,
  type Watch,
  type WrkOptions,
  type WrkResult,
  type WrkRun,
  wrkRun,
} from "./load.ts";
import { type IdleResult, idleRss } from "./idle_conns.ts";
import { type Nginx, SMALL_BYTES, startNginx } from "./nginx.ts";
import { PEERS } from "./peers.ts";
import { killChildren, need, tcpMemoryShare } from "./procs.ts";
import { type Proxy, PROXY_MODES, startProxy } from "./proxy.ts";

const OUT_DIR = new URL("./out/", import.meta.url).pathname;

/** Something in the path between the clients and nginx: a column other than direct. */
interface Subject {
  name: string;
  /** a peer proxy (nginx stream, HAProxy), not this project's */
  peer: boolean;
  /** whether the idle test applies (its RSS is one proxy's; not the workers column) */
  idle: boolean;
  /** Why it cannot run here, or null. */
  prepare(): Promise<string | null>;
  start(dir: string, backendPort: number): Promise<Proxy>;
}

const SUBJECTS: Subject[] = [
  ...PROXY_MODES.map((m) => ({
    name: m.name,
    peer: false,
    idle: (m.workers ?? 1) === 1,
    prepare: async () => (await m.prepare?.()) ?? null,
    start: (dir: string, port: number) => startProxy(dir, port, m),
  })),
  ...PEERS.map((p) => ({
    name: p.name,
    peer: true,
    idle: true,
    prepare: () => Promise.resolve(p.prepare()),
    start: p.start,
  })),
];

/** Columns of a plain `deno task bench` (workers only on request: the machine has 2 cores). */
const DEFAULT_COLUMNS = ["direct", ...SUBJECTS.map((s) => s.name).filter((n) => n !== "workers")];

const args = parseArgs({
  args: Deno.args,
  options: {
    quick: { type: "boolean", default: false },
    idle: { type: "string" },
    busy: { type: "string", default: "200" },
    "busy-rate": { type: "string", default: "1m" },
    modes: { type: "string", default: DEFAULT_COLUMNS.join(",") },
    duration: { type: "string" },
    rounds: { type: "string" },
    "idle-only": { type: "boolean", default: false },
    help: { type: "boolean", default: false },
  },
}).values;
if (args.help) {
  console.log(
    "usage: deno task bench [--quick] [--modes direct,userspace,kernel,nginx-stream,haproxy" +
      ",workers] [--idle N] [--busy N] [--busy-rate 1m] [--duration 5s] [--rounds 3] [--idle-only]",
  );
  Deno.exit(0);
}

/** The exact command of this run, for the header. */
const COMMAND = ["deno task bench", ...Deno.args].join(" ");
/**
 * Idle connections. The target is about 10,000, but a process may open 20,000 descriptors here
 * and a proxied connection takes two: 9,000 is what fits with the proxy's descriptor reserve.
 */
const IDLE_CONNS = Number(args.idle ?? (args.quick ? 2000 : 9000));
/** Bulk transfers running during the busy test. */
const BUSY_CONNS = Number(args.busy);
const BIG_BYTES = (args.quick ? 256 : 1024) * 2 ** 20;
/** Rounds of bulk + keep-alive + new-connection runs, every column once per round. */
const ROUNDS = Number(args.rounds ?? (args.quick ? 2 : 3));
const WRK: WrkOptions = {
  threads: 1,
  connections: 50,
  duration: args.duration ?? (args.quick ? "2s" : "5s"),
};
/**
 * The busy test: new connections, 4 at a time, while BUSY_CONNS downloads run, each sent by
 * nginx at a fixed rate (the same offered load for every column, below what each column moves
 * at full speed).
 */
const BUSY: BusyOptions = {
  bulkConns: BUSY_CONNS,
  bulkRate: args["busy-rate"],
  seconds: args.quick ? 3 : 5,
  concurrency: 4,
};
/** Label start of the busy test's rows. */
const BUSY_ROW = `busy (${BUSY_CONNS} downloads):`;
const BUSY_P99 = `${BUSY_ROW} new-connection p99 ms, connect to last byte`;

/** The issue's targets (see targetRows). */
const TARGETS = {
  cpuUsPerNewConnection: 90,
  idleKiBPerConn: 6.5,
  idleTotalConns: 10_000,
  idleTotalMB: 120,
  busyP99VsNginx: 2,
};

/** What one column measured; absent parts were not run. */
interface ModeResult {
  /** whether a proxy (ours or a peer) was in the path (the proxy-process figures exist) */
  proxied: boolean;
  peer: boolean;
  bulk?: BulkResult;
  keepAlive?: WrkResult;
  newConnection?: WrkResult;
  busy?: BusyResult;
  idle?: IdleResult;
}

/** A column being measured: where its clients connect and the runs so far. */
interface Column {
  name: string;
  port: number;
  watch: Watch;
  proxy: Proxy | null;
  subject: Subject | null;
  bulk: BulkRun[];
  keepAlive: WrkRun[];
  newConnection: WrkRun[];
  busy: BusyRun[];
}

/** Idle test of each subject, each on a fresh instance of its own. */
async function measureIdle(
  subjects: Subject[],
  dir: string,
  nginx: Nginx,
  results: Map<string, ModeResult>,
  skipped: Record<string, string>,
): Promise<void> {
  for (const subject of subjects.filter((s) => s.idle)) {
    console.log(`${subject.name}: ${IDLE_CONNS} idle connections...`);
    try {
      // fresh: a proxy that served the load tests keeps its grown heap and buffers, and new
      // connections reuse them, so its growth per connection would read near zero
      const proxy = await subject.start(dir, nginx.port);
      try {
        const idle = await idleRss(proxy.port, proxy.pids, IDLE_CONNS, nginx.certPem);
        results.set(subject.name, { proxied: true, peer: subject.peer, idle });
        console.log(
          `  ${idle.kibPerConn.toFixed(1)} KiB per connection ` +
            `(${idle.rssBeforeKiB} → ${idle.rssAfterKiB} KiB)`,
        );
      } finally {
        await proxy.stop();
      }
    } catch (e) {
      if (!optional(subject.name)) throw e;
      skipped[subject.name] = firstLines(e);
      console.log(`  skipped: ${skipped[subject.name]}`);
    }
  }
}

/** Columns whose failure skips them (with the reason) instead of failing the run. */
function optional(name: string): boolean {
  return name === "kernel" || name === "sockmap" || PEERS.some((p) => p.name === name);
}

/**
 * Bulk, keep-alive, new-connection and busy runs, interleaved: each round runs every column
 * once per test (in an order rotated every round), so that a change in the machine's
 * background load hits all columns alike instead of one.
 */
async function measureLoad(
  subjects: Subject[],
  withDirect: boolean,
  dir: string,
  nginx: Nginx,
  results: Map<string, ModeResult>,
  skipped: Record<string, string>,
): Promise<void> {
  const columns: Column[] = [];
  const column = (name: string, port: number, proxy: Proxy | null, subject: Subject | null) => ({
    name,
    port,
    proxy,
    subject,
    watch: { proxy: proxy ? proxy.pids : [], nginx: nginx.pids },
    bulk: [],
    keepAlive: [],
    newConnection: [],
    busy: [],
  });
  if (withDirect) columns.push(column("direct", nginx.port, null, null));
  try {
    for (const subject of subjects) {
      try {
        const proxy = await subject.start(dir, nginx.port);
        columns.push(column(subject.name, proxy.port, proxy, subject));
      } catch (e) {
        if (!optional(subject.name)) throw e;
        skipped[subject.name] = firstLines(e);
        console.log(`${subject.name}: skipped: ${skipped[subject.name]}`);
      }
    }
    const wrkLine = (r: WrkRun) => `${r.rps.toFixed(0)} req/s, p99 ${r.p99ms.toFixed(2)} ms`;
    const tests = [
      {
        label: "bulk",
        run: async (c: Column) => {
          const r = await bulkRun(c.port, BIG_BYTES, c.watch);
          c.bulk.push(r);
          return `${r.mbs.toFixed(0)} MB/s`;
        },
      },
      {
        label: "keep-alive",
        run: async (c: Column) => {
          const r = await wrkRun(c.port, false, WRK, c.watch);
          c.keepAlive.push(r);
          return wrkLine(r);
        },
      },
      {
        label: "new-connection",
        run: async (c: Column) => {
          const r = await wrkRun(c.port, true, WRK, c.watch);
          c.newConnection.push(r);
          return wrkLine(r);
        },
      },
      ...(BUSY_CONNS > 0
        ? [{
          label: "busy",
          run: async (c: Column) => {
            const r = await busyRun(c.port, nginx.certPem, BUSY);
            c.busy.push(r);
            const p99 = summarizeBusy([r]).p99ms;
            return `${r.latenciesMs.length} new connections (${r.errors} failed), ` +
              `p99 ${p99.toFixed(2)} ms; bulk ${r.bulkMBs.toFixed(0)} MB/s; TCP memory ` +
              `${(r.tcpMemoryPeak * 100).toFixed(0)}% of tcp_mem pressure`;
          },
        }]
        : []),
    ];
    for (let round = 0; round < ROUNDS; round++) {
      for (const test of tests) {
        const order = columns.map((_, i) => columns[(i + round) % columns.length]);
        for (const c of order) {
          if (!columns.includes(c)) continue; // dropped this round
          try {
            const what = await test.run(c);
            console.log(
              `round ${round + 1}/${ROUNDS} ${test.label.padEnd(14)} ${c.name.padEnd(12)} ${what}`,
            );
          } catch (e) {
            if (!optional(c.name)) throw e;
            skipped[c.name] = `${test.label}: ${firstLines(e)}`;
            console.log(`${c.name}: dropped: ${skipped[c.name]}`);
            columns.splice(columns.indexOf(c), 1); // its idle result, if any, stays
            await c.proxy?.stop();
          }
        }
      }
    }
  } finally {
    for (const c of columns) await c.proxy?.stop();
  }
  for (const c of columns) {
    const r = results.get(c.name) ??
      { proxied: c.proxy !== null, peer: c.subject?.peer ?? false };
    r.bulk = summarizeBulk(c.bulk);
    r.keepAlive = summarizeWrk(c.keepAlive);
    r.newConnection = summarizeWrk(c.newConnection);
    if (c.busy.length) r.busy = summarizeBusy(c.busy);
    results.set(c.name, r);
  }
}

/** Position of a column in the table: direct, the proxy modes, then the peers. */
function columnOrder(name: string): number {
  return ["direct", ...SUBJECTS.map((s) => s.name)].indexOf(name);
}

/** The first lines of an error's message, for a one-line reason. */
function firstLines(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n--- its log:")[0]
    .split("\n").slice(0, 3).join(" ");
}

/** One row of the table. */
interface Metric {
  label: string;
  get: (r: ModeResult, direct?: ModeResult) => number | undefined;
  digits: number;
  /** which way is better: picks the best peer and judges "kernel ≥ userspace" (none: neither) */
  better?: "higher" | "lower";
  /** false: no ratio columns (a difference of small numbers, whose ratio means nothing) */
  ratio?: boolean;
}

/** Total RSS, MB (10^6 bytes), at `conns` idle connections: measured, or linear from it. */
function idleTotalMB(idle: IdleResult | undefined, conns: number): number | undefined {
  if (!idle) return undefined;
  return (idle.rssAfterKiB + idle.kibPerConn * (conns - idle.connections)) * 1024 / 1e6;
}

/** A row as written in {@link metrics}: label, value, digits, better side, ratio. */
type Row = [
  label: string,
  get: Metric["get"],
  digits: number,
  better?: Metric["better"] | null,
  ratio?: boolean,
];

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

function metrics(): Metric[] {
  const total = TARGETS.idleTotalConns;
  const rows: Row[] = [
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
    ...(BUSY_CONNS > 0
      ? [
        [
          `${BUSY_ROW} new-connection p50 ms, connect to last byte`,
          (r) => r.busy?.p50ms,
          2,
          "lower",
        ],
        [BUSY_P99, (r) => r.busy?.p99ms, 2, "lower"],
        [
          `${BUSY_ROW} new connections/s, ${BUSY.concurrency} at a time`,
          (r) => r.busy?.rps,
          0,
          "higher",
        ],
        [`${BUSY_ROW} MB/s of the downloads together`, (r) => r.busy?.bulkMBs, 0, "higher"],
        [
          `${BUSY_ROW} peak TCP memory of the machine, % of tcp_mem pressure`,
          (r) => r.busy && r.busy.tcpMemoryPeak * 100,
          0,
        ],
      ] satisfies Row[]
      : []),
    [`RSS KiB per idle connection (${IDLE_CONNS})`, (r) => r.idle?.kibPerConn, 1, "lower"],
    ["idle: of which anonymous KiB per connection", (r) => r.idle?.anonKibPerConn, 1, "lower"],
    [
      `total RSS MB with ${IDLE_CONNS} idle connections`,
      (r) => idleTotalMB(r.idle, IDLE_CONNS),
      1,
      "lower",
    ],
    ...(IDLE_CONNS !== total
      ? [[
        `total RSS MB with ${total} idle (linear from ${IDLE_CONNS})`,
        (r) => idleTotalMB(r.idle, total),
        1,
        "lower",
      ]] satisfies Row[]
      : []),
    [`idle: seconds to open ${IDLE_CONNS} TLS connections`, (r) => r.idle?.openSeconds, 1],
    ["idle: seconds until the proxy closed them all", (r) => r.idle?.closeSeconds, 1],
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
function atLeast(a: number, b: number, better: "higher" | "lower"): boolean {
  return better === "higher" ? a >= b : a <= b;
}

/** The best peer's value of a row (undefined: no peer measured it, or the row has no side). */
function bestPeer(
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

const fmt = (v: number | undefined, digits: number) =>
  v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits);

/** x/y, or "–" unless both are measured and x ≥ 0 < y (a difference below 0 has no ratio). */
const ratioText = (x: number | undefined, y: number | undefined) =>
  x === undefined || y === undefined || !(x >= 0) || !(y > 0) || !Number.isFinite(x / y)
    ? "–"
    : `${(x / y).toFixed(2)}x`;

/**
 * The Markdown table: one column per mode and peer, then ratios: every column to direct, every
 * proxy mode to the best peer of the row (the fastest, the leanest) and later proxy modes to
 * the first one.
 */
function table(results: Map<string, ModeResult>): string {
  const names = [...results.keys()].sort((a, b) => columnOrder(a) - columnOrder(b));
  const direct = results.get("direct");
  const others = names.filter((n) => n !== "direct");
  const modes = others.filter((n) => !results.get(n)!.peer);
  const hasPeers = others.length > modes.length;
  const head = [
    "metric",
    ...names,
    ...(direct ? others.map((n) => `${n}/direct`) : []),
    ...(hasPeers ? modes.map((n) => `${n}/best peer`) : []),
    ...modes.slice(1).map((n) => `${n}/${modes[0]}`),
  ];
  const rows = metrics().map((m) => {
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

/** One target: what was compared and whether it was met. */
interface TargetRow {
  target: string;
  measured: string;
  /** undefined: not measured (a column or test missing) */
  met: boolean | undefined;
}

/** What a target compares with: a value and where it comes from (undefined: not measured). */
type Bound = { value: number | undefined; what: string } | undefined;
/** A target: its sentence, the row it reads, what the row's value must reach. */
type Check = [target: string, label: string, bound: Bound];

/** The issue's targets, met or missed, for each proxy mode measured. */
function targetRows(results: Map<string, ModeResult>): TargetRow[] {
  const direct = results.get("direct");
  const rows: TargetRow[] = [];
  const byLabel = new Map(metrics().map((m) => [m.label, m]));
  const metric = (label: string) => byLabel.get(label)!;
  const get = (name: string, label: string) => {
    const r = results.get(name);
    return r && metric(label).get(r, direct);
  };
  /** `mode`'s value of a row against a bound: a number, or another column's value times k */
  const compare = (mode: string, label: string, target: string, bound: Bound) => {
    const m = metric(label);
    const v = get(mode, label);
    const known = v !== undefined && Number.isFinite(v) && bound?.value !== undefined;
    rows.push({
      target: `${mode}: ${target}`,
      measured: `${fmt(v, m.digits)} vs ${
        bound ? `${fmt(bound.value, m.digits)} (${bound.what})` : "–"
      }`,
      met: known ? atLeast(v!, bound!.value!, m.better!) : undefined,
    });
  };
  const peer = (label: string) => {
    const b = bestPeer(results, metric(label));
    return b && { value: b.value, what: `best peer: ${b.name}` };
  };
  const column = (name: string, label: string, k = 1) => {
    const v = get(name, label);
    return { value: v === undefined ? undefined : v * k, what: k === 1 ? name : `${k}x ${name}` };
  };
  const fixed = (value: number, unit: string) => ({ value, what: `target ${value} ${unit}` });
  const modes = [...results.keys()].filter((n) => n !== "direct" && !results.get(n)!.peer)
    .filter((n) => n !== "workers")
    .sort((a, b) => columnOrder(a) - columnOrder(b));
  const totalLabel = IDLE_CONNS === TARGETS.idleTotalConns
    ? `total RSS MB with ${IDLE_CONNS} idle connections`
    : `total RSS MB with ${TARGETS.idleTotalConns} idle (linear from ${IDLE_CONNS})`;
  const bulk = "bulk download MB/s";
  for (const mode of modes) {
    const checks: Check[] = [
      ["new connections/s ≥ the better peer's", "new connections/s", peer("new connections/s")],
      [
        `proxy CPU per new connection ≤ ${TARGETS.cpuUsPerNewConnection} µs`,
        "new-connection: proxy CPU µs per connection",
        fixed(TARGETS.cpuUsPerNewConnection, "µs"),
      ],
      [
        "keep-alive requests/s ≥ the best peer's",
        "keep-alive requests/s",
        peer("keep-alive requests/s"),
      ],
      ["keep-alive p99 ≤ the best peer's", "keep-alive p99 ms", peer("keep-alive p99 ms")],
      ...(mode === "kernel"
        ? [
          ["bulk MB/s ≥ HAProxy's", bulk, column("haproxy", bulk)],
          [
            "bulk machine CPU per GiB ≤ HAProxy's",
            "bulk: machine CPU s per GiB",
            column("haproxy", "bulk: machine CPU s per GiB"),
          ],
        ] satisfies Check[]
        : [["bulk MB/s ≥ nginx stream's", bulk, column("nginx-stream", bulk)]] satisfies Check[]),
      [
        `RSS per idle connection ≤ ${TARGETS.idleKiBPerConn} KiB`,
        `RSS KiB per idle connection (${IDLE_CONNS})`,
        fixed(TARGETS.idleKiBPerConn, "KiB"),
      ],
      [
        `total RSS with ${TARGETS.idleTotalConns} idle connections ≤ ${TARGETS.idleTotalMB} MB`,
        totalLabel,
        fixed(TARGETS.idleTotalMB, "MB"),
      ],
      ...(BUSY_CONNS > 0
        ? [[
          `new-connection p99 while ${BUSY_CONNS} downloads run ≤ ` +
          `${TARGETS.busyP99VsNginx}x nginx stream's`,
          BUSY_P99,
          column("nginx-stream", BUSY_P99, TARGETS.busyP99VsNginx),
        ]] satisfies Check[]
        : []),
    ];
    for (const [target, label, bound] of checks) compare(mode, label, target, bound);
  }
  if (modes.includes("kernel") && modes.includes("userspace")) {
    const worse: string[] = [];
    let compared = 0;
    for (const m of metrics()) {
      const k = get("kernel", m.label);
      const u = get("userspace", m.label);
      if (!m.better || k === undefined || u === undefined) continue;
      if (!Number.isFinite(k) || !Number.isFinite(u)) continue;
      compared++;
      if (!atLeast(k, u, m.better)) {
        worse.push(`${m.label} ${fmt(k, m.digits)} vs ${fmt(u, m.digits)}`);
      }
    }
    rows.push({
      target: "kernel: at least as good as userspace on every row",
      measured: worse.length
        ? `worse on ${worse.length} of ${compared} rows: ${worse.join("; ")}`
        : `${compared} rows`,
      met: compared ? worse.length === 0 : undefined,
    });
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

/** Notes under the tables: wrk socket errors, failed connections of the busy test. */
function notes(results: Map<string, ModeResult>): string[] {
  const lines: string[] = [];
  for (const [name, r] of results) {
    for (const e of [r.keepAlive, r.newConnection].flatMap((w) => w?.socketErrors ?? [])) {
      lines.push(`${name}: wrk socket errors: ${e}`);
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

async function header(): Promise<string> {
  const cpu = (await Deno.readTextFile("/proc/cpuinfo")).match(/model name\s*:\s*(.*)/)?.[1];
  const load = (await Deno.readTextFile("/proc/loadavg")).split(" ").slice(0, 3).join(" ");
  const tcpMem = (tcpMemoryShare() * 100).toFixed(0);
  return `sni-proxy bench ${new Date().toISOString()} — \`${COMMAND}\` — ` +
    `${navigator.hardwareConcurrency} CPUs (${cpu}), load before ${load}, TCP memory before ` +
    `${tcpMem}% of tcp_mem pressure, kernel ${Deno.osRelease()}, deno ${Deno.version.deno}; ` +
    `${ROUNDS} rounds, columns interleaved, medians: bulk ${BIG_BYTES / 2 ** 20} MiB (curl); ` +
    `wrk -t${WRK.threads} -c${WRK.connections} -d${WRK.duration}, ${SMALL_BYTES} B responses; ` +
    `busy: ${BUSY_CONNS} downloads sent at nginx limit_rate ${BUSY.bulkRate} each (curl), ` +
    `${BUSY.concurrency} new connections at a time for ${BUSY.seconds} s; ${IDLE_CONNS} idle ` +
    `connections; nginx 1 worker; peers 1 worker / 1 thread`;
}

async function main(): Promise<void> {
  need("nginx", "nginx");
  need("wrk", "wrk");
  need("curl", "curl");
  need("openssl", "openssl");
  const names = args.modes.split(",").map((s) => s.trim()).filter(Boolean);
  for (const n of names) {
    if (n !== "direct" && !SUBJECTS.some((s) => s.name === n)) {
      throw new Error(
        `unknown mode ${n} (known: direct, ${SUBJECTS.map((s) => s.name).join(", ")})`,
      );
    }
  }
  const head = await header();
  const dir = await Deno.makeTempDir({ prefix: "sni-bench-" });
  const cleanup = async () => {
    await killChildren();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(sig, () => {
      console.error(`\n${sig}: stopping nginx, the proxy and the peers`);
      cleanup().finally(() => Deno.exit(130));
    });
  }
  const results = new Map<string, ModeResult>();
  const skipped: Record<string, string> = {};
  const t0 = performance.now();
  try {
    const nginx = await startNginx(dir, BIG_BYTES);
    try {
      const subjects: Subject[] = [];
      for (const subject of SUBJECTS.filter((s) => names.includes(s.name))) {
        const why = await subject.prepare();
        if (why) {
          skipped[subject.name] = why;
          console.log(`${subject.name}: skipped: ${why}`);
        } else subjects.push(subject);
      }
      if (IDLE_CONNS > 0) await measureIdle(subjects, dir, nginx, results, skipped);
      if (!args["idle-only"]) {
        const live = subjects.filter((s) => !skipped[s.name]);
        await measureLoad(live, names.includes("direct"), dir, nginx, results, skipped);
      }
    } finally {
      await nginx.stop();
    }
  } finally {
    await cleanup();
  }
  const targets = targetRows(results);
  const md = [
    head,
    "",
    table(results),
    "",
    targetTable(targets),
    "",
    ...notes(results).map((l) => `- ${l}`),
    ...Object.entries(skipped).map(([m, why]) => `- ${m} skipped: ${why}`),
    "",
    `(${((performance.now() - t0) / 1000).toFixed(0)} s)`,
  ].join("\n");
  console.log(`\n${md}`);
  await Deno.mkdir(OUT_DIR, { recursive: true });
  await Deno.writeTextFile(`${OUT_DIR}results.md`, `${md}\n`);
  await Deno.writeTextFile(
    `${OUT_DIR}results.json`,
    JSON.stringify(
      {
        header: head,
        command: COMMAND,
        settings: {
          bigBytes: BIG_BYTES,
          rounds: ROUNDS,
          wrk: WRK,
          busy: BUSY,
          idleConns: IDLE_CONNS,
        },
        targets: { bounds: TARGETS, rows: targets },
        results: Object.fromEntries(
          [...results].sort(([a], [b]) => columnOrder(a) - columnOrder(b)),
        ),
        skipped,
      },
      null,
      2,
    ),
  );
  console.log(`\nwritten: ${OUT_DIR}results.md, ${OUT_DIR}results.json`);
}

try {
  await main();
} catch (e) {
  console.error(`bench failed: ${e instanceof Error ? e.message : e}`);
  await killChildren();
  Deno.exit(1);
}
