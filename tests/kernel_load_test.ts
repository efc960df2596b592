/**
 * Kernel mode under production-like load: the real proxy with `ebpf.enabled`, the real kernel.
 * A reader that stops holds its sender back (bounded kernel memory, as in userspace mode) and
 * later gets every byte; many concurrent duplex transfers with random write sizes survive a
 * reload and a drain; full maps fall back to userspace without losing or stalling anything; and
 * tens of thousands of short connections leave no descriptor or kernel memory behind.
 *
 * Needs root, libbpf, clang and bpftool; elsewhere every test is skipped with the reason printed.
 * Only one kernel-mode proxy can run per machine: the tests wait for the slot.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { socketTuple } from "../src/ebpf/sockmap.ts";
import { MSG_OOB, resetSocket, sendFd } from "../ffi/libc.ts";
import { SockDiag } from "../src/conn/tcpinfo.ts";
import {
  type AccessEntry,
  drainHash,
  e2eTest,
  echoHandler,
  fdOf,
  kernelEbpf,
  kernelSkipReason,
  type ProxyProcess,
  randomPool,
  rawBackend,
  rawServer,
  rawSpliced,
  readExact,
  readOutcome,
  readToEnd,
  type Scope,
  sendRandom,
  sleep,
  startKernelProxy,
  startProxy,
  tlsConnect,
  untilStopped,
  unusedPort,
  within,
  writeAll,
} from "./harness/mod.ts";

const SKIP = await kernelSkipReason();
if (SKIP) {
  console.warn(`\n!!! SKIPPING tests/kernel_load_test.ts (kernel mode under load): ${SKIP}\n`);
}

const MiB = 1 << 20;
const POOL = SKIP ? new Uint8Array(0) : randomPool(16 * MiB);

function ktest(name: string, fn: (scope: Scope) => Promise<void>, timeoutMs: number): void {
  e2eTest(name, fn, { timeoutMs, ignore: SKIP !== null });
}

/** Numbers worth reporting (observations on a busy 2-core box, not benchmarks). */
function note(text: string): void {
  console.log(`    [measured] ${text}`);
}

/**
 * A kernel-mode proxy routing `a.test` to `backend`: `extra` config sections, and `ebpf` over
 * kernel mode's default data path (`splice_mode` "pipe").
 */
function routedProxy(
  scope: Scope,
  backend: string,
  extra: Record<string, unknown> = {},
  ebpf: Record<string, unknown> = {},
): Promise<ProxyProcess> {
  return startKernelProxy(scope, {
    listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
    routes: [{ match: "a.test", backends: [backend] }],
    ...extra,
    ebpf: kernelEbpf({ splice_mode: "pipe", ...ebpf }),
  });
}

/** A socket's TCP queues by its Deno addresses (sock_diag), or null when gone. */
function queues(diag: SockDiag, conn: Deno.Conn): { recvQ: number; sendQ: number } | null {
  const info = diag.query(socketTuple({
    local: conn.localAddr as Deno.NetAddr,
    remote: conn.remoteAddr as Deno.NetAddr,
  }));
  return info ? { recvQ: info.readQueue, sendQ: info.writeQueue } : null;
}

/** MemAvailable of the host, in bytes. */
async function memAvailable(): Promise<number> {
  const text = await Deno.readTextFile("/proc/meminfo");
  return Number(/^MemAvailable:\s+(\d+) kB/m.exec(text)![1]) * 1024;
}

/** Writes `total` bytes of the pool (random sizes) and counts what the socket took so far. */
function countingWriter(conn: Deno.TcpConn, total: number) {
  const state = { written: 0, done: false, sha256: "" };
  const hash = createHash("sha256");
  const finished = (async () => {
    while (state.written < total) {
      const len = Math.min(total - state.written, 1 + Math.floor(Math.random() * 256 * 1024));
      const off = Math.floor(Math.random() * (POOL.length - len + 1));
      const chunk = POOL.subarray(off, off + len);
      hash.update(chunk);
      let sent = 0;
      while (sent < len) {
        const n = await conn.write(chunk.subarray(sent));
        sent += n;
        state.written += n;
      }
    }
    state.sha256 = hash.digest("hex");
    await conn.closeWrite();
    state.done = true;
  })();
  return { state, finished };
}

// ---------------------------------------------------------------------------------------------
// 1. Bounded memory, real backpressure

const STALL_TOTAL = 256 * MiB;
const PIPE_BYTES = 256 * 1024;
/** ebpf.sndbuf / ebpf.rcvbuf of the test: the kernel doubles each. */
const SOCKET_BUFFER = 1 * MiB;

for (const direction of ["backend → client", "client → backend"] as const) {
  ktest(
    `kernel mode (pipe): a reader that stops reading (${direction}) holds its sender back ` +
      `within ebpf.rcvbuf + pipe_bytes + sndbuf, then gets every byte`,
    async (scope) => {
      const backend = rawBackend(scope);
      const proxy = await routedProxy(scope, backend.address, {}, {
        pipe_bytes: PIPE_BYTES,
        sndbuf: SOCKET_BUFFER,
        rcvbuf: SOCKET_BUFFER,
      });
      const diag = SockDiag.open();
      scope.defer(() => diag.close());
      const { conn: client, helloBytes } = await rawSpliced(proxy.port(), "a.test");
      const server = await backend.next();
      scope.defer(() => {
        client.close();
        server.close();
      });
      const down = direction === "backend → client";
      const [sender, reader] = down ? [server, client] : [client, server];
      const memBefore = await memAvailable();
      const writer = countingWriter(sender, STALL_TOTAL);
      writer.finished.catch(() => {});
      // let the sender run into the stopped reader, then watch that it stays stopped
      let last = -1;
      for (let i = 0; i < 40 && writer.state.written !== last; i++) {
        last = writer.state.written;
        await sleep(250);
      }
      await sleep(1000);
      const stalledAt = writer.state.written;
      const senderQ = queues(diag, sender)!;
      const readerQ = queues(diag, reader)!;
      // what the sender wrote and is neither in its own send queue nor in the reader's
      // receive queue is held by the proxy: its sockets and the kernel's redirect queue
      const held = stalledAt - senderQ.sendQ - readerQ.recvQ;
      const memDrop = memBefore - await memAvailable();
      await sleep(1000);
      const later = writer.state.written;
      note(
        `${direction}: sender wrote ${(stalledAt / MiB).toFixed(1)} MiB then stopped; ` +
          `held by the proxy ${(held / MiB).toFixed(2)} MiB (sender send-q ` +
          `${(senderQ.sendQ / MiB).toFixed(2)}, reader recv-q ${(readerQ.recvQ / MiB).toFixed(2)}` +
          `); MemAvailable dropped ${(memDrop / MiB).toFixed(1)} MiB`,
      );
      assert.ok(!writer.state.done, "the sender was held back");
      assert.ok(later - stalledAt < 256 * 1024, `sender still moving: ${stalledAt} → ${later}`);
      // the source's receive buffer, the pipe and the destination's send buffer: no more
      const bound = 2 * SOCKET_BUFFER + PIPE_BYTES + 2 * SOCKET_BUFFER;
      assert.ok(held <= bound, `the proxy holds ${held} bytes for a stopped reader (${bound})`);
      // coarse (other processes share the host): catches gigabytes, as the sockmap path pinned
      assert.ok(memDrop < 512 * MiB, `MemAvailable dropped ${memDrop} bytes`);
      // the reader comes back: everything arrives, in order
      const [got] = await Promise.all([drainHash(reader), writer.finished]);
      assert.deepEqual(got, { bytes: STALL_TOTAL, sha256: writer.state.sha256 });
      await reader.closeWrite();
      assert.equal((await drainHash(sender)).bytes, 0, "nothing else came the other way");
      const entry = await proxy.waitAccess((e) => e.backend === backend.address, 10_000);
      assert.equal(entry.mode, "kernel");
      assert.equal(entry.close_reason, "done", JSON.stringify(entry));
      if (down) assert.equal(entry.bytes_down, 1 + STALL_TOTAL, "bytes_down: GO byte + payload");
      else assert.equal(entry.bytes_up, helloBytes + STALL_TOTAL, "bytes_up: hello + payload");
    },
    120_000,
  );
}

// ---------------------------------------------------------------------------------------------
// 2. Many concurrent duplex transfers, a reload and a drain: nothing lost

/** A raw spliced session: the client's conn and the backend's, paired. */
interface RawPair {
  client: Deno.TcpConn;
  server: Deno.TcpConn;
  helloBytes: number;
  clientPort: number;
}

/** Opens a raw spliced session (one at a time, so the backend's conn is this client's). */
async function openPair(
  port: number,
  backend: { next(): Promise<Deno.TcpConn> },
): Promise<RawPair> {
  const { conn: client, helloBytes } = await rawSpliced(port, "a.test");
  const server = await backend.next();
  return { client, server, helloBytes, clientPort: (client.localAddr as Deno.NetAddr).port };
}

/** Moves `up` bytes up and `down` bytes down at once; says what arrived. */
async function duplex(
  p: RawPair,
  up: number,
  down: number,
): Promise<{ ok: boolean; detail: string }> {
  try {
    const [upHash, downHash, atBackend, atClient] = await Promise.all([
      sendRandom(p.client, POOL, up, { closeWrite: true }),
      sendRandom(p.server, POOL, down, { closeWrite: true }),
      drainHash(p.server),
      drainHash(p.client),
    ]);
    const ok = atBackend.bytes === up && atBackend.sha256 === upHash &&
      atClient.bytes === down && atClient.sha256 === downHash;
    return {
      ok,
      detail:
        `up ${atBackend.bytes}/${up}${atBackend.sha256 === upHash ? "" : " (hash differs)"}, ` +
        `down ${atClient.bytes}/${down}${atClient.sha256 === downHash ? "" : " (hash differs)"}`,
    };
  } catch (e) {
    return { ok: false, detail: `failed: ${(e as Error).message}` };
  } finally {
    p.client.close();
    p.server.close();
  }
}

const CONCURRENT = Number(Deno.env.get("SNI_LOAD_CONNECTIONS") ?? 200);
const MIN_BYTES = 16 * MiB;
const MAX_BYTES = 64 * MiB;

// the default mode; the opt-in sockmap mode lost 2 of 200 transfers in 1 of 3 such runs (see
// README, Kernel mode): SNI_LOAD_SOCKMAP=1 adds it
const LOAD_MODES = Deno.env.get("SNI_LOAD_SOCKMAP")
  ? ["pipe", "sockmap"] as const
  : ["pipe"] as const;
for (const mode of LOAD_MODES) {
  ktest(
    `kernel mode (${mode}): ${CONCURRENT} concurrent duplex transfers of 16-64 MiB each way, ` +
      `random write sizes, a SIGHUP and then a SIGTERM drain in the middle: every byte arrives, ` +
      `every count exact`,
    async (scope) => {
      const backend = rawBackend(scope);
      const config = {
        listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
        routes: [{ match: "a.test", backends: [backend.address] }],
        timeouts: { drain_ms: 240_000, idle_ms: 60_000 },
        ebpf: kernelEbpf({ splice_mode: mode }),
      };
      const proxy = await startKernelProxy(scope, config);
      const size = () => MIN_BYTES + Math.floor(Math.random() * (MAX_BYTES - MIN_BYTES + 1));
      const t0 = performance.now();
      const jobs = [];
      for (let i = 0; i < CONCURRENT; i++) {
        const pair = await openPair(proxy.port(), backend);
        const up = size();
        const down = size();
        jobs.push(duplex(pair, up, down).then((r) => ({ ...r, ...pair, up, down })));
      }
      await sleep(3000);
      await proxy.writeConfig(config);
      proxy.signal("SIGHUP");
      await proxy.waitForLog(/reload/i, 10_000);
      await sleep(3000);
      proxy.signal("SIGTERM");
      const results = await Promise.all(jobs);
      const ms = performance.now() - t0;
      const failed = results.filter((r) => !r.ok);
      const total = results.reduce((n, r) => n + r.up + r.down, 0);
      note(
        `${CONCURRENT} duplex transfers, ${(total / MiB / 1024).toFixed(1)} GiB in ` +
          `${(ms / 1000).toFixed(1)} s, ${failed.length} failed`,
      );
      assert.deepEqual(failed.map((r) => r.detail), [], "every transfer intact");
      assert.equal(await proxy.status.then((s) => s.code), 0, "the drain ended with exit 0");
      const entries = await proxy.access();
      assert.equal(entries.length, CONCURRENT, "one access entry per connection");
      for (const e of entries) {
        assert.equal(e.close_reason, "done", JSON.stringify(e));
        assert.equal(e.mode, "kernel", JSON.stringify(e));
      }
      assertExactCounts(entries, results);
      assert.doesNotMatch(proxy.stderr(), /undelivered|half-closing anyway/);
    },
    300_000,
  );
}

// ---------------------------------------------------------------------------------------------
// 3. Full maps: the overflow runs in userspace, nothing lost, nothing stalled

const OVERFLOW_CONNECTIONS = 320; // 5x what maps of the minimum size (64) can splice
const OVERFLOW_BYTES = 2 * MiB;

ktest(
  `kernel mode: maps at their minimum size (64) with ${OVERFLOW_CONNECTIONS} concurrent ` +
    `connections: the overflow runs in userspace (counted), every transfer intact, none stalls`,
  async (scope) => {
    const backend = rawBackend(scope);
    const metricsPort = unusedPort();
    const proxy = await routedProxy(
      scope,
      backend.address,
      { metrics: { address: `127.0.0.1:${metricsPort}` } },
      { splice_mode: "sockmap", maps: { pairs: 64, sockets: 64 } },
    );
    const pairs: RawPair[] = [];
    for (let i = 0; i < OVERFLOW_CONNECTIONS; i++) {
      pairs.push(await openPair(proxy.port(), backend));
    }
    const results = await within(
      120_000,
      "every transfer to end",
      Promise.all(pairs.map((p) => duplex(p, OVERFLOW_BYTES, OVERFLOW_BYTES))),
    );
    const failed = results.filter((r) => !r.ok);
    assert.deepEqual(failed.map((r) => r.detail), [], "every transfer intact");
    const entries = await entriesWithin(proxy, OVERFLOW_CONNECTIONS, 30_000);
    const modes = { kernel: 0, userspace: 0 };
    for (const e of entries) {
      assert.equal(e.close_reason, "done", JSON.stringify(e));
      assert.equal(e.bytes_down, 1 + OVERFLOW_BYTES, JSON.stringify(e));
      modes[e.mode as "kernel" | "userspace"]++;
    }
    assertExactCounts(
      entries,
      pairs.map((p) => ({ ...p, up: OVERFLOW_BYTES, down: OVERFLOW_BYTES })),
    );
    note(`${modes.kernel} spliced, ${modes.userspace} in userspace mode`);
    assert.ok(modes.kernel > 0 && modes.kernel <= 32, `spliced: ${modes.kernel} (room for 32)`);
    assert.equal(modes.kernel + modes.userspace, OVERFLOW_CONNECTIONS);
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const fallbacks = [
      ...text.matchAll(/^sni_proxy_kernel_fallbacks_total\{reason="(\w+)"\} (\d+)/gm),
    ]
      .reduce((n, m) => n + Number(m[2]), 0);
    assert.equal(fallbacks, modes.userspace, `fallbacks counted in /metrics:\n${text}`);
    // one warning per burst, not one per connection
    const warnings = proxy.stderr().match(/a connection runs in userspace mode/g) ?? [];
    assert.ok(warnings.length >= 1 && warnings.length <= 3, `${warnings.length} fallback warnings`);
    assert.match(proxy.stderr(), /eBPF maps \d+% full/, "the 80% warning");
  },
  180_000,
);

/**
 * Every transfer has its own access entry with exact counts (hello + payload up, the GO byte +
 * payload down). Matched by client port and counts together: a port freed by a transfer that
 * ended early can be taken by a later connection.
 */
function assertExactCounts(
  entries: AccessEntry[],
  transfers: { clientPort: number; helloBytes: number; up: number; down: number }[],
): void {
  const left = [...entries];
  for (const t of transfers) {
    const i = left.findIndex((e) =>
      e.client.endsWith(`:${t.clientPort}`) && e.bytes_up === t.helloBytes + t.up &&
      e.bytes_down === 1 + t.down
    );
    assert.ok(
      i >= 0,
      `no exact entry for port ${t.clientPort} (up ${t.helloBytes} + ${t.up}, down 1 + ${t.down}): ` +
        JSON.stringify(left.filter((e) => e.client.endsWith(`:${t.clientPort}`))),
    );
    left.splice(i, 1);
  }
}

/** Polls until the access log has `n` entries (fails after `ms`). */
async function entriesWithin(proxy: ProxyProcess, n: number, ms: number): Promise<AccessEntry[]> {
  const deadline = Date.now() + ms;
  for (;;) {
    const entries = await proxy.access();
    if (entries.length >= n) return entries;
    if (Date.now() > deadline) throw new Error(`${entries.length} of ${n} access entries`);
    await sleep(100);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Tens of thousands of short connections leave nothing behind

const SHORT_CONNECTIONS = Number(Deno.env.get("SNI_SHORT_CONNECTIONS") ?? 50_000);

/** Open fds of a process, by what they point at. */
async function openFds(pid: number): Promise<string[]> {
  const out: string[] = [];
  for await (const e of Deno.readDir(`/proc/${pid}/fd`)) {
    try {
      out.push(
        `${e.name} ${(await Deno.readLink(`/proc/${pid}/fd/${e.name}`)).replace(/\d+/g, "#")}`,
      );
    } catch { /* closed meanwhile */ }
  }
  return out.sort();
}

/** TCP sockets allocated and pages of TCP memory, host-wide (/proc/net/sockstat). */
async function tcpSockstat(): Promise<{ alloc: number; memPages: number }> {
  const text = await Deno.readTextFile("/proc/net/sockstat");
  const m = /^TCP: inuse \d+ orphan \d+ tw \d+ alloc (\d+) mem (\d+)/m.exec(text)!;
  return { alloc: Number(m[1]), memPages: Number(m[2]) };
}

for (const mode of ["sockmap", "pipe"] as const) {
  ktest(
    `kernel mode (${mode}): ${SHORT_CONNECTIONS} short connections leave the proxy's fds, the ` +
      `maps and the kernel's TCP memory where they were`,
    async (scope) => {
      const backend = rawBackend(scope, async (conn) => {
        const buf = new Uint8Array(64);
        while ((await conn.read(buf)) !== null) await conn.write(buf.subarray(0, 1));
      });
      const metricsPort = unusedPort();
      const proxy = await routedProxy(scope, backend.address, {
        metrics: { address: `127.0.0.1:${metricsPort}` },
        // one access log file for them all (no rotation)
        log: { level: "info", max_file_bytes: 1 << 30 },
      }, { splice_mode: mode });
      const stats = async () => {
        const text = await (await fetch(`http://127.0.0.1:${metricsPort}/stats`)).json();
        return (text.kernel.sockmap ?? { socketsLive: 0 }) as Record<string, number>;
      };
      // warm up (the first connections allocate what stays: buffers, timers, the watcher)
      const one = async () => {
        const { conn } = await rawSpliced(proxy.port(), "a.test");
        await conn.write(new Uint8Array([1]));
        await conn.read(new Uint8Array(1));
        conn.close();
      };
      for (let i = 0; i < 200; i++) await one();
      await sleep(500);
      // the metrics connection first: it stays open (keep-alive) and is counted both times
      const liveBefore = (await stats()).socketsLive;
      const fdListBefore = await openFds(proxy.pid);
      const fdsBefore = fdListBefore.length;
      const sockBefore = await tcpSockstat();
      const t0 = performance.now();
      const workers = 16;
      let next = 0;
      await Promise.all(Array.from({ length: workers }, async () => {
        while (next < SHORT_CONNECTIONS) {
          next++;
          await one();
        }
      }));
      const ms = performance.now() - t0;
      await entriesWithin(proxy, SHORT_CONNECTIONS + 200, 60_000);
      // TIME_WAIT sockets hold no fd and little memory; let closing ones finish
      let fdsAfter = 0;
      for (let i = 0; i < 50; i++) {
        fdsAfter = (await openFds(proxy.pid)).length;
        if (fdsAfter <= fdsBefore) break;
        await sleep(100);
      }
      // host-wide figures: give closing sockets (and anything else on the host) time to settle
      let sockAfter = await tcpSockstat();
      for (let i = 0; i < 100; i++) {
        if (
          sockAfter.alloc <= sockBefore.alloc + 200 &&
          sockAfter.memPages <= sockBefore.memPages + 2048
        ) {
          break;
        }
        await sleep(200);
        sockAfter = await tcpSockstat();
      }
      const s = await stats();
      note(
        `${SHORT_CONNECTIONS} connections in ${(ms / 1000).toFixed(1)} s; proxy fds ` +
          `${fdsBefore} -> ${fdsAfter}; host TCP sockets ${sockBefore.alloc} -> ${sockAfter.alloc}, ` +
          `TCP memory ${sockBefore.memPages} -> ${sockAfter.memPages} pages; tracked sockets ` +
          `${liveBefore} -> ${s.socketsLive}`,
      );
      const fdListAfter = await openFds(proxy.pid);
      assert.ok(
        fdsAfter <= fdsBefore,
        `proxy fds ${fdsBefore} -> ${fdsAfter}: new ${
          fdListAfter.filter((f) => !fdListBefore.includes(f)).join(", ")
        }`,
      );
      assert.ok(s.socketsLive <= liveBefore, `tracked sockets ${liveBefore} -> ${s.socketsLive}`);
      assert.ok(sockAfter.alloc <= sockBefore.alloc + 200, "host TCP sockets back to baseline");
      assert.ok(
        sockAfter.memPages <= sockBefore.memPages + 2048,
        "host TCP memory back to baseline",
      );
      const entries = await proxy.access();
      const notDone = entries.filter((e) => e.close_reason !== "done" || e.mode !== "kernel");
      assert.deepEqual(notDone.slice(0, 3), [], `${notDone.length} not spliced or not done`);
    },
    300_000,
  );
}

// ---------------------------------------------------------------------------------------------
// 5. No stalled connection, and the same with workers

ktest(
  "kernel mode (pipe): a connection whose reader stopped for good ends at timeouts.idle_ms, " +
    "logged, with a reset on both sides (never a FIN after a cut stream)",
  async (scope) => {
    const backend = rawBackend(scope);
    const proxy = await routedProxy(scope, backend.address, { timeouts: { idle_ms: 1500 } });
    const { conn: client } = await rawSpliced(proxy.port(), "a.test");
    const server = await backend.next();
    scope.defer(() => {
      client.close();
      server.close();
    });
    const writer = countingWriter(server, STALL_TOTAL);
    const ended = await within(
      15_000,
      "the backend's writes to fail",
      writer.finished.then(
        () => "finished",
        (e) => (e as Error).name,
      ),
    );
    assert.notEqual(ended, "finished", "the stalled stream was not completed");
    const entry = await proxy.waitAccess((e) => e.backend === backend.address, 10_000);
    assert.equal(entry.close_reason, "idle_timeout", JSON.stringify(entry));
    assert.equal(entry.mode, "kernel");
    // the client sees a reset, not an end of stream, once it reads what was queued for it
    const outcome = await drainHash(client).then(() => "EOF", (e) => (e as Error).name);
    assert.equal(outcome, "ConnectionReset", "the client's read ends with a reset");
  },
  60_000,
);

ktest(
  "kernel mode (pipe) with workers: 2: 40 concurrent duplex transfers through both workers, " +
    "every byte and count exact",
  async (scope) => {
    const backend = rawBackend(scope);
    const proxy = await routedProxy(scope, backend.address, { workers: 2 });
    const jobs = [];
    for (let i = 0; i < 40; i++) {
      const pair = await openPair(proxy.port(), backend);
      const up = 4 * MiB + Math.floor(Math.random() * 4 * MiB);
      const down = 4 * MiB + Math.floor(Math.random() * 4 * MiB);
      jobs.push(duplex(pair, up, down).then((r) => ({ ...r, ...pair, up, down })));
    }
    const results = await Promise.all(jobs);
    assert.deepEqual(results.filter((r) => !r.ok).map((r) => r.detail), []);
    const entries = await entriesWithin(proxy, 40, 20_000);
    const workers = new Set(entries.map((e) => e.worker));
    for (const e of entries) {
      assert.equal(e.mode, "kernel", JSON.stringify(e));
      assert.equal(e.close_reason, "done", JSON.stringify(e));
    }
    assertExactCounts(entries, results);
    note(`workers that served: ${[...workers].join(", ")}`);
  },
  120_000,
);

// ---------------------------------------------------------------------------------------------
// 6. What users see: real TLS through the default kernel mode, and resets

ktest(
  "kernel mode (pipe): 50 concurrent real TLS clients echo 1 MiB each through a TLS backend, " +
    "byte for byte",
  async (scope) => {
    const backend = await rawServer(scope, echoHandler);
    const proxy = await routedProxy(scope, backend.address);
    const payload = POOL.subarray(0, MiB);
    const echoes = await Promise.all(Array.from({ length: 50 }, async () => {
      const conn = await tlsConnect(proxy.port(), "a.test");
      try {
        const [, back] = await Promise.all([
          sendRandom(conn, payload, payload.length, { closeWrite: true }),
          drainHash(conn),
        ]);
        return back.bytes;
      } finally {
        conn.close();
      }
    }));
    assert.deepEqual(new Set(echoes), new Set([MiB]), "every echo complete");
    const entries = await entriesWithin(proxy, 50, 20_000);
    assert.ok(entries.every((e) => e.mode === "kernel" && e.close_reason === "done"));
  },
  120_000,
);

for (const side of ["client", "backend"] as const) {
  ktest(
    `kernel mode (pipe): a ${side} reset mid-stream ends the other side and is logged as ` +
      `${side}_reset`,
    async (scope) => {
      const backend = rawBackend(scope);
      const proxy = await routedProxy(scope, backend.address);
      const pair = await openPair(proxy.port(), backend);
      const [resetter, other] = side === "client"
        ? [pair.client, pair.server]
        : [pair.server, pair.client];
      await writeAll(resetter, POOL.subarray(0, 64 * 1024));
      await readExact(other, 64 * 1024);
      // a reset and nothing else (Deno's close would send a FIN first)
      assert.equal(resetSocket(fdOf(resetter)), 0);
      resetter.close();
      // a cut stream must never look finished: the other side gets a reset, not an EOF
      const outcome = await readOutcome(other);
      assert.match(outcome.error ?? "", /ConnectionReset/, JSON.stringify(outcome));
      other.close();
      const entry = await proxy.waitAccess((e) => e.backend === backend.address, 10_000);
      assert.equal(entry.close_reason, `${side}_reset`, JSON.stringify(entry));
    },
    60_000,
  );
}

for (const mode of ["pipe", "userspace"] as const) {
  ktest(
    `${mode === "pipe" ? "kernel mode (pipe)" : "userspace mode"}: TCP urgent data (which ` +
      "splice(2) and a read stop at) neither stalls nor cuts the stream: the bytes after it " +
      "arrive, with the FIN right behind them",
    async (scope) => {
      const backend = rawBackend(scope);
      const proxy = mode === "pipe"
        ? await routedProxy(scope, backend.address)
        : await startProxy(scope, {
          listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
          routes: [{ match: "a.test", backends: [backend.address] }],
        });
      const pair = await openPair(proxy.port(), backend);
      // the proxy is stopped while it all comes, so it sees the bytes, the mark and the FIN in
      // one event: a read stops short at the mark, and that short read is not the EOF
      Deno.kill(proxy.pid, "SIGSTOP");
      await untilStopped(proxy.pid);
      await writeAll(pair.client, new Uint8Array([1, 2, 3]));
      assert.equal(sendFd(fdOf(pair.client), new Uint8Array([9]), MSG_OOB), 1, "urgent byte sent");
      await writeAll(pair.client, new Uint8Array([4, 5, 6]));
      await pair.client.closeWrite();
      Deno.kill(proxy.pid, "SIGCONT");
      const got = await within(5000, "the stream's end at the backend", readToEnd(pair.server));
      // the urgent byte is out of band, as a userspace relay's read() skips it too
      assert.deepEqual([...got], [1, 2, 3, 4, 5, 6]);
      await pair.server.closeWrite();
      pair.client.close();
      pair.server.close();
      const entry = await proxy.waitAccess((e) => e.backend === backend.address, 10_000);
      assert.equal(entry.close_reason, "done", JSON.stringify(entry));
      assert.equal(entry.bytes_up, pair.helloBytes + 6, JSON.stringify(entry));
    },
    30_000,
  );
}
