/**
 * The proxy in kernel mode, end to end: the real proxy process with `ebpf.enabled`, real TLS
 * clients and backends, the real kernel. Splicing is real (payload never passes through the
 * proxy process, measured from outside with strace, against a userspace control run), bytes
 * arrive intact (full duplex, half-close with a large final write, resets, 2,000 concurrent
 * connections, kernel and userspace sessions side by side), and every fallback path works
 * (no privilege, a verifier-rejected object, clean exit and SIGKILL leave the machine usable),
 * and two kernel-mode proxies on one host work side by side.
 *
 * Needs root, libbpf, clang, bpftool, strace and setpriv; elsewhere every test is skipped with
 * the reason printed. Each proxy keeps its eBPF state to itself (pins under its own dir), so
 * these tests may run beside any other.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { resetSocket } from "../ffi/libc.ts";
import { socketTuple } from "../src/ebpf/sockmap.ts";
import { concat } from "../src/net/bytes.ts";
import { SockDiag } from "../src/conn/tcpinfo.ts";
import {
  assertCleanStop,
  assertStillServes,
  clientHelloBytes,
  cpuTimeMs,
  curl,
  describeMismatch,
  drainHash,
  e2eTest,
  echoHandler,
  entriesAtLeast,
  fdOf,
  GO,
  identityBackend,
  instancePinDir,
  kernelEbpf,
  kernelSkipReason,
  LineReader,
  pairEntries,
  positionStream,
  type ProxyProcess,
  randomPool,
  rawBackend,
  rawServer,
  rawSpliced,
  readExact,
  readOutcome,
  readToEnd,
  ROOT,
  type Scope,
  sendRandom,
  sha256,
  sleep,
  startKernelProxy,
  startProxy,
  type SyscallBytes,
  SyscallMeter,
  testCerts,
  tlsConnect,
  unusedPort,
  verifierRejectedObject,
  waitPairEntries,
  whoAnswers,
  within,
  writeAll,
  writeRandomSizes,
} from "./harness/mod.ts";

const SKIP = await kernelSkipReason();
if (SKIP) console.warn(`\n!!! SKIPPING tests/e2e_kernel_test.ts (proxy in kernel mode): ${SKIP}\n`);

const MiB = 1 << 20;
const encoder = new TextEncoder();

function ktest(name: string, fn: (scope: Scope) => Promise<void>, timeoutMs: number): void {
  e2eTest(name, fn, { timeoutMs, ignore: SKIP !== null });
}

/** Numbers worth reporting (rates are from a busy 2-core box: observations, not benchmarks). */
function note(text: string): void {
  console.log(`    [measured] ${text}`);
}

const POOL = SKIP ? new Uint8Array(0) : randomPool(32 * MiB);

// ---------------------------------------------------------------------------------------------
// 1. Splicing is real

/** A TLS backend that reads exactly `n` bytes, then answers `BYTES SHA256\n` and closes. */
async function hashingTlsBackend(scope: Scope, n: number) {
  return await rawServer(scope, async (conn) => {
    const hash = createHash("sha256");
    const buf = new Uint8Array(256 * 1024);
    let got = 0;
    while (got < n) {
      const r = await conn.read(buf.subarray(0, Math.min(buf.length, n - got)));
      if (r === null) break;
      hash.update(buf.subarray(0, r));
      got += r;
    }
    await writeAll(conn, encoder.encode(`${got} ${hash.digest("hex")}\n`));
    await (conn as Deno.TlsConn).closeWrite();
    await conn.read(new Uint8Array(64)).catch(() => null);
  });
}

interface UploadResult {
  sent: string;
  answer: string;
  ms: number;
  meter: SyscallBytes;
  cpuMs: number;
  /** TCP payload bytes the client socket sent / received (sock_diag), before close_notify. */
  wireUp: number;
  wireDown: number;
}

/** Uploads `n` random bytes over TLS through the proxy, metering the proxy's syscalls. */
async function meteredUpload(
  scope: Scope,
  proxyPort: number,
  proxyPid: number,
  n: number,
): Promise<UploadResult> {
  const c = await testCerts();
  const tcp = await Deno.connect({ hostname: "127.0.0.1", port: proxyPort });
  const tuple = socketTuple({
    local: tcp.localAddr as Deno.NetAddr,
    remote: tcp.remoteAddr as Deno.NetAddr,
  });
  const conn = await Deno.startTls(tcp, { hostname: "a.test", caCerts: [c.caPem] });
  scope.defer(() => conn.close());
  await conn.handshake();
  const meter = await SyscallMeter.attach(scope, proxyPid);
  const cpu0 = await cpuTimeMs(proxyPid);
  const t0 = performance.now();
  const sent = await sendRandom(conn, POOL, n);
  const answer = await within(120_000, "backend's hash", new LineReader(conn).line());
  const ms = performance.now() - t0;
  const cpuMs = (await cpuTimeMs(proxyPid)) - cpu0;
  const used = await meter.stop();
  using diag = SockDiag.open();
  const info = diag.query(tuple);
  assert.ok(info, "client socket still exists");
  conn.close();
  return {
    sent: `${n} ${sent}`,
    answer: answer ?? "EOF",
    ms,
    meter: used,
    cpuMs,
    wireUp: info.bytesSent,
    wireDown: info.bytesReceived,
  };
}

const SPLICE_BYTES = 256 * MiB;
const CONTROL_BYTES = 64 * MiB;

ktest(
  "kernel mode: a 256 MiB TLS upload is spliced in the kernel; the proxy process moves < 4 KiB of it through sockets (userspace control: all of it)",
  async (scope) => {
    const kb = await hashingTlsBackend(scope, SPLICE_BYTES);
    const routes = [{ match: "a.test", backends: [kb.address] }];
    const listeners = [{ address: "127.0.0.1:0", protocol: "tls" }];
    const proxy = await startKernelProxy(scope, { listeners, routes, ebpf: kernelEbpf() });
    const k = await meteredUpload(scope, proxy.port(), proxy.pid, SPLICE_BYTES);
    assert.equal(k.answer, k.sent, "backend got every byte, in order (count and sha256)");
    const entry = await proxy.waitAccess((e) => e.backend === kb.address);
    assert.equal(entry.mode, "kernel", JSON.stringify(entry));
    assert.equal(entry.close_reason, "done", JSON.stringify(entry));
    // the TLS records on the wire: everything the client's socket sent (plus close_notify, 24
    // bytes, sent at close) and received
    assert.ok(
      entry.bytes_up >= k.wireUp && entry.bytes_up <= k.wireUp + 64,
      `bytes_up ${entry.bytes_up} = client's wire bytes ${k.wireUp} (+ close_notify)`,
    );
    assert.ok(entry.bytes_up > SPLICE_BYTES, "bytes_up counts the spliced payload");
    // the client's received count may include the backend's FIN (1) or not yet its
    // close_notify
    assert.ok(
      entry.bytes_down >= k.wireDown - 1 && entry.bytes_down <= k.wireDown + 64,
      `bytes_down ${entry.bytes_down} = client's received wire bytes ${k.wireDown}`,
    );
    note(
      `kernel mode: ${SPLICE_BYTES / MiB} MiB TLS upload in ${k.ms.toFixed(0)} ms ` +
        `(${
          (SPLICE_BYTES / MiB / (k.ms / 1000)).toFixed(0)
        } MiB/s end to end); proxy read ${k.meter.read} B, ` +
        `wrote ${k.meter.written} B in ${k.meter.calls} syscalls ${
          JSON.stringify(k.meter.bySyscall)
        }; proxy CPU ${k.cpuMs} ms`,
    );
    assert.ok(k.meter.read < MiB, `proxy read ${k.meter.read} bytes of a ${SPLICE_BYTES} upload`);
    assert.ok(k.meter.written < MiB, `proxy wrote ${k.meter.written} bytes`);
    // through sockets (Deno reads and writes them with recvfrom/sendto; the rest is files, such
    // as the CA bundle Deno reads once): a few KiB of netlink queries, no payload
    const socketBytes = ["recvfrom", "sendto", "recvmsg", "sendmsg"]
      .reduce((sum, name) => sum + (k.meter.bySyscall[name] ?? 0), 0);
    assert.ok(socketBytes < 4096, `proxy moved ${socketBytes} bytes through sockets`);
    await assertCleanStop(proxy);

    // control: the same meter sees the payload when the proxy relays it in userspace
    const ub = await hashingTlsBackend(scope, CONTROL_BYTES);
    const uproxy = await startProxy(scope, {
      listeners,
      routes: [{ match: "a.test", backends: [ub.address] }],
      ebpf: { enabled: false },
    });
    assert.match(uproxy.stderr(), /ready: .*mode userspace/);
    const u = await meteredUpload(scope, uproxy.port(), uproxy.pid, CONTROL_BYTES);
    assert.equal(u.answer, u.sent);
    const uentry = await uproxy.waitAccess((e) => e.backend === ub.address);
    assert.equal(uentry.mode, "userspace");
    note(
      `userspace control: ${CONTROL_BYTES / MiB} MiB in ${u.ms.toFixed(0)} ms ` +
        `(${
          (CONTROL_BYTES / MiB / (u.ms / 1000)).toFixed(0)
        } MiB/s, under strace); proxy read ${u.meter.read} B, ` +
        `wrote ${u.meter.written} B in ${u.meter.calls} syscalls; proxy CPU ${u.cpuMs} ms`,
    );
    assert.ok(u.meter.read >= CONTROL_BYTES, `userspace proxy read ${u.meter.read}`);
    assert.ok(u.meter.written >= CONTROL_BYTES, `userspace proxy wrote ${u.meter.written}`);
    await assertCleanStop(uproxy);
  },
  120_000,
);

// ---------------------------------------------------------------------------------------------
// 2. Integrity

/** A kernel-mode proxy routing `a.test` to a raw backend the test drives by hand. */
async function rawKernelProxy(scope: Scope, extra: Record<string, unknown> = {}) {
  const backend = rawBackend(scope);
  const identity = await identityBackend(scope, "B");
  const proxy = await startKernelProxy(scope, {
    listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
    routes: [
      { match: "b.test", backends: [identity.address] },
      { match: "a.test", backends: [backend.address] },
    ],
    ebpf: kernelEbpf(),
    ...extra,
  });
  return { proxy, backend };
}

// 1 GiB each way takes ~7 s here (the test's own sha256 of 4 GiB dominates); the 20 rounds the
// issue asks for would add over two minutes to every CI run, so CI runs two and
// SNI_DUPLEX_ROUNDS=20 runs them all (see the closing notes for such a run)
const DUPLEX_BYTES = 1024 * MiB;
const DUPLEX_ROUNDS = Number(Deno.env.get("SNI_DUPLEX_ROUNDS") ?? 2);

ktest(
  `kernel mode: ${DUPLEX_ROUNDS} x ${
    DUPLEX_BYTES / MiB
  } MiB each way at once, random write sizes, arrive intact`,
  async (scope) => {
    const { proxy, backend } = await rawKernelProxy(scope);
    for (let round = 1; round <= DUPLEX_ROUNDS; round++) {
      const { conn: client, helloBytes } = await rawSpliced(proxy.port(), "a.test");
      const server = await backend.next();
      const t0 = performance.now();
      const [up, down, atBackend, atClient] = await Promise.all([
        sendRandom(client, POOL, DUPLEX_BYTES, { closeWrite: true }),
        sendRandom(server, POOL, DUPLEX_BYTES, { closeWrite: true }),
        drainHash(server),
        drainHash(client),
      ]);
      const ms = performance.now() - t0;
      client.close();
      server.close();
      assert.deepEqual(atBackend, { bytes: DUPLEX_BYTES, sha256: up }, `round ${round} upstream`);
      assert.deepEqual(
        atClient,
        { bytes: DUPLEX_BYTES, sha256: down },
        `round ${round} downstream`,
      );
      const entries = await entriesAtLeast(proxy, backend.address, round);
      const e = entries[round - 1];
      assert.equal(e.mode, "kernel", JSON.stringify(e));
      assert.equal(e.close_reason, "done", JSON.stringify(e));
      assert.equal(e.bytes_up, helloBytes + DUPLEX_BYTES, "bytes_up: hello + payload");
      assert.equal(e.bytes_down, 1 + DUPLEX_BYTES, "bytes_down: GO byte + payload");
      note(
        `round ${round}: ${DUPLEX_BYTES / MiB} MiB each way in ${ms.toFixed(0)} ms ` +
          `(${(2 * DUPLEX_BYTES / MiB / (ms / 1000)).toFixed(0)} MiB/s both ways together)`,
      );
    }
    assert.doesNotMatch(proxy.stderr(), /half-closing anyway/, "no drain timeout at the end");
    assert.equal(await waitPairEntries(proxy.pid, 0), 0, "pair-map entries removed");
    await assertCleanStop(proxy);
  },
  Math.max(120_000, DUPLEX_ROUNDS * 15_000),
);

const HALF_CLOSE_BYTES = 64 * MiB;

ktest(
  "kernel mode: half-close right after a 64 MiB final write loses nothing, either direction",
  async (scope) => {
    const { proxy, backend } = await rawKernelProxy(scope);
    for (let round = 0; round < 3; round++) {
      // backend → client: the backend writes 64 MiB and shuts its write side at once
      {
        const { conn: client } = await rawSpliced(proxy.port(), "a.test");
        const server = await backend.next();
        const [sent, got] = await Promise.all([
          sendRandom(server, POOL, HALF_CLOSE_BYTES, { closeWrite: true }),
          drainHash(client),
        ]);
        assert.deepEqual(got, { bytes: HALF_CLOSE_BYTES, sha256: sent }, "client got every byte");
        // the other direction still flows after the half-close
        await writeAll(client, encoder.encode("after-eof"));
        await client.closeWrite();
        assert.equal(new TextDecoder().decode(await readExact(server, 9)), "after-eof");
        assert.equal((await readOutcome(server)).kind, "eof");
        client.close();
        server.close();
      }
      // client → backend: the client writes 64 MiB and shuts its write side at once
      {
        const { conn: client } = await rawSpliced(proxy.port(), "a.test");
        const server = await backend.next();
        const [sent, got] = await Promise.all([
          sendRandom(client, POOL, HALF_CLOSE_BYTES, { closeWrite: true }),
          drainHash(server),
        ]);
        assert.deepEqual(got, { bytes: HALF_CLOSE_BYTES, sha256: sent }, "backend got every byte");
        await writeAll(server, encoder.encode("after-eof"));
        await server.closeWrite();
        assert.equal(new TextDecoder().decode(await readExact(client, 9)), "after-eof");
        assert.equal((await readOutcome(client)).kind, "eof");
        client.close();
        server.close();
      }
    }
    const entries = await entriesAtLeast(proxy, backend.address, 6);
    for (const e of entries) {
      assert.equal(e.mode, "kernel", JSON.stringify(e));
      assert.equal(e.close_reason, "done", JSON.stringify(e));
    }
    assert.doesNotMatch(proxy.stderr(), /half-closing anyway/, "no drain timeout");
    assert.equal(await waitPairEntries(proxy.pid, 0), 0, "pair-map entries removed");
    await assertCleanStop(proxy);
  },
  90_000,
);

/** Waits until a read on `conn` ends (EOF or error), failing after `ms`. */
async function seesClose(conn: Deno.Conn, ms: number, what: string): Promise<string> {
  return await within(
    ms,
    what,
    (async () => {
      const buf = new Uint8Array(64 * 1024);
      for (;;) {
        try {
          if ((await conn.read(buf)) === null) return "eof";
        } catch (e) {
          return (e as Error).name;
        }
      }
    })(),
  );
}

for (
  const [side, halfClosed] of [
    ["client", false],
    ["backend", false],
    ["client", true],
    ["backend", true],
  ] as const
) {
  ktest(
    `kernel mode: a ${side} reset${
      halfClosed ? " after its half-close" : ""
    } arrives as a reset on the other side, removes the pairing, and the proxy keeps serving`,
    async (scope) => {
      const { proxy, backend } = await rawKernelProxy(scope);
      const { conn: client } = await rawSpliced(proxy.port(), "a.test");
      const server = await backend.next();
      assert.equal(await waitPairEntries(proxy.pid, 2), 2, "the session is paired");
      const [resetting, other] = side === "client" ? [client, server] : [server, client];
      if (halfClosed) {
        await resetting.closeWrite();
        assert.equal(await other.read(new Uint8Array(1)), null, "the half-close is passed on");
      }
      await writeAll(other, POOL.subarray(0, 64 * 1024));
      await sleep(200);
      // a reset and nothing else (Deno's close would send a FIN first)
      assert.equal(resetSocket(fdOf(resetting)), 0);
      resetting.close();
      const how = await seesClose(other, 5000, `the other side sees the ${side}'s reset`);
      other.close();
      const e = await proxy.waitAccess((e) => e.backend === backend.address);
      assert.equal(e.close_reason, `${side}_reset`, JSON.stringify(e));
      assert.equal(e.mode, "kernel");
      assert.equal(await waitPairEntries(proxy.pid, 0), 0, "pair-map entries removed");
      // after a half-close the other side has read its EOF already: reads end there
      if (!halfClosed) assert.equal(how, "ConnectionReset", `the ${side}'s reset arrives as one`);
      await assertStillServes(proxy, "b.test", "B");
      const served = await proxy.waitAccess((e) => e.sni === "b.test");
      assert.equal(served.mode, "kernel", "the follow-up TLS session was spliced");
      await assertCleanStop(proxy);
    },
    30_000,
  );
}

/**
 * Echoes until EOF, then half-closes; small buffer so 2,000 of them stay cheap. Pushes the
 * byte count it received to `received` at EOF (to tell which way bytes went missing).
 */
async function echo(conn: Deno.TcpConn, received?: number[]): Promise<void> {
  const buf = new Uint8Array(16 * 1024);
  let total = 0;
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    total += n;
    await writeAll(conn, buf.subarray(0, n));
  }
  received?.push(total);
  await conn.closeWrite();
  await conn.read(buf).catch(() => null);
}

const ROUND_TRIPS = 2000;

ktest(
  "kernel mode: traffic on spliced connections does not wake the proxy (control: in userspace mode every message does)",
  async (scope) => {
    const backend = rawBackend(scope, echo);
    const routes = [{ match: "a.test", backends: [backend.address] }];
    const listeners = [{ address: "127.0.0.1:0", protocol: "tls" }];
    const message = new Uint8Array(200).fill(7);
    /** Wakeups of the proxy process during ROUND_TRIPS request/answer exchanges on 4 conns. */
    const wakeups = async (proxy: ProxyProcess) => {
      const sessions = await Promise.all(
        Array.from({ length: 4 }, () => rawSpliced(proxy.port(), "a.test")),
      );
      scope.defer(() => sessions.forEach((s) => s.conn.close()));
      const meter = await SyscallMeter.attach(scope, proxy.pid);
      await Promise.all(sessions.map(async ({ conn }) => {
        for (let i = 0; i < ROUND_TRIPS / sessions.length; i++) {
          await writeAll(conn, message);
          assert.deepEqual(await readExact(conn, message.length), message);
        }
      }));
      const used = await meter.stop();
      for (const { conn } of sessions) conn.close();
      return used;
    };
    const proxy = await startKernelProxy(scope, { listeners, routes, ebpf: kernelEbpf() });
    const k = await wakeups(proxy);
    await assertCleanStop(proxy);
    const uproxy = await startProxy(scope, { listeners, routes, ebpf: { enabled: false } });
    const u = await wakeups(uproxy);
    await assertCleanStop(uproxy);
    note(
      `${ROUND_TRIPS} round trips of ${message.length} B: kernel mode woke the proxy ` +
        `${k.wakeups} times and it moved ${k.read + k.written} B; userspace mode ` +
        `${u.wakeups} times, ${u.read + u.written} B`,
    );
    // the 4 conns' messages may share a wakeup
    assert.ok(u.wakeups >= ROUND_TRIPS / 8, `userspace control woke ${u.wakeups} times`);
    assert.ok(u.read >= ROUND_TRIPS * message.length, `userspace control read ${u.read} B`);
    // spliced sockets are watched for input and EOF only: a handful of wakeups at most (timers)
    assert.ok(k.wakeups < 50, `kernel mode woke the proxy ${k.wakeups} times`);
    // through its sockets (the engine's recv/send): a file the runtime reads meanwhile (it loads
    // the system's CA bundle, 220 KB, once at some point after start) is no payload
    const socketBytes = ["recvfrom", "sendto", "recvmsg", "sendmsg"]
      .reduce((n, call) => n + (k.bySyscall[call] ?? 0), 0);
    assert.ok(
      socketBytes < 4096,
      `kernel mode moved no payload through the process: ${JSON.stringify(k.bySyscall)}`,
    );
  },
  60_000,
);

ktest(
  "kernel mode: an idle spliced connection ends at idle_ms; at SIGTERM a busy one ends at drain_ms and the proxy exits 0",
  async (scope) => {
    const backend = rawBackend(scope, echo);
    const routes = [{ match: "a.test", backends: [backend.address] }];
    const listeners = [{ address: "127.0.0.1:0", protocol: "tls" }];
    const ping = new Uint8Array([1, 2, 3]);

    const idle = await startKernelProxy(scope, {
      listeners,
      routes,
      ebpf: kernelEbpf(),
      timeouts: { idle_ms: 400 },
    });
    const quiet = await rawSpliced(idle.port(), "a.test");
    scope.defer(() => quiet.conn.close());
    await writeAll(quiet.conn, ping);
    assert.deepEqual(await readExact(quiet.conn, ping.length), ping, "spliced echo works");
    const t0 = performance.now();
    await seesClose(quiet.conn, 5000, "the idle connection closed");
    const idleMs = performance.now() - t0;
    const e = await idle.waitAccess((e) => e.backend === backend.address);
    assert.equal(e.mode, "kernel", JSON.stringify(e));
    assert.equal(e.close_reason, "idle_timeout", JSON.stringify(e));
    assert.ok(idleMs >= 350, `closed after ${idleMs.toFixed(0)} ms of silence, not before`);
    await assertCleanStop(idle);

    const drain = await startKernelProxy(scope, {
      listeners,
      routes,
      ebpf: kernelEbpf(),
      timeouts: { drain_ms: 500 },
    });
    const busy = await rawSpliced(drain.port(), "a.test");
    scope.defer(() => busy.conn.close());
    // keep it busy through the drain: an echo every 20 ms
    let echoes = 0;
    const talking = (async () => {
      try {
        for (;;) {
          await writeAll(busy.conn, ping);
          await readExact(busy.conn, ping.length);
          echoes++;
          await sleep(20);
        }
      } catch {
        // closed by the proxy
      }
    })();
    await sleep(100);
    const t1 = performance.now();
    assert.equal(await drain.stop(), 0, `exit code after SIGTERM; output:\n${drain.stderr()}`);
    const stopMs = performance.now() - t1;
    await within(5000, "the busy connection closed", talking);
    assert.ok(echoes > 5, `${echoes} echoes before the drain ended`);
    assert.ok(stopMs >= 450 && stopMs < 5000, `exited ${stopMs.toFixed(0)} ms after SIGTERM`);
    assert.match(drain.stderr(), /drain time over: closing 1 connection/);
    const d = (await drain.access()).find((e) => e.backend === backend.address);
    assert.equal(d?.close_reason, "shutdown", JSON.stringify(d));
    assert.equal(d?.mode, "kernel", JSON.stringify(d));
  },
  60_000,
);

const CONCURRENT = 2000;

ktest(
  "kernel mode: 2,000 concurrent spliced connections all echo their random payloads intact",
  async (scope) => {
    const backend = rawBackend(scope, echo);
    const proxy = await startKernelProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [backend.address] }],
      ebpf: kernelEbpf(),
      log: { level: "info" },
    });
    const t0 = performance.now();
    const sessions: { conn: Deno.TcpConn; helloBytes: number }[] = [];
    // open in waves (the listen backlog is finite), keep every one open
    for (let i = 0; i < CONCURRENT; i += 200) {
      const wave = await Promise.all(
        Array.from(
          { length: Math.min(200, CONCURRENT - i) },
          () => rawSpliced(proxy.port(), "a.test"),
        ),
      );
      sessions.push(...wave);
    }
    scope.defer(() => sessions.forEach((s) => s.conn.close()));
    const openMs = performance.now() - t0;
    assert.equal(
      await pairEntries(proxy.pid),
      2 * CONCURRENT,
      "all 2,000 are paired at the same time",
    );
    const sizes = sessions.map(() => 1 + Math.floor(Math.random() * 64 * 1024));
    const t1 = performance.now();
    const bad: number[] = [];
    await Promise.all(sessions.map(async ({ conn }, i) => {
      const [sent, got] = await Promise.all([
        sendRandom(conn, POOL, sizes[i], { maxWrite: 16 * 1024, closeWrite: true }),
        drainHash(conn),
      ]);
      if (got.bytes !== sizes[i] || got.sha256 !== sent) bad.push(i);
      conn.close();
    }));
    const echoMs = performance.now() - t1;
    const entries = await within(
      20_000,
      "2,000 access entries",
      (async () => {
        for (;;) {
          const e = await proxy.access();
          if (e.length >= CONCURRENT) return e;
          await sleep(100);
        }
      })(),
    );
    const byClient = new Map(entries.map((e) => [e.client, e]));
    const entryOf = (i: number) => {
      const a = sessions[i].conn.localAddr as Deno.NetAddr;
      return byClient.get(`${a.hostname}:${a.port}`);
    };
    // which way the bytes went missing: the access log has the kernel's per-direction counts
    assert.deepEqual(
      bad.map((i) => {
        const e = entryOf(i);
        return `#${i}: sent ${sizes[i]}, echo lost; proxy counted up ${
          e ? e.bytes_up - sessions[i].helloBytes : "?"
        } down ${e ? e.bytes_down - 1 : "?"} (${e?.mode}, ${e?.close_reason})`;
      }),
      [],
      `${bad.length} of ${CONCURRENT} connections did not echo intact`,
    );
    sessions.forEach(({ helloBytes }, i) => {
      const e = entryOf(i);
      assert.ok(e, `access entry for connection ${i}`);
      assert.equal(e.mode, "kernel", JSON.stringify(e));
      assert.equal(e.close_reason, "done", JSON.stringify(e));
      assert.equal(e.bytes_up, helloBytes + sizes[i], JSON.stringify(e));
      assert.equal(e.bytes_down, 1 + sizes[i], JSON.stringify(e));
    });
    assert.equal(await waitPairEntries(proxy.pid, 0), 0, "pair-map entries removed");
    note(
      `${CONCURRENT} connections opened+paired in ${openMs.toFixed(0)} ms; ` +
        `${(sizes.reduce((a, b) => a + b, 0) / MiB).toFixed(0)} MiB echoed in ${
          echoMs.toFixed(0)
        } ms`,
    );
    await assertCleanStop(proxy);
  },
  90_000,
);

/**
 * `count` TLS connections in a row, each writing `payload` then closing its write side and
 * reading the echo to EOF; returns a line per connection whose echo was not intact.
 */
async function tlsEchoes(port: number, payload: Uint8Array, count: number): Promise<string[]> {
  const want = createHash("sha256").update(payload).digest("hex");
  const bad: string[] = [];
  for (let i = 0; i < count; i++) {
    const conn = await tlsConnect(port, "a.test");
    try {
      const [, got] = await Promise.all([
        writeAll(conn, payload).then(() => conn.closeWrite()),
        drainHash(conn),
      ]);
      if (got.bytes !== payload.length || got.sha256 !== want) {
        bad.push(`#${i}: ${got.bytes} bytes${got.bytes === payload.length ? ", other bytes" : ""}`);
      }
    } catch (e) {
      bad.push(`#${i}: ${(e as Error).name}: ${(e as Error).message}`);
    } finally {
      conn.close();
    }
  }
  return bad;
}

// The backend's last bytes and its FIN often arrive in one segment after the proxy has shut down
// its write side: the backend socket then leaves the sockmap (FIN_WAIT2 -> TIME_WAIT) and those
// bytes reach the proxy process instead of the redirect. Written at once they could overtake
// bytes still in the kernel's redirect queue (TLS: "cannot decrypt"); before the fix about 1 in
// 20 of these echoes broke, so 100 in a row catch a regression almost surely.
ktest(
  "kernel mode: 100 TLS echoes of 1 MiB where the backend closes right after its last write all arrive in order",
  async (scope) => {
    const backend = await rawServer(scope, echoHandler);
    const proxy = await startKernelProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [backend.address] }],
      ebpf: kernelEbpf(),
    });
    const bad = await tlsEchoes(proxy.port(), POOL.subarray(0, MiB), 100);
    assert.deepEqual(bad, [], `${bad.length} of 100 echoes broken`);
    const entries = await entriesAtLeast(proxy, backend.address, 100);
    assert.ok(entries.every((e) => e.mode === "kernel" && e.close_reason === "done"));
    assert.deepEqual(backend.errors, []);
    await assertCleanStop(proxy);
  },
  90_000,
);

ktest(
  "kernel mode with workers: 2: the supervisor loads the programs once, both workers splice through its pins",
  async (scope) => {
    const backend = await rawServer(scope, echoHandler);
    const metricsPort = unusedPort();
    const proxy = await startKernelProxy(scope, {
      workers: 2,
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [backend.address] }],
      metrics: { address: `127.0.0.1:${metricsPort}` },
      ebpf: kernelEbpf(),
    });
    assert.match(proxy.stderr(), /ready: 2 workers \(pids \d+, \d+\).*mode kernel/);
    assert.doesNotMatch(proxy.stderr(), /unavailable/);
    const bad = await tlsEchoes(proxy.port(), POOL.subarray(0, 256 * 1024), 30);
    assert.deepEqual(bad, [], `${bad.length} of 30 echoes broken`);
    const entries = await entriesAtLeast(proxy, backend.address, 30);
    assert.ok(
      entries.every((e) => e.mode === "kernel" && e.close_reason === "done"),
      JSON.stringify(entries.filter((e) => e.mode !== "kernel" || e.close_reason !== "done")),
    );
    const workers = new Set(entries.map((e) => (e as { worker?: number }).worker));
    assert.deepEqual([...workers].sort(), [1, 2], "both workers served and spliced");
    assert.equal(await waitPairEntries(proxy.pid, 0), 0, "pair-map entries removed");
    // the supervisor's counters: the workers' paired sockets plus the verdict program's bytes
    const stats = await (await fetch(`http://127.0.0.1:${metricsPort}/stats`)).json();
    const sockmap = stats.kernel.sockmap as Record<string, number>;
    assert.equal(sockmap.socketsInserted, 60, JSON.stringify(sockmap));
    assert.equal(sockmap.socketsLive, 0, JSON.stringify(sockmap));
    assert.ok(sockmap.bytesSpliced > 0, JSON.stringify(sockmap));
    await assertCleanStop(proxy);
  },
  60_000,
);

ktest(
  "kernel and userspace sessions side by side: TLS spliced; HTTP, early data and bytes after the hello stay in userspace",
  async (scope) => {
    const received: number[] = [];
    const backend = rawBackend(scope, (c) => echo(c, received));
    const web = await identityBackend(scope, "W", { tls: false });
    const proxy = await startKernelProxy(scope, {
      listeners: [
        { address: "127.0.0.1:0", protocol: "tls" },
        { address: "127.0.0.1:0", protocol: "http" },
      ],
      routes: [
        { match: "web.test", backends: [web.address] },
        { match: "*", backends: [backend.address] },
      ],
      ebpf: kernelEbpf(),
    });
    const earlyHello = await Deno.readFile(`${ROOT}tests/fixtures/hellos/openssl_early_data.bin`);
    const HELLO_RECORD = 351; // the fixture's hello record; the rest is a 0-RTT record

    // spliced: three sessions streaming 16 MiB each through the echo while the others run
    const spliced = await Promise.all([0, 1, 2].map(() => rawSpliced(proxy.port(), "a.test")));
    const seeds = spliced.map(() => Math.floor(Math.random() * 2 ** 32));
    const splicedDone = Promise.all(spliced.map(async ({ conn }, i) => {
      const seed = seeds[i];
      const sent = positionStream(16 * MiB, seed);
      const [, got] = await Promise.all([
        writeRandomSizes(conn, sent, { closeWrite: true }),
        readToEnd(conn),
      ]);
      conn.close();
      return {
        addr: conn.localAddr as Deno.NetAddr,
        diff: describeMismatch(sent, got, seed, seeds),
      };
    }));

    // bytes after the hello, in the same write: the proxy has read them, so no splicing
    const extraDone = (async () => {
      const hello = await clientHelloBytes("extra.test");
      const extra = POOL.subarray(0, 3000);
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port() });
      await writeAll(conn, concat(hello, extra));
      assert.deepEqual(await readExact(conn, 1), new Uint8Array([GO]));
      assert.equal(sha256(await readExact(conn, extra.length)), sha256(extra), "extra echoed");
      const [sent, got] = await Promise.all([
        sendRandom(conn, POOL, 4 * MiB, { closeWrite: true }),
        drainHash(conn),
      ]);
      assert.deepEqual(got, { bytes: 4 * MiB, sha256: sent });
      conn.close();
      return conn.localAddr as Deno.NetAddr;
    })();

    // a hello announcing early data, followed by its 0-RTT record
    const earlyDone = (async () => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port() });
      await writeAll(conn, earlyHello);
      assert.deepEqual(await readExact(conn, 1), new Uint8Array([GO]));
      const echoed = await readExact(conn, earlyHello.length - HELLO_RECORD);
      assert.deepEqual(echoed, earlyHello.subarray(HELLO_RECORD), "0-RTT record relayed");
      await conn.closeWrite();
      assert.equal((await readOutcome(conn)).kind, "eof");
      conn.close();
      return conn.localAddr as Deno.NetAddr;
    })();

    // plain HTTP on the HTTP listener
    const httpDone = (async () => {
      const r = await curl(proxy.port(1), "web.test", { http: true });
      assert.equal(r.code, 0, r.stderr);
      assert.match(r.stdout, /^W\nstatus=200$/);
    })();

    const [splicedResults, extraAddr, earlyAddr] = await Promise.all([
      splicedDone,
      extraDone,
      earlyDone,
      httpDone,
    ]);
    const entryOf = (a: Deno.NetAddr) =>
      proxy.waitAccess((e) => e.client === `${a.hostname}:${a.port}`);
    const modeOf = async (a: Deno.NetAddr) => (await entryOf(a)).mode;
    for (const r of splicedResults) {
      const e = await entryOf(r.addr);
      assert.ok(
        r.diff === "identical",
        `spliced session: 16 MiB echoed intact (${r.diff}; proxy counted ` +
          `${e.bytes_up} up, ${e.bytes_down} down, ${e.close_reason}; the echo backend ` +
          `received ${JSON.stringify(received)})`,
      );
      assert.equal(e.mode, "kernel", "TLS session spliced");
    }
    assert.equal(await modeOf(extraAddr), "userspace", "bytes after the hello: userspace");
    assert.equal(await modeOf(earlyAddr), "userspace", "early data: userspace");
    const http = await proxy.waitAccess((e) => e.backend === web.address);
    assert.equal(http.mode, "userspace", "HTTP listener: userspace");
    assert.equal(await waitPairEntries(proxy.pid, 0), 0, "pair-map entries removed");
    await assertCleanStop(proxy);
  },
  60_000,
);

// ---------------------------------------------------------------------------------------------
// 3. Fallback paths

/** The fallback warning, up to the next log line (a verifier log spans several lines). */
const WARNING =
  /eBPF fast path unavailable, userspace mode in use: ([\s\S]*?)(?=\n\d{4}-\d\d-\d\d[ T]|\n*$)/g;

/** The one fallback warning's text (asserting there is exactly one). */
function fallbackWarning(stderr: string): string {
  const all = [...stderr.matchAll(WARNING)];
  assert.equal(all.length, 1, `exactly one fallback warning; output:\n${stderr}`);
  return all[0][1];
}

ktest(
  "without privilege (nobody, no capabilities) the proxy warns once with cause and fix and relays TLS in userspace",
  async (scope) => {
    const a = await identityBackend(scope, "A");
    const proxy = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [a.address] }],
      ebpf: kernelEbpf(),
      log: { level: "info" },
    }, {
      wrapper: ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"],
      uid: 65534,
    });
    const status = await Deno.readTextFile(`/proc/${proxy.pid}/status`);
    assert.match(status, /^Uid:\s+65534\s/m, "the proxy runs as nobody");
    assert.match(status, /^CapEff:\s+0+$/m, "with no capabilities");
    const why = fallbackWarning(proxy.stderr());
    assert.match(why, /not permitted to load eBPF programs/, "names the cause");
    assert.match(why, /run as root|CAP_BPF/, "names the fix");
    assert.match(proxy.stderr(), /ready: .*mode userspace/);
    assert.equal(await whoAnswers(proxy.port(), "a.test"), "A");
    const entries = await within(
      5000,
      "access entry",
      (async () => {
        for (;;) {
          const e = await proxy.access();
          if (e.length) return e;
          await sleep(50);
        }
      })(),
    );
    assert.equal(entries[0].mode, "userspace");
    assert.equal(entries[0].close_reason, "done");
    assert.equal(await proxy.stop(), 0);
  },
  40_000,
);

ktest(
  "a BPF object the verifier rejects: one warning naming the verifier, and a working userspace proxy",
  async (scope) => {
    const dir = await Deno.makeTempDir({ prefix: "sni-e2e-bpf-" });
    scope.defer(() => Deno.remove(dir, { recursive: true }).catch(() => {}));
    const object = await verifierRejectedObject(dir);
    const a = await identityBackend(scope, "A");
    const proxy = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [a.address] }],
      ebpf: kernelEbpf({ object }),
    });
    const why = fallbackWarning(proxy.stderr());
    assert.match(why, /verifier rejected/, "names the cause");
    assert.match(why, /invalid mem access|or_null/, "quotes the verifier's reason");
    assert.match(why, /userspace mode or upgrade the kernel/, "names the fix");
    assert.match(proxy.stderr(), /ready: .*mode userspace/);
    assert.equal(await pinNames(proxy.pid), null, "no pins left behind");
    await assertStillServes(proxy, "a.test", "A");
    const e = await proxy.waitAccess((e) => e.sni === "a.test");
    assert.equal(e.mode, "userspace");
    await assertCleanStop(proxy);
  },
  40_000,
);

/** The pins of the instance `pid`, sorted, or null when its pin dir does not exist. */
async function pinNames(pid: number): Promise<string[] | null> {
  try {
    const names: string[] = [];
    for await (const e of Deno.readDir(instancePinDir(pid))) names.push(e.name);
    return names.sort();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

ktest(
  "the pins live under a dir of the instance's own, gone after SIGTERM; after SIGKILL the next " +
    "proxy removes the dead instance's pins (logged) and splices",
  async (scope) => {
    const a = await identityBackend(scope, "A");
    const config = {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [a.address] }],
      ebpf: kernelEbpf(),
    };
    const clean = await startKernelProxy(scope, config);
    assert.deepEqual(await pinNames(clean.pid), ["sni_pairs", "sni_sockhash", "sni_stats"]);
    assert.match(clean.stderr(), new RegExp(`pins in ${instancePinDir(clean.pid)}`));
    await assertStillServes(clean, "a.test", "A");
    assert.equal((await clean.waitAccess(() => true)).mode, "kernel");
    await assertCleanStop(clean);
    assert.equal(await pinNames(clean.pid), null, "the instance's pin dir removed at exit");

    const killed = await startKernelProxy(scope, config);
    await assertStillServes(killed, "a.test", "A");
    killed.signal("SIGKILL");
    await killed.status;
    assert.ok((await pinNames(killed.pid))?.includes("sni_pairs"), "the killed one left pins");

    const next = await startKernelProxy(scope, config);
    assert.match(
      next.stderr(),
      new RegExp(`removed the eBPF pins of a dead instance \\(pid ${killed.pid}\\)`),
    );
    assert.equal(await pinNames(killed.pid), null, "the dead instance's pins are gone");
    assert.equal(fallbackCount(next.stderr()), 0, "no fallback warning");
    await assertStillServes(next, "a.test", "A");
    assert.equal((await next.waitAccess(() => true)).mode, "kernel", "the new proxy splices");
    assert.equal(await waitPairEntries(next.pid, 0), 0);
    await assertCleanStop(next);
    assert.equal(await pinNames(next.pid), null);
  },
  60_000,
);

function fallbackCount(stderr: string): number {
  return [...stderr.matchAll(WARNING)].length;
}

// ---------------------------------------------------------------------------------------------
// 6. Instances side by side

/** Sends `n` bytes of the pool in 256 KiB writes, hashing them into `hash`. */
async function sendHashed(conn: Deno.Conn, n: number, hash: ReturnType<typeof createHash>) {
  for (let off = 0; off < n; off += 256 * 1024) {
    const chunk = POOL.subarray(off % (16 * MiB), off % (16 * MiB) + Math.min(256 * 1024, n - off));
    hash.update(chunk);
    await writeAll(conn, chunk);
  }
}

/** `bytes` each way through a spliced pair at once, both half-closed at the end; byte-exact. */
async function duplexExact(client: Deno.TcpConn, server: Deno.TcpConn, bytes: number) {
  const [up, down, atBackend, atClient] = await Promise.all([
    sendRandom(client, POOL, bytes, { closeWrite: true }),
    sendRandom(server, POOL, bytes, { closeWrite: true }),
    drainHash(server),
    drainHash(client),
  ]);
  assert.deepEqual(atBackend, { bytes, sha256: up }, "upstream intact");
  assert.deepEqual(atClient, { bytes, sha256: down }, "downstream intact");
  client.close();
  server.close();
}

ktest(
  "two sockmap-mode proxies on one host at once: each splices its own connections byte-exact " +
    "in its own pairing map, and one stopping does not disturb the other's transfer",
  async (scope) => {
    const one = await rawKernelProxy(scope);
    const two = await rawKernelProxy(scope);
    const pids = [one.proxy.pid, two.proxy.pid];
    for (const pid of pids) {
      assert.deepEqual(await pinNames(pid), ["sni_pairs", "sni_sockhash", "sni_stats"]);
    }
    const c1 = await rawSpliced(one.proxy.port(), "a.test");
    const s1 = await one.backend.next();
    const c2 = await rawSpliced(two.proxy.port(), "a.test");
    const s2 = await two.backend.next();
    const c3 = await rawSpliced(two.proxy.port(), "a.test");
    const s3 = await two.backend.next();
    assert.equal(await waitPairEntries(one.proxy.pid, 2), 2, "one's map: its one session");
    assert.equal(await waitPairEntries(two.proxy.pid, 4), 4, "two's map: its two sessions");
    assert.equal(await pairEntries(one.proxy.pid), 2, "two's sessions are not in one's map");

    await Promise.all([duplexExact(c1.conn, s1, 64 * MiB), duplexExact(c2.conn, s2, 64 * MiB)]);
    assert.equal(await waitPairEntries(one.proxy.pid, 0), 0, "one's map emptied");
    assert.equal(await waitPairEntries(two.proxy.pid, 2), 2, "two's open session stays paired");

    // `one` stops in the middle of a transfer through `two`
    const sent = createHash("sha256");
    const received = drainHash(s3);
    await sendHashed(c3.conn, 32 * MiB, sent);
    await assertCleanStop(one.proxy);
    assert.equal(await pinNames(one.proxy.pid), null, "one removed its own pins");
    assert.deepEqual(await pinNames(two.proxy.pid), ["sni_pairs", "sni_sockhash", "sni_stats"]);
    assert.equal(await pairEntries(two.proxy.pid), 2, "two's session still paired");
    await sendHashed(c3.conn, 32 * MiB, sent);
    await c3.conn.closeWrite();
    assert.deepEqual(await received, { bytes: 64 * MiB, sha256: sent.digest("hex") });
    await s3.closeWrite();
    assert.equal((await readOutcome(c3.conn)).kind, "eof");
    c3.conn.close();
    s3.close();

    const e1 = await entriesAtLeast(one.proxy, one.backend.address, 1);
    const e2 = await entriesAtLeast(two.proxy, two.backend.address, 2);
    for (const e of [...e1, ...e2]) {
      assert.equal(e.mode, "kernel", JSON.stringify(e));
      assert.equal(e.close_reason, "done", JSON.stringify(e));
    }
    assert.equal(await waitPairEntries(two.proxy.pid, 0), 0);
    await assertStillServes(two.proxy, "b.test", "B");
    assert.equal((await two.proxy.waitAccess((e) => e.sni === "b.test")).mode, "kernel");
    await assertCleanStop(two.proxy);
    assert.equal(await pinNames(two.proxy.pid), null);
  },
  90_000,
);
