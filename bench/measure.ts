/**
 * The measurements of a run: the idle test of each subject on a fresh instance, then the load
 * tests (bulk, keep-alive, new-connection, busy) in rounds with the columns interleaved. A
 * column that may fail ({@link optional}) is skipped or dropped with its reason instead.
 *
 * @module
 */
import {
  type BulkResult,
  type BulkRun,
  bulkRun,
  type BusyResult,
  type BusyRun,
  busyRun,
  summarizeBulk,
  summarizeBusy,
  summarizeWrk,
  type Watch,
  type WrkResult,
  type WrkRun,
  wrkRun,
} from "./load.ts";
import { type IdleResult, idleRss } from "./idle_conns.ts";
import type { Nginx } from "./nginx.ts";
import type { Proxy } from "./proxy.ts";
import type { Settings } from "./settings.ts";
import { optional, type Subject } from "./subjects.ts";

/** What one column measured; absent parts were not run. */
export interface ModeResult {
  /** whether a proxy (ours or a peer) was in the path (the proxy-process figures exist) */
  proxied: boolean;
  peer: boolean;
  bulk?: BulkResult;
  keepAlive?: WrkResult;
  newConnection?: WrkResult;
  busy?: BusyResult;
  idle?: IdleResult;
}

/** What the measurements work on and where they put what they find. */
export interface MeasureOptions {
  /** the subjects to measure (prepared: none skipped) */
  subjects: Subject[];
  /** the temporary directory of the run (configs, logs) */
  dir: string;
  /** the backend every column reaches */
  nginx: Nginx;
  settings: Settings;
  /** per column: filled in by the tests */
  results: Map<string, ModeResult>;
  /** per column: why it was skipped or dropped */
  skipped: Record<string, string>;
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

/** One load test: runs once on a column, records the run there and says what it measured. */
interface LoadTest {
  label: string;
  run(c: Column): Promise<string>;
}

/** The first lines of an error's message, for a one-line reason. */
function firstLines(e: unknown): string {
  return (e instanceof Error ? e.message : String(e)).split("\n--- its log:")[0]
    .split("\n").slice(0, 3).join(" ");
}

/** Idle test of each subject, each on a fresh instance of its own. */
export async function measureIdle(o: MeasureOptions): Promise<void> {
  const { dir, nginx, results, skipped } = o;
  const conns = o.settings.idleConns;
  for (const subject of o.subjects.filter((s) => s.idle)) {
    console.log(`${subject.name}: ${conns} idle connections...`);
    try {
      // fresh: a proxy that served the load tests keeps its grown heap and buffers, and new
      // connections reuse them, so its growth per connection would read near zero
      const proxy = await subject.start(dir, nginx.port);
      try {
        const idle = await idleRss(proxy.port, proxy.pids, conns, nginx.certPem);
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

/**
 * Bulk, keep-alive, new-connection and busy runs, interleaved: each round runs every column
 * once per test (in an order rotated every round), so that a change in the machine's
 * background load hits all columns alike instead of one.
 */
export async function measureLoad(o: MeasureOptions & { withDirect: boolean }): Promise<void> {
  const columns: Column[] = [];
  if (o.withDirect) columns.push(newColumn("direct", o.nginx.port, null, null, o.nginx));
  try {
    await startColumns(columns, o);
    await runRounds(columns, loadTests(o.settings, o.nginx), o.settings.rounds, o.skipped);
  } finally {
    for (const c of columns) await c.proxy?.stop();
  }
  for (const c of columns) {
    const r = o.results.get(c.name) ??
      { proxied: c.proxy !== null, peer: c.subject?.peer ?? false };
    r.bulk = summarizeBulk(c.bulk);
    r.keepAlive = summarizeWrk(c.keepAlive);
    r.newConnection = summarizeWrk(c.newConnection);
    if (c.busy.length) r.busy = summarizeBusy(c.busy);
    o.results.set(c.name, r);
  }
}

function newColumn(
  name: string,
  port: number,
  proxy: Proxy | null,
  subject: Subject | null,
  nginx: Nginx,
): Column {
  return {
    name,
    port,
    proxy,
    subject,
    watch: { proxy: proxy ? proxy.pids : [], nginx: nginx.pids },
    bulk: [],
    keepAlive: [],
    newConnection: [],
    busy: [],
  };
}

/** Starts each subject and adds its column to `columns` (the caller stops them). */
async function startColumns(columns: Column[], o: MeasureOptions): Promise<void> {
  for (const subject of o.subjects) {
    try {
      const proxy = await subject.start(o.dir, o.nginx.port);
      columns.push(newColumn(subject.name, proxy.port, proxy, subject, o.nginx));
    } catch (e) {
      if (!optional(subject.name)) throw e;
      o.skipped[subject.name] = firstLines(e);
      console.log(`${subject.name}: skipped: ${o.skipped[subject.name]}`);
    }
  }
}

/** The load tests of one round, in the order they run. */
function loadTests(s: Settings, nginx: Nginx): LoadTest[] {
  const wrkLine = (r: WrkRun) => `${r.rps.toFixed(0)} req/s, p99 ${r.p99ms.toFixed(2)} ms`;
  const tests: LoadTest[] = [
    {
      label: "bulk",
      run: async (c) => {
        const r = await bulkRun(c.port, s.bigBytes, c.watch);
        c.bulk.push(r);
        return `${r.mbs.toFixed(0)} MB/s`;
      },
    },
    {
      label: "keep-alive",
      run: async (c) => {
        const r = await wrkRun(c.port, false, s.wrk, c.watch);
        c.keepAlive.push(r);
        return wrkLine(r);
      },
    },
    {
      label: "new-connection",
      run: async (c) => {
        const r = await wrkRun(c.port, true, s.wrk, c.watch);
        c.newConnection.push(r);
        return wrkLine(r);
      },
    },
  ];
  if (s.busyConns <= 0) return tests;
  tests.push({
    label: "busy",
    run: async (c) => {
      const r = await busyRun(c.port, nginx.certPem, s.busy);
      c.busy.push(r);
      const p99 = summarizeBusy([r]).p99ms;
      return `${r.latenciesMs.length} new connections (${r.errors} failed), ` +
        `p99 ${p99.toFixed(2)} ms; bulk ${r.bulkMBs.toFixed(0)} MB/s; TCP memory ` +
        `${(r.tcpMemoryPeak * 100).toFixed(0)}% of tcp_mem pressure`;
    },
  });
  return tests;
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
