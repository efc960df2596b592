/**
 * Benchmark (not a test): on loopback, an nginx TLS backend measured directly and through the
 * proxy in each proxy mode (userspace; kernel = eBPF sockmap), in one run.
 *
 *   deno task bench                          direct, userspace, kernel (kernel needs root), ~140 s
 *   deno task bench --quick                  shorter runs (~35 s)
 *   deno task bench --modes direct,userspace only these columns
 *   deno task bench --idle 0                 skip the idle-connection test
 *
 * Reports bulk MB/s (curl TLS download), requests/s with keep-alive and with a new connection
 * per request (wrk), p50/p99 latency, CPU per GiB and per request (the whole machine from
 * /proc/stat, since bytes spliced in the kernel cost softirq time and no process time; and the
 * proxy, nginx and the load generator), and proxy RSS per idle proxied connection. The load
 * tests run in rounds with the columns interleaved; the table shows medians. See README.md.
 * Writes bench/out/results.{json,md}. Every process it starts is stopped at the end, on an
 * error and on SIGINT/SIGTERM.
 *
 * @module
 */
import { parseArgs } from "node:util";
import {
  type BulkResult,
  type BulkRun,
  bulkRun,
  type CpuUse,
  summarizeBulk,
  summarizeWrk,
  type Watch,
  type WrkOptions,
  type WrkResult,
  type WrkRun,
  wrkRun,
} from "./load.ts";
import { type IdleResult, idleRss } from "./idle_conns.ts";
import { type Nginx, SMALL_BYTES, startNginx } from "./nginx.ts";
import { killChildren, need } from "./procs.ts";
import { type Proxy, PROXY_MODES, type ProxyMode, startProxy } from "./proxy.ts";

const OUT_DIR = new URL("./out/", import.meta.url).pathname;

const args = parseArgs({
  args: Deno.args,
  options: {
    quick: { type: "boolean", default: false },
    idle: { type: "string", default: "5000" },
    modes: { type: "string", default: ["direct", ...PROXY_MODES.map((m) => m.name)].join(",") },
    duration: { type: "string" },
    rounds: { type: "string" },
    "idle-only": { type: "boolean", default: false },
    help: { type: "boolean", default: false },
  },
}).values;
if (args.help) {
  console.log(
    "usage: deno task bench [--quick] [--modes direct,userspace,kernel] [--idle N] " +
      "[--duration 5s] [--rounds 3] [--idle-only]",
  );
  Deno.exit(0);
}

const IDLE_CONNS = Number(args.idle);
const BIG_BYTES = (args.quick ? 256 : 1024) * 2 ** 20;
/** Rounds of bulk + keep-alive + new-connection runs, every column once per round. */
const ROUNDS = Number(args.rounds ?? (args.quick ? 2 : 3));
const WRK: WrkOptions = {
  threads: 1,
  connections: 50,
  duration: args.duration ?? (args.quick ? "2s" : "5s"),
};
/** The targets for userspace mode on a 2-core machine. */
const TARGETS = { keepAliveRatio: 0.6, idleKiBPerConn: 24 };

/** What one column measured; absent parts were not run. */
interface ModeResult {
  /** whether the proxy was in the path (the proxy-process figures exist) */
  proxied: boolean;
  bulk?: BulkResult;
  keepAlive?: WrkResult;
  newConnection?: WrkResult;
  idle?: IdleResult;
}

/** A column being measured: where its clients connect and the runs so far. */
interface Column {
  name: string;
  port: number;
  watch: Watch;
  proxy: Proxy | null;
  bulk: BulkRun[];
  keepAlive: WrkRun[];
  newConnection: WrkRun[];
}

/** Idle test of each proxy mode, each on a fresh proxy of its own. */
async function measureIdle(
  modes: ProxyMode[],
  dir: string,
  nginx: Nginx,
  results: Map<string, ModeResult>,
  skipped: Record<string, string>,
): Promise<void> {
  // RSS per connection is one process's figure: the workers column has several processes
  for (const mode of modes.filter((m) => (m.workers ?? 1) === 1)) {
    console.log(`${mode.name}: ${IDLE_CONNS} idle connections...`);
    try {
      // fresh: a proxy that served the load tests keeps its grown heap and buffers, and new
      // connections reuse them, so its growth per connection would read near zero
      const proxy = await startProxy(dir, nginx.port, mode);
      try {
        const idle = await idleRss(proxy.port, proxy.pid, IDLE_CONNS, nginx.certPem);
        results.set(mode.name, { proxied: true, idle });
        console.log(
          `  ${idle.kibPerConn.toFixed(1)} KiB per connection ` +
            `(${idle.rssBeforeKiB} → ${idle.rssAfterKiB} KiB)`,
        );
      } finally {
        await proxy.stop();
      }
    } catch (e) {
      if (mode.name !== "kernel") throw e;
      skipped[mode.name] = firstLines(e);
      console.log(`  skipped: ${skipped[mode.name]}`);
    }
  }
}

/**
 * Bulk, keep-alive and new-connection runs, interleaved: each round runs every column once per
 * test (in an order rotated every round), so that a change in the machine's background load
 * hits all columns alike instead of one.
 */
async function measureLoad(
  modes: ProxyMode[],
  withDirect: boolean,
  dir: string,
  nginx: Nginx,
  results: Map<string, ModeResult>,
  skipped: Record<string, string>,
): Promise<void> {
  const columns: Column[] = [];
  const column = (name: string, port: number, proxy: Proxy | null): Column => ({
    name,
    port,
    proxy,
    watch: { proxy: proxy ? proxy.pids : [], nginx: nginx.pids },
    bulk: [],
    keepAlive: [],
    newConnection: [],
  });
  if (withDirect) columns.push(column("direct", nginx.port, null));
  try {
    for (const mode of modes) {
      try {
        const proxy = await startProxy(dir, nginx.port, mode);
        columns.push(column(mode.name, proxy.port, proxy));
      } catch (e) {
        if (mode.name !== "kernel") throw e;
        skipped[mode.name] = firstLines(e);
        console.log(`${mode.name}: skipped: ${skipped[mode.name]}`);
      }
    }
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
          return `${r.rps.toFixed(0)} req/s, p99 ${r.p99ms.toFixed(2)} ms`;
        },
      },
      {
        label: "new-connection",
        run: async (c: Column) => {
          const r = await wrkRun(c.port, true, WRK, c.watch);
          c.newConnection.push(r);
          return `${r.rps.toFixed(0)} req/s, p99 ${r.p99ms.toFixed(2)} ms`;
        },
      },
    ];
    for (let round = 0; round < ROUNDS; round++) {
      for (const test of tests) {
        const order = columns.map((_, i) => columns[(i + round) % columns.length]);
        for (const c of order) {
          if (!columns.includes(c)) continue; // dropped this round
          try {
            const what = await test.run(c);
            console.log(
              `round ${round + 1}/${ROUNDS} ${test.label.padEnd(14)} ${c.name.padEnd(9)} ${what}`,
            );
          } catch (e) {
            if (c.name !== "kernel") throw e;
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
    const r = results.get(c.name) ?? { proxied: c.proxy !== null };
    r.bulk = summarizeBulk(c.bulk);
    r.keepAlive = summarizeWrk(c.keepAlive);
    r.newConnection = summarizeWrk(c.newConnection);
    results.set(c.name, r);
  }
}

/** Position of a column in the table: direct, then the proxy modes in their list order. */
function columnOrder(name: string): number {
  return ["direct", ...PROXY_MODES.map((m) => m.name)].indexOf(name);
}

/** The first lines of an error's message, for a one-line reason. */
function firstLines(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n--- its log:")[0]
    .split("\n").slice(0, 3).join(" ");
}

type Metric = [
  label: string,
  get: (r: ModeResult, direct?: ModeResult) => number | undefined,
  digits: number,
  /** false: no ratio columns (a difference of small numbers, whose ratio means nothing) */
  ratio?: boolean,
];

function metrics(): Metric[] {
  return [
    ["bulk download MB/s", (r) => r.bulk?.mbs, 0],
    ["bulk: machine CPU s per GiB", (r) => r.bulk?.cpuPerGiB.machine, 2],
    [
      "bulk: machine CPU s per GiB above direct",
      (r, d) =>
        d?.bulk && r !== d
          ? r.bulk && r.bulk.cpuPerGiB.machine - d.bulk.cpuPerGiB.machine
          : undefined,
      2,
    ],
    ["bulk: proxy process CPU s per GiB", (r) => proxyOnly(r, r.bulk?.cpuPerGiB.proxy), 2],
    ["keep-alive requests/s", (r) => r.keepAlive?.rps, 0],
    ["keep-alive p50 ms", (r) => r.keepAlive?.p50ms, 2],
    ["keep-alive p99 ms", (r) => r.keepAlive?.p99ms, 2],
    ["keep-alive: machine CPU µs per request", (r) => r.keepAlive?.cpuUsPerRequest.machine, 1],
    [
      "keep-alive: proxy CPU µs per request",
      (r) => proxyOnly(r, r.keepAlive?.cpuUsPerRequest.proxy),
      1,
    ],
    ["keep-alive: nginx CPU µs per request", (r) => r.keepAlive?.cpuUsPerRequest.nginx, 1],
    ["keep-alive: wrk CPU µs per request", (r) => r.keepAlive?.cpuUsPerRequest.client, 1],
    [
      "keep-alive: rest of machine µs per request",
      (r) => rest(r.keepAlive?.cpuUsPerRequest),
      1,
      false,
    ],
    ["new-connection requests/s", (r) => r.newConnection?.rps, 0],
    ["new-connection p50 ms", (r) => r.newConnection?.p50ms, 2],
    ["new-connection p99 ms", (r) => r.newConnection?.p99ms, 2],
    [
      "new-connection: proxy CPU µs per request",
      (r) => proxyOnly(r, r.newConnection?.cpuUsPerRequest.proxy),
      1,
    ],
    [`proxy RSS KiB per idle connection (${IDLE_CONNS})`, (r) => r.idle?.kibPerConn, 1],
    ["idle: of which anonymous KiB per connection", (r) => r.idle?.anonKibPerConn, 1],
    [`idle: seconds to open ${IDLE_CONNS} TLS connections`, (r) => r.idle?.openSeconds, 1],
    [`idle: seconds until the proxy closed them all`, (r) => r.idle?.closeSeconds, 1],
  ];
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

/** The Markdown table: one column per mode, then ratios to direct and to the first proxy mode. */
function table(results: Map<string, ModeResult>): string {
  const names = [...results.keys()].sort((a, b) => columnOrder(a) - columnOrder(b));
  const direct = results.get("direct");
  const proxies = names.filter((n) => n !== "direct");
  const ratios: [string, string][] = [
    ...(direct ? proxies.map((p) => [p, "direct"] as [string, string]) : []),
    ...proxies.slice(1).map((p) => [p, proxies[0]] as [string, string]),
  ];
  const fmt = (v: number | undefined, digits: number) =>
    v === undefined || !Number.isFinite(v) ? "–" : v.toFixed(digits);
  const head = ["metric", ...names, ...ratios.map(([a, b]) => `${a}/${b}`)];
  const rows = metrics().map(([label, get, digits, ratio = true]) => {
    const value = (n: string) => get(results.get(n)!, direct);
    return [
      label,
      ...names.map((n) => fmt(value(n), digits)),
      ...ratios.map(([a, b]) => {
        if (!ratio) return "–";
        const x = value(a);
        const y = value(b);
        return x === undefined || y === undefined || !y ? "–" : `${(x / y).toFixed(2)}x`;
      }),
    ];
  });
  return [
    `| ${head.join(" | ")} |`,
    `| ${head.map(() => "---").join(" | ")} |`,
    ...rows.map((r) => `| ${r.join(" | ")} |`),
  ].join("\n");
}

/** The targets of userspace mode, met or missed, as sentences. */
function targetLines(results: Map<string, ModeResult>): string[] {
  const direct = results.get("direct");
  const user = results.get("userspace");
  const lines: string[] = [];
  if (direct?.keepAlive && user?.keepAlive) {
    const ratio = user.keepAlive.rps / direct.keepAlive.rps;
    // the runs of one round ran back to back: their ratios see the same background load
    const paired = user.keepAlive.runs.length === direct.keepAlive.runs.length
      ? user.keepAlive.runs.map((u, i) => (u / direct.keepAlive!.runs[i]).toFixed(2)).join(", ")
      : "–";
    lines.push(
      `userspace keep-alive requests/s: ${ratio.toFixed(3)}x direct (per round: ${paired}; ` +
        `target ≥ ${TARGETS.keepAliveRatio}x): ` +
        (ratio >= TARGETS.keepAliveRatio ? "met" : "MISSED"),
    );
  }
  if (user?.idle) {
    const k = user.idle.kibPerConn;
    lines.push(
      `userspace RSS per idle connection: ${k.toFixed(1)} KiB (target ≤ ` +
        `${TARGETS.idleKiBPerConn} KiB): ${k <= TARGETS.idleKiBPerConn ? "met" : "MISSED"}`,
    );
  }
  for (const [name, r] of results) {
    for (const w of [r.keepAlive, r.newConnection]) {
      for (const e of w?.socketErrors ?? []) lines.push(`${name}: wrk socket errors: ${e}`);
    }
  }
  return lines;
}

async function header(): Promise<string> {
  const cpu = (await Deno.readTextFile("/proc/cpuinfo")).match(/model name\s*:\s*(.*)/)?.[1];
  const load = (await Deno.readTextFile("/proc/loadavg")).split(" ").slice(0, 3).join(" ");
  return `sni-proxy bench ${new Date().toISOString()} — ${navigator.hardwareConcurrency} CPUs ` +
    `(${cpu}), load before ${load}, kernel ${Deno.osRelease()}, deno ${Deno.version.deno}; ` +
    `${ROUNDS} rounds, columns interleaved, medians: bulk ${BIG_BYTES / 2 ** 20} MiB (curl); ` +
    `wrk -t${WRK.threads} -c${WRK.connections} -d${WRK.duration}, ${SMALL_BYTES} B responses; ` +
    `nginx 1 worker`;
}

async function main(): Promise<void> {
  need("nginx", "nginx");
  need("wrk", "wrk");
  need("curl", "curl");
  need("openssl", "openssl");
  const names = args.modes.split(",").map((s) => s.trim()).filter(Boolean);
  for (const n of names) {
    if (n !== "direct" && !PROXY_MODES.some((m) => m.name === n)) {
      throw new Error(
        `unknown mode ${n} (known: direct, ${PROXY_MODES.map((m) => m.name).join(", ")})`,
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
      console.error(`\n${sig}: stopping nginx and the proxy`);
      cleanup().finally(() => Deno.exit(130));
    });
  }
  const results = new Map<string, ModeResult>();
  const skipped: Record<string, string> = {};
  const t0 = performance.now();
  try {
    const nginx = await startNginx(dir, BIG_BYTES);
    try {
      const modes: ProxyMode[] = [];
      for (const mode of PROXY_MODES.filter((m) => names.includes(m.name))) {
        const why = await mode.prepare?.();
        if (why) {
          skipped[mode.name] = why;
          console.log(`${mode.name}: skipped: ${why}`);
        } else modes.push(mode);
      }
      if (IDLE_CONNS > 0) await measureIdle(modes, dir, nginx, results, skipped);
      if (!args["idle-only"]) {
        const live = modes.filter((m) => !skipped[m.name]);
        await measureLoad(live, names.includes("direct"), dir, nginx, results, skipped);
      }
    } finally {
      await nginx.stop();
    }
  } finally {
    await cleanup();
  }
  const md = [
    head,
    "",
    table(results),
    "",
    ...targetLines(results).map((l) => `- ${l}`),
    ...Object.entries(skipped).map(([m, why]) => `- ${m} mode skipped: ${why}`),
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
        settings: { bigBytes: BIG_BYTES, rounds: ROUNDS, wrk: WRK, idleConns: IDLE_CONNS },
        targets: TARGETS,
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
