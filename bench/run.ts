/**
 * Benchmark (not a test): on loopback, an nginx TLS backend measured directly, through the
 * proxy in each proxy mode (userspace; kernel = splice pipes; sockmap = eBPF redirect) and
 * through peer SNI proxies (nginx `stream` with `ssl_preread`, HAProxy in tcp mode), in one run.
 *
 *   deno task bench                          direct, userspace, kernel, sockmap, nginx-stream,
 *                                            haproxy
 *   deno task bench --quick                  shorter runs
 *   deno task bench --modes direct,userspace only these columns
 *   deno task bench --idle 0                 skip the idle-connection test
 *   deno task bench --busy 0                 skip the new-connection test under bulk load
 *   deno task bench --starve 0 --churn 0     skip the starvation and churn tests
 *   deno task bench --quic 0                 skip the QUIC test (--quic-only: only it)
 *
 * Reports bulk MB/s (curl TLS download), requests/s with keep-alive and with a new connection
 * per request (wrk), p50/p99 latency, syscalls per new connection (perf), new-connection latency
 * while paced downloads run, time to ServerHello while unthrottled duplex transfers run, CPU per
 * GiB and per request (the whole machine from /proc/stat, since bytes spliced in the kernel
 * cost softirq time and no process time; and the proxy or peer, nginx and the load generator),
 * RSS per idle proxied connection and RSS after many short connections. The load tests run in
 * rounds with the columns interleaved; the table shows medians, ratios to direct and to the
 * better peer, and issue 18's targets met or missed. See README.md. Writes bench/out/results.{json,md}. Every process it starts is
 * stopped at the end, on an error and on SIGINT/SIGTERM.
 *
 * This module is the command line and the order of the run: settings.ts reads the flags,
 * measure.ts runs the tests, metrics.ts and report.ts make the tables.
 *
 * @module
 */
import { measureChurn, measureIdle, measureLoad, type ModeResult } from "./measure.ts";
import { startNginx } from "./nginx.ts";
import { killChildren, need } from "./procs.ts";
import { measureQuic } from "./quic.ts";
import { header, writeReport } from "./report.ts";
import { parseSettings, type Settings, USAGE } from "./settings.ts";
import { startDuplexServer } from "./starve.ts";
import { type Subject, SUBJECTS } from "./subjects.ts";
import { syscallCountingProblem } from "./syscalls.ts";

/** Throws on a column name that is neither direct nor a subject. */
function checkModes(names: string[]): void {
  for (const n of names) {
    if (n !== "direct" && !SUBJECTS.some((s) => s.name === n)) {
      throw new Error(
        `unknown mode ${n} (known: direct, ${SUBJECTS.map((s) => s.name).join(", ")})`,
      );
    }
  }
}

/** The subjects asked for that can run here; the others go to `skipped` with the reason. */
async function prepare(names: string[], skipped: Record<string, string>): Promise<Subject[]> {
  const subjects: Subject[] = [];
  for (const subject of SUBJECTS.filter((s) => names.includes(s.name))) {
    const why = await subject.prepare();
    if (why) {
      skipped[subject.name] = why;
      console.log(`${subject.name}: skipped: ${why}`);
    } else subjects.push(subject);
  }
  return subjects;
}

/** Whether perf can count syscalls here; when it cannot, the syscall rows say why. */
async function syscallProblem(s: Settings, skipped: Record<string, string>) {
  if (s.syscallSeconds <= 0 || s.idleOnly) return null;
  const why = await syscallCountingProblem();
  if (why) {
    skipped["syscalls per new connection"] = why;
    console.log(`syscalls per new connection: skipped: ${why}`);
  }
  return why;
}

/** The QUIC test (see quic.ts), unless it is off; its columns go into `results`. */
async function quic(
  s: Settings,
  dir: string,
  results: Map<string, ModeResult>,
  skipped: Record<string, string>,
): Promise<void> {
  if (s.quic.flows <= 0 || s.idleOnly) return;
  console.log("QUIC: direct, userspace and kernel forwarding");
  await measureQuic({
    dir,
    columns: s.modes,
    options: s.quic,
    record: (column, proxied, r) => {
      const m = results.get(column) ?? { proxied, peer: false };
      results.set(column, { ...m, quic: r });
    },
    skip: (column, why) => skipped[`QUIC ${column}`] = why,
  });
}

/**
 * Starts nginx (and the starvation test's duplex server) in `dir`, runs the tests the settings
 * ask for, stops them.
 */
async function measure(
  s: Settings,
  dir: string,
  results: Map<string, ModeResult>,
  skipped: Record<string, string>,
): Promise<void> {
  const nginx = await startNginx(dir, s.bigBytes);
  const duplex = s.starve.transfers > 0 && !s.idleOnly ? await startDuplexServer() : null;
  try {
    const subjects = await prepare(s.modes, skipped);
    const o = {
      subjects,
      dir,
      nginx,
      backends: { port: nginx.port, duplexPort: duplex?.port },
      settings: s,
      syscallProblem: await syscallProblem(s, skipped),
      results,
      skipped,
    };
    if (s.idleConns > 0) await measureIdle(o);
    if (s.idleOnly) return;
    if (s.churnConns > 0) await measureChurn(o);
    const live = subjects.filter((x) => !skipped[x.name]);
    await measureLoad({ ...o, subjects: live, withDirect: s.modes.includes("direct") });
  } finally {
    await duplex?.stop();
    await nginx.stop();
  }
}

async function main(s: Settings): Promise<void> {
  if (!s.quicOnly) {
    need("nginx", "nginx");
    need("wrk", "wrk");
    need("curl", "curl");
  }
  need("openssl", "openssl");
  if (s.quic.flows > 0 && !s.idleOnly) {
    need("gtlsclient", "ngtcp2-client");
    need("gtlsserver", "ngtcp2-server");
    need("strace", "strace");
  }
  checkModes(s.modes);
  const head = await header(s);
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
    if (!s.quicOnly) await measure(s, dir, results, skipped);
    await quic(s, dir, results, skipped);
  } finally {
    await cleanup();
  }
  await writeReport({ head, settings: s, results, skipped, t0 });
}

const settings = parseSettings(Deno.args);
if (settings.help) {
  console.log(USAGE);
  Deno.exit(0);
}
try {
  await main(settings);
} catch (e) {
  console.error(`bench failed: ${e instanceof Error ? e.message : e}`);
  await killChildren();
  Deno.exit(1);
}
