/**
 * The measurements of a run: the idle test and the churn test of each subject, each on a fresh
 * instance, then the load tests (load_tests.ts) in rounds with the columns interleaved, after a
 * warm-up of each column. A
 * column that may fail ({@link optional}) is skipped or dropped with its reason instead.
 *
 * @module
 */
import { type ChurnResult, churnRss } from "./churn.ts";
import {
  type BulkResult,
  type BusyResult,
  summarizeBulk,
  summarizeBusy,
  summarizeWrk,
  type WrkResult,
  wrkRun,
} from "./load.ts";
import { type Column, type LoadTest, loadTests, type SyscallRun } from "./load_tests.ts";
import { type IdleResult, idleRss } from "./idle_conns.ts";
import type { Nginx } from "./nginx.ts";
import type { Backends, Proxy } from "./proxy.ts";
import type { QuicResult } from "./quic.ts";
import type { Settings } from "./settings.ts";
import { type StarveResult, summarizeStarve } from "./starve.ts";
import { optional, type Subject } from "./subjects.ts";

/** Syscalls of the proxy's processes per new connection, over all rounds. */
export interface SyscallResult {
  perConnection: number;
  /** every round's syscalls per connection, in order */
  runs: number[];
}

/** What one column measured; absent parts were not run. */
export interface ModeResult {
  /** whether a proxy (ours or a peer) was in the path (the proxy-process figures exist) */
  proxied: boolean;
  peer: boolean;
  bulk?: BulkResult;
  keepAlive?: WrkResult;
  newConnection?: WrkResult;
  syscalls?: SyscallResult;
  busy?: BusyResult;
  starve?: StarveResult;
  idle?: IdleResult;
  churn?: ChurnResult;
  quic?: QuicResult;
}

/** What the measurements work on and where they put what they find. */
export interface MeasureOptions {
  /** the subjects to measure (prepared: none skipped) */
  subjects: Subject[];
  /** the temporary directory of the run (configs, logs) */
  dir: string;
  /** the TLS backend every column reaches */
  nginx: Nginx;
  /** the backends every column routes to (nginx, and the duplex server if it runs) */
  backends: Backends;
  settings: Settings;
  /** why syscalls cannot be counted here (no perf), or null */
  syscallProblem: string | null;
  /** per column: filled in by the tests */
  results: Map<string, ModeResult>;
  /** per column: why it was skipped or dropped */
  skipped: Record<string, string>;
}

/** The first lines of an error's message, for a one-line reason. */
function firstLines(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n--- its log:")[0]
    .split("\n").slice(0, 3).join(" ");
}

/**
 * Runs `test` on a fresh instance of each subject the memory tests apply to (one proxy process:
 * not the workers column), one after another, and keeps what it says in the column's result.
 */
async function onFreshInstances(
  o: MeasureOptions,
  title: string,
  test: (proxy: Proxy, r: ModeResult) => Promise<string>,
): Promise<void> {
  for (const subject of o.subjects.filter((s) => s.idle && !o.skipped[s.name])) {
    console.log(`${subject.name}: ${title}...`);
    try {
      // fresh: a proxy that served the load tests keeps its grown heap and buffers, and new
      // connections reuse them, so its growth per connection would read near zero
      const proxy = await subject.start(o.dir, o.backends);
      try {
        const r = o.results.get(subject.name) ?? { proxied: true, peer: subject.peer };
        console.log(`  ${await test(proxy, r)}`);
        o.results.set(subject.name, r);
      } finally {
        await proxy.stop();
      }
    } catch (e) {
      if (!optional(subject.name)) throw e;
      o.skipped[subject.name] = firstLines(e);
      console.log(`  skipped: ${o.skipped[subject.name]}`);
    }
  }
}

/** Idle test of each subject, each on a fresh instance of its own. */
export async function measureIdle(o: MeasureOptions): Promise<void> {
  const conns = o.settings.idleConns;
  await onFreshInstances(o, `${conns} idle connections`, async (proxy, r) => {
    const idle = await idleRss(proxy.port, proxy.pids, conns, o.nginx.certPem);
    r.idle = idle;
    return `${idle.kibPerConn.toFixed(1)} KiB per connection ` +
      `(${idle.rssBeforeKiB} → ${idle.rssAfterKiB} KiB)`;
  });
}

/** RSS around many short connections, each subject on a fresh instance of its own. */
export async function measureChurn(o: MeasureOptions): Promise<void> {
  const n = o.settings.churnConns;
  await onFreshInstances(o, `${n} short connections, then 15 s`, async (proxy, r) => {
    const c = await churnRss(o.dir, proxy.port, proxy.pids, n);
    r.churn = c;
    return `RSS ${c.baselineKiB} → ${c.peakKiB} KiB (${c.seconds.toFixed(1)} s), ` +
      `${c.settledKiB} KiB 15 s later`;
  });
}

/**
 * The load tests (bulk, keep-alive, new connections, syscalls, busy, starve), interleaved: each round runs every column
 * once per test (in an order rotated every round), so that a change in the machine's
 * background load hits all columns alike instead of one.
 */
export async function measureLoad(o: MeasureOptions & { withDirect: boolean }): Promise<void> {
  const columns: Column[] = [];
  if (o.withDirect) {
    columns.push(newColumn("direct", o.nginx.port, o.backends.duplexPort, null, null, o.nginx));
  }
  try {
    await startColumns(columns, o);
    await warmUp(columns, o);
    await runRounds(columns, loadTests(o), o.settings.rounds, o.skipped);
  } finally {
    for (const c of columns) await c.proxy?.stop();
  }
  for (const c of columns) {
    const r = o.results.get(c.name) ??
      { proxied: c.proxy !== null, peer: c.subject?.peer ?? false };
    r.bulk = summarizeBulk(c.bulk);
    r.keepAlive = summarizeWrk(c.keepAlive);
    r.newConnection = summarizeWrk(c.newConnection);
    if (c.syscalls.length) r.syscalls = summarizeSyscalls(c.syscalls);
    if (c.busy.length) r.busy = summarizeBusy(c.busy);
    if (c.starve.length) r.starve = summarizeStarve(c.starve);
    o.results.set(c.name, r);
  }
}

function summarizeSyscalls(runs: SyscallRun[]): SyscallResult {
  const sum = (f: (r: SyscallRun) => number) => runs.reduce((s, r) => s + f(r), 0);
  return {
    perConnection: sum((r) => r.syscalls) / sum((r) => r.connections),
    runs: runs.map((r) => r.syscalls / r.connections),
  };
}

function newColumn(
  name: string,
  port: number,
  bulkPort: number | undefined,
  proxy: Proxy | null,
  subject: Subject | null,
  nginx: Nginx,
): Column {
  return {
    name,
    port,
    bulkPort,
    proxy,
    subject,
    watch: { proxy: proxy ? proxy.pids : [], nginx: nginx.pids },
    bulk: [],
    keepAlive: [],
    newConnection: [],
    syscalls: [],
    busy: [],
    starve: [],
  };
}

/**
 * Runs new connections, then keep-alive requests, through every proxied column, unmeasured: a
 * JIT-compiled proxy (ours) compiles its hot code in its first ~10 s of load, which a short
 * measured run would count as cost per connection; in production that happens once. The peers
 * get the same runs.
 */
async function warmUp(columns: Column[], o: MeasureOptions): Promise<void> {
  const wrk = { ...o.settings.wrk, duration: WARM_UP.newConnections };
  for (const c of columns) {
    if (!c.proxy) continue;
    try {
      await wrkRun(c.port, true, wrk, c.watch);
      await wrkRun(c.port, false, { ...wrk, duration: WARM_UP.keepAlive }, c.watch);
      console.log(`warm-up ${c.name}: done`);
    } catch (e) {
      console.log(`warm-up ${c.name}: ${firstLines(e)}`); // its measured runs will say more
    }
  }
}

/** How long each column is warmed up before the load tests. */
const WARM_UP = { newConnections: "8s", keepAlive: "2s" };

/** Starts each subject and adds its column to `columns` (the caller stops them). */
async function startColumns(columns: Column[], o: MeasureOptions): Promise<void> {
  for (const subject of o.subjects) {
    try {
      const proxy = await subject.start(o.dir, o.backends);
      const bulkPort = o.backends.duplexPort && proxy.port;
      columns.push(newColumn(subject.name, proxy.port, bulkPort, proxy, subject, o.nginx));
    } catch (e) {
      if (!optional(subject.name)) throw e;
      o.skipped[subject.name] = firstLines(e);
      console.log(`${subject.name}: skipped: ${o.skipped[subject.name]}`);
    }
  }
}

/**
 * Runs every test on every column, `rounds` times, the columns' order rotated every round. A
 * column that fails is dropped (and stopped) if it is optional; its results so far stay.
 */
async function runRounds(
  columns: Column[],
  tests: LoadTest[],
  rounds: number,
  skipped: Record<string, string>,
): Promise<void> {
  for (let round = 0; round < rounds; round++) {
    for (const test of tests) {
      const order = columns.map((_, i) => columns[(i + round) % columns.length]);
      for (const c of order) {
        if (!columns.includes(c)) continue; // dropped this round
        try {
          const what = await test.run(c);
          console.log(
            `round ${round + 1}/${rounds} ${test.label.padEnd(14)} ${c.name.padEnd(12)} ${what}`,
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
}
