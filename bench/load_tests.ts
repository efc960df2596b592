/**
 * The load tests of one round, each run once per column: bulk download, keep-alive,
 * new connections, syscalls per new connection (perf), new connections while paced downloads
 * run (busy), and new connections while unthrottled duplex transfers run (starve). A column
 * collects its runs; measure.ts summarizes them.
 *
 * @module
 */
import {
  type BulkRun,
  bulkRun,
  type BusyRun,
  busyRun,
  percentile,
  summarizeBusy,
  type Watch,
  type WrkRun,
  wrkRun,
} from "./load.ts";
import type { Nginx } from "./nginx.ts";
import type { Proxy } from "./proxy.ts";
import type { Settings } from "./settings.ts";
import { type StarveRun, starveRun } from "./starve.ts";
import type { Subject } from "./subjects.ts";
import { countSyscalls } from "./syscalls.ts";

/** One perf-counted run of new connections. */
export interface SyscallRun {
  syscalls: number;
  connections: number;
}

/** A column being measured: where its clients connect and the runs so far. */
export interface Column {
  name: string;
  port: number;
  /** where the starvation test's transfers connect: the proxy, or the duplex server directly */
  bulkPort: number | undefined;
  watch: Watch;
  proxy: Proxy | null;
  subject: Subject | null;
  bulk: BulkRun[];
  keepAlive: WrkRun[];
  newConnection: WrkRun[];
  syscalls: SyscallRun[];
  busy: BusyRun[];
  starve: StarveRun[];
}

/** One load test: runs once on a column, records the run there and says what it measured. */
export interface LoadTest {
  label: string;
  run(c: Column): Promise<string>;
}

/** What the tests reach besides the columns. */
export interface LoadTestOptions {
  settings: Settings;
  nginx: Nginx;
  /** why syscalls cannot be counted here (no perf), or null */
  syscallProblem: string | null;
}

const wrkLine = (r: WrkRun) => `${r.rps.toFixed(0)} req/s, p99 ${r.p99ms.toFixed(2)} ms`;

/** The load tests of one round, in the order they run. */
export function loadTests(o: LoadTestOptions): LoadTest[] {
  const s = o.settings;
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
  if (s.syscallSeconds > 0 && !o.syscallProblem) tests.push(syscallTest(s));
  if (s.busyConns > 0) tests.push(busyTest(s, o.nginx));
  if (s.starve.transfers > 0) tests.push(starveTest(s));
  return tests;
}

/** Syscalls of the proxy's processes per new connection, in a short wrk run of its own. */
function syscallTest(s: Settings): LoadTest {
  return {
    label: "syscalls",
    run: async (c) => {
      if (!c.proxy) return "no proxy process";
      const wrk = { ...s.wrk, duration: `${s.syscallSeconds}s` };
      const [r, syscalls] = await countSyscalls(
        c.watch.proxy,
        () => wrkRun(c.port, true, wrk, c.watch),
      );
      c.syscalls.push({ syscalls, connections: r.requests });
      return `${(syscalls / r.requests).toFixed(1)} syscalls per connection ` +
        `(${syscalls} for ${r.requests})`;
    },
  };
}

function busyTest(s: Settings, nginx: Nginx): LoadTest {
  return {
    label: "busy",
    run: async (c) => {
      const r = await busyRun(c.port, nginx.certPem, s.busy);
      c.busy.push(r);
      const p99 = summarizeBusy([r]).p99ms;
      return `${r.latenciesMs.length} new connections (${r.errors} failed), ` +
        `p99 ${p99.toFixed(2)} ms; bulk ${r.bulkMBs.toFixed(0)} MB/s; TCP memory ` +
        `${(r.tcpMemoryPeak * 100).toFixed(0)}% of tcp_mem pressure`;
    },
  };
}

function starveTest(s: Settings): LoadTest {
  return {
    label: "starve",
    run: async (c) => {
      if (c.bulkPort === undefined) return "no duplex server";
      const r = await starveRun({ probePort: c.port, bulkPort: c.bulkPort }, s.starve);
      c.starve.push(r);
      return `${r.latenciesMs.length} probes, p50 ${
        percentile(r.latenciesMs, 50).toFixed(1)
      } ms, ` +
        `p99 ${percentile(r.latenciesMs, 99).toFixed(1)} ms, ${r.starved} without ServerHello; ` +
        `transfers ${r.transferMBs.toFixed(0)} MB/s (${r.transferErrors} failed` +
        `${r.transferFirstError ? `, first: ${r.transferFirstError}` : ""}); TCP memory ` +
        `${(r.tcpMemoryPeak * 100).toFixed(0)}% of tcp_mem pressure`;
    },
  };
}
