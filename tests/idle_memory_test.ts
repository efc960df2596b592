/**
 * The proxy's memory with idle connections, measured as the bench measures its idle rows
 * (bench/idle_conns.ts): a fresh proxy started as `deno task start` starts it, a warm-up of 200
 * connections, then VmRSS 6 s after it and 6 s after opening 2,000 real TLS connections (full
 * handshakes with a TLS backend through the proxy) that stay idle; the growth divided by their
 * number. In userspace mode and in kernel mode (splice pipes, and the sockmap).
 *
 * The proxy's own baseline is asserted on its anonymous memory: its file-backed pages are the
 * runtime's code (the deno binary, 40-45 MB of RSS here), which vary by a few MB from run to run
 * with the code paths that happened to run.
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  kernelEbpf,
  kernelSkipReason,
  rawServer,
  readToEnd,
  ROOT,
  type Scope,
  sleep,
  startProxy,
  testCerts,
  writeTempConfig,
} from "./harness/mod.ts";

const SKIP_KERNEL = await kernelSkipReason();
if (SKIP_KERNEL) {
  console.warn(
    `\n!!! SKIPPING the kernel-mode tests of tests/idle_memory_test.ts: ${SKIP_KERNEL}\n`,
  );
}

/** Idle connections measured (the bench's --quick count). */
const IDLE = 2000;
/** The bench's quiet time before each sample: the proxy frees what a burst left after 3 s. */
const SETTLE_MS = 6000;
/**
 * The bounds of each mode. `startAnonKiB`: a fresh proxy's anonymous memory (heap, V8, buffers)
 * 6 s after start. Measured here: userspace and pipe 24.3-25.2 MB, sockmap (libbpf and its
 * loaders in use) 26.6-26.7 MB; before QUIC, node:crypto, the eBPF loaders and the supervisor
 * were loaded only where the config uses them and before the code cache was turned off, 27.4-28.3
 * and 29.2 MB. `kibPerIdle`: RSS per idle connection, HAProxy's 3.1 KiB (bench, 2026-12-07)
 * with a margin for this measurement's noise (userspace and pipe 2.3-3.7 KiB in repeated runs of
 * one build, pipe 4.1 once in a full run on a loaded host: a buffer per idle connection, 16 KiB
 * and up, fails it); sockmap 3.9-5.1 KiB, 6.1-6.6 while each pair kept six buffers and an abort
 * controller.
 */
const BOUNDS = {
  userspace: { startAnonKiB: 26 * 1024, kibPerIdle: 4.5 },
  pipe: { startAnonKiB: 26 * 1024, kibPerIdle: 4.5 },
  sockmap: { startAnonKiB: 28 * 1024, kibPerIdle: 5.5 },
} as const;

/** The proxy's VmRSS and anonymous memory, KiB. */
async function memory(pid: number): Promise<{ rss: number; anon: number }> {
  const text = await Deno.readTextFile(`/proc/${pid}/smaps_rollup`);
  const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, "m").exec(text)![1]);
  return { rss: field("Rss"), anon: field("Anonymous") };
}

/** `n` TLS connections through the proxy (SNI a.test), 100 at a time, handshakes complete. */
async function openIdle(port: number, n: number): Promise<Deno.TlsConn[]> {
  const { caPem } = await testCerts();
  const conns: Deno.TlsConn[] = [];
  try {
    for (let i = 0; i < n; i += 100) {
      await Promise.all(Array.from({ length: Math.min(100, n - i) }, async () => {
        const tcp = await Deno.connect({ hostname: "127.0.0.1", port });
        const tls = await Deno.startTls(tcp, { hostname: "a.test", caCerts: [caPem] });
        conns.push(tls);
        await tls.handshake();
      }));
    }
  } catch (e) {
    closeAll(conns);
    throw e;
  }
  return conns;
}

function closeAll(conns: Deno.Conn[]): void {
  for (const c of conns) {
    try {
      c.close();
    } catch { /* closed */ }
  }
}

/** The proxy as `deno task start` runs it (its flags), one process, `ebpf` as given. */
async function startAsDeployed(s: Scope, backendPort: number, ebpf: Record<string, unknown>) {
  const path = await writeTempConfig({
    workers: 1,
    listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
    routes: [{ match: "a.test", backends: [`127.0.0.1:${backendPort}`] }],
    timeouts: { drain_ms: 1000 },
    limits: { max_connections: 20000 },
    log: { level: "info", file: false, access_log: false },
    ebpf,
  });
  s.defer(() => Deno.remove(path.replace(/\/[^/]*$/, ""), { recursive: true }).catch(() => {}));
  const task = JSON.parse(await Deno.readTextFile(`${ROOT}deno.json`)).tasks.start as string;
  // deno's own flags: those between `run` and `main.ts`
  const words = task.split(" ");
  const flags = words.slice(words.indexOf("run") + 1, words.indexOf("main.ts"));
  return await startProxy(s, {}, {
    env: { DENO_NO_UPDATE_CHECK: "1" },
    command: (
      ready,
    ) => [Deno.execPath(), "run", ...flags, `${ROOT}main.ts`, "--config", path, ...ready],
  });
}

function idleTest(mode: "userspace" | "pipe" | "sockmap"): void {
  const ebpf = mode === "userspace" ? { enabled: false } : kernelEbpf({ splice_mode: mode });
  const bound = BOUNDS[mode];
  e2eTestIdle(
    `a fresh proxy (${mode}) holds under ${bound.startAnonKiB >> 10} MB of anonymous memory, ` +
      `and ${IDLE} idle TLS connections through it take at most ${bound.kibPerIdle} KiB of RSS each`,
    async (s) => {
      // a TLS backend that completes each handshake and holds the connection until it closes
      const backend = await rawServer(s, async (conn) => {
        await (conn as Deno.TlsConn).handshake();
        await readToEnd(conn);
      });
      const proxy = await startAsDeployed(s, backend.port, ebpf);
      assert.equal(proxy.ready.mode, mode === "userspace" ? "userspace" : "kernel");
      await sleep(SETTLE_MS);
      const start = await memory(proxy.pid);
      closeAll(await openIdle(proxy.port(), 200));
      await sleep(SETTLE_MS);
      const before = await memory(proxy.pid);
      const conns = await openIdle(proxy.port(), IDLE);
      let after;
      try {
        await sleep(SETTLE_MS);
        after = await memory(proxy.pid);
      } finally {
        closeAll(conns);
      }
      const perConn = (after.rss - before.rss) / IDLE;
      const total10k = (after.rss + perConn * (10_000 - IDLE)) / 1024;
      console.log(
        `${mode}: at start RSS ${start.rss} KiB (anonymous ${start.anon}); ${IDLE} idle: ` +
          `${before.rss} -> ${after.rss} KiB, ${perConn.toFixed(2)} KiB each; ` +
          `10,000 (linear) ${total10k.toFixed(1)} MB`,
      );
      assert.ok(
        start.anon <= bound.startAnonKiB,
        `anonymous memory at start ${start.anon} KiB, over ${bound.startAnonKiB}`,
      );
      assert.ok(
        perConn <= bound.kibPerIdle,
        `${perConn.toFixed(2)} KiB of RSS per idle connection (${before.rss} -> ${after.rss} KiB)`,
      );
    },
    mode !== "userspace" && SKIP_KERNEL !== null,
  );
}

function e2eTestIdle(name: string, fn: (s: Scope) => Promise<void>, ignore: boolean): void {
  e2eTest(name, fn, { timeoutMs: 90_000, ignore });
}

idleTest("userspace");
idleTest("pipe");
idleTest("sockmap");
