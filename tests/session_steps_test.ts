/**
 * A client connection's steps before the relay (hello, name resolution, connect, failover),
 * driven through the real proxy as production fails: backends given by name (a hosts file, a
 * DNS server that never answers), a first backend that drops SYNs, a drain or `ctl close` while
 * sessions wait in each step, hundreds of clients closing early, and hello deadlines of two
 * lengths after a reload.
 *
 * @module
 */
import assert from "node:assert/strict";
import {
  blackHole,
  clientHelloBytes,
  e2eTest,
  fdCount,
  GO,
  type ProxyProcess,
  pseudoRandomBytes,
  rawBackend,
  rawSpliced,
  readClientHello,
  readExact,
  readOutcome,
  runCli,
  type Scope,
  sha256,
  sleep,
  startProxy,
  within,
  writeAll,
} from "./harness/mod.ts";
import net from "node:net";

/** A DNS server that reads nothing: every query to it times out. */
function silentDns(scope: Scope): string {
  const sock = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  scope.defer(() => sock.close());
  return `127.0.0.1:${(sock.addr as Deno.NetAddr).port}`;
}

/** A hosts file naming `names` as 127.0.0.1. */
async function hostsFile(scope: Scope, names: string[]): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "sni-steps-" });
  scope.defer(() => Deno.remove(dir, { recursive: true }));
  const path = `${dir}/hosts`;
  await Deno.writeTextFile(path, names.map((n) => `127.0.0.1 ${n}\n`).join(""));
  return path;
}

async function sessionCount(p: ProxyProcess): Promise<number> {
  const r = await runCli(["ctl", "--config", p.configPath, "--json", "sessions"]);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout).sessions as unknown[]).length;
}

async function untilSessions(p: ProxyProcess, n: number, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while ((await sessionCount(p)) !== n) {
    assert.ok(Date.now() < end, `${n} session(s) listed`);
    await sleep(50);
  }
}

/** Waits until the access log holds `n` entries; returns them. */
async function accessEntries(p: ProxyProcess, n: number, ms = 10_000) {
  return await within(
    ms,
    `${n} access-log entries`,
    (async () => {
      for (;;) {
        const all = await p.access();
        if (all.length >= n) return all;
        await sleep(50);
      }
    })(),
  );
}

/** Sends a hello for `name` and leaves the connection waiting. */
async function helloSent(port: number, name: string): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await writeAll(conn, await clientHelloBytes(name));
  return conn;
}

e2eTest(
  "a backend named in the hosts file is connected; one whose name does not resolve fails as " +
    "connect_failed with a log line naming it, and the client is closed",
  async (scope) => {
    const backend = rawBackend(scope);
    const hosts = await hostsFile(scope, ["backend.test"]);
    // two addresses, the first refusing: the second is dialled within the same attempt
    await Deno.writeTextFile(hosts, "127.0.0.2 two.test\n127.0.0.1 two.test\n", { append: true });
    const p = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [
        { match: "named.test", backends: [`backend.test:${backend.port}`] },
        { match: "two.test", backends: [`two.test:${backend.port}`] },
        { match: "gone.test", backends: [`nowhere.test:${backend.port}`] },
      ],
      dns: { servers: [silentDns(scope)], hosts_file: hosts, timeout_ms: 300, attempts: 1 },
      timeouts: { connect_ms: 5000 },
      ebpf: { enabled: false },
    });
    for (let i = 0; i < 3; i++) {
      const { conn } = await rawSpliced(p.port(), "named.test");
      const b = await backend.next();
      await writeAll(conn, new Uint8Array([1, 2, 3]));
      assert.deepEqual(await readExact(b, 3), new Uint8Array([1, 2, 3]));
      conn.close();
      b.close();
    }
    const two = await rawSpliced(p.port(), "two.test");
    two.conn.close();
    (await backend.next()).close();
    const gone = await helloSent(p.port(), "gone.test");
    const outcome = await within(5000, "client closed", readOutcome(gone));
    gone.close();
    assert.notEqual(outcome.kind, "data");
    const e = await p.waitAccess((e) => e.sni === "gone.test");
    assert.equal(e.close_reason, "connect_failed");
    await p.waitForLog(`connect to nowhere.test:${backend.port} failed`);
    const named = (await p.access()).filter((e) => e.sni === "named.test");
    assert.equal(named.length, 3);
    assert.ok(
      named.every((e) => e.backend === `backend.test:${backend.port}`),
      String(named[0].backend),
    );
  },
);

e2eTest(
  "a first backend that drops SYNs times out at connect_ms, the next backend serves every " +
    "client, and the silent one is marked down by passive health",
  async (scope) => {
    const good = rawBackend(scope);
    const hole = await blackHole(scope);
    const p = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [hole, good.address], balance: "round_robin" }],
      timeouts: { connect_ms: 300 },
      ebpf: { enabled: false },
    });
    const n = 6;
    const t0 = performance.now();
    const clients = await within(
      10_000,
      "every client served",
      Promise.all(Array.from({ length: n }, () => rawSpliced(p.port(), "a.test"))),
    );
    assert.ok(performance.now() - t0 >= 250, "the silent backend was given connect_ms");
    for (let i = 0; i < n; i++) (await good.next()).close();
    clients.forEach((c) => c.conn.close());
    await p.waitForLog(`connect to ${hole} failed`);
    await p.waitForLog(`timed out after 300 ms`);
    await p.waitForLog(`backend ${hole} of route`);
    const entries = await accessEntries(p, n);
    assert.ok(entries.every((e) => e.backend === good.address), JSON.stringify(entries[0]));
  },
  { timeoutMs: 30_000 },
);

e2eTest(
  "a drain ends as soon as the last session waiting for its hello, its DNS answer or its " +
    "connect has ended (at their own timeouts), not at drain_ms; each logged with its reason",
  async (scope) => {
    const hole = await blackHole(scope);
    const hosts = await hostsFile(scope, []);
    const p = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [
        { match: "hole.test", backends: [hole] },
        { match: "dns.test", backends: ["slow.test:443"] },
      ],
      dns: { servers: [silentDns(scope)], hosts_file: hosts, timeout_ms: 1000, attempts: 1 },
      timeouts: { client_hello_ms: 1000, connect_ms: 1000, drain_ms: 20_000 },
      admin: { socket: `${hosts}.sock` },
      ebpf: { enabled: false },
    });
    await p.waitForLog("admin API on");
    const hello = await clientHelloBytes("hole.test");
    const clients: Deno.TcpConn[] = [];
    for (let i = 0; i < 5; i++) {
      const reading = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
      await writeAll(reading, hello.subarray(0, 10));
      clients.push(reading, await helloSent(p.port(), "hole.test"));
      clients.push(await helloSent(p.port(), "dns.test"));
    }
    await untilSessions(p, clients.length);
    const t0 = performance.now();
    p.signal("SIGTERM");
    const code = await within(8000, "the proxy exits", p.status);
    const took = performance.now() - t0;
    assert.equal(code.code, 0);
    assert.ok(took < 5000, `drain took ${took} ms`);
    const reasons = (await p.access()).map((e) => `${e.sni}:${e.close_reason}`).sort();
    assert.deepEqual(reasons, [
      ...Array(5).fill("dns.test:connect_failed"),
      ...Array(5).fill("hole.test:connect_failed"),
      ...Array(5).fill("null:client_hello_timeout"),
    ]);
    clients.forEach((c) => c.close());
  },
  { timeoutMs: 30_000 },
);

e2eTest(
  "`ctl close --all` ends sessions waiting for a DNS answer at once, as admin, and a drain " +
    "with them gone exits at once",
  async (scope) => {
    const hosts = await hostsFile(scope, []);
    const dir = await Deno.makeTempDir({ prefix: "sni-steps-" });
    scope.defer(() => Deno.remove(dir, { recursive: true }));
    const p = await startProxy(scope, {
      admin: { socket: `${dir}/admin.sock` },
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "dns.test", backends: ["slow.test:443"] }],
      dns: { servers: [silentDns(scope)], hosts_file: hosts, timeout_ms: 1500, attempts: 1 },
      timeouts: { connect_ms: 60_000, drain_ms: 60_000 },
      ebpf: { enabled: false },
    });
    await p.waitForLog("admin API on");
    const fds0 = fdCount(p.pid);
    const asked = performance.now();
    const clients = await Promise.all(
      Array.from({ length: 10 }, () => helloSent(p.port(), "dns.test")),
    );
    await untilSessions(p, 10);
    const r = await runCli(["ctl", "--config", p.configPath, "close", "--all"]);
    assert.equal(r.code, 0, r.stderr);
    await within(3000, "every client closed", Promise.all(clients.map((c) => readOutcome(c))));
    clients.forEach((c) => c.close());
    const entries = await accessEntries(p, 10, 3000);
    assert.deepEqual([...new Set(entries.map((e) => e.close_reason))], ["admin"]);
    await untilSessions(p, 0);
    // the shared lookup under way keeps its sockets until its own timeout, then lets them go
    await sleep(Math.max(0, asked + 2000 - performance.now()));
    assert.ok(fdCount(p.pid) <= fds0, `${fdCount(p.pid)} descriptors, ${fds0} before`);
    const t0 = performance.now();
    p.signal("SIGTERM");
    await within(5000, "the proxy exits", p.status);
    assert.ok(performance.now() - t0 < 3000);
  },
  { timeoutMs: 30_000 },
);

/**
 * A backend that reads the hello, answers GO and echoes until EOF; its accept loop outlives a
 * connection the proxy reset while it waited in the accept queue (rawBackend's does not).
 */
function echoBackend(scope: Scope): { port: number } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.TcpConn>();
  scope.defer(() => {
    listener.close();
    conns.forEach((c) => c.close());
  });
  const serve = async (conn: Deno.TcpConn) => {
    const buf = new Uint8Array(64 * 1024);
    try {
      await readClientHello(conn);
      await writeAll(conn, new Uint8Array([GO]));
      for (;;) {
        const n = await conn.read(buf);
        if (n === null) break;
        await writeAll(conn, buf.subarray(0, n));
      }
      await conn.closeWrite();
    } catch { /* reset by the proxy */ }
  };
  (async () => {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await listener.accept();
      } catch (e) {
        if (e instanceof Deno.errors.BadResource) return;
        continue;
      }
      conns.add(conn);
      serve(conn).finally(() => {
        conns.delete(conn);
        try {
          conn.close();
        } catch { /* closed */ }
      });
    }
  })();
  return { port: (listener.addr as Deno.NetAddr).port };
}

e2eTest(
  "hundreds of concurrent clients, some closing or resetting during the hello or the connect: every " +
    "completed transfer arrives whole (sha256) and the proxy's descriptors return to baseline",
  async (scope) => {
    const backend = echoBackend(scope);
    const hole = await blackHole(scope);
    const dir = await Deno.makeTempDir({ prefix: "sni-steps-" });
    scope.defer(() => Deno.remove(dir, { recursive: true }));
    const p = await startProxy(scope, {
      admin: { socket: `${dir}/admin.sock` },
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      // a backend by name (resolved while the client may leave) and one that drops SYNs
      // (its connect still under way as clients reset), tried in turn
      routes: [{
        match: "a.test",
        backends: [hole, `backend.test:${backend.port}`],
        balance: "round_robin",
        health: { max_fails: 1000 },
      }],
      dns: { hosts_file: await hostsFile(scope, ["backend.test"]) },
      timeouts: { connect_ms: 150 },
      limits: { max_connections: 2000 },
      ebpf: { enabled: false },
    });
    await p.waitForLog("admin API on");
    const hello = await clientHelloBytes("a.test");
    const payload = pseudoRandomBytes(48 * 1024, 7);
    const want = sha256(payload);
    const fds0 = fdCount(p.pid);
    let rng = 12345;
    const rand = () => (rng = (rng * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
    /** A client that resets (RST) after sending `bytes`, at once or a moment later. */
    const resetter = (bytes: Uint8Array, waitMs: number) =>
      new Promise<null>((resolve) => {
        const s = net.connect(p.port(), "127.0.0.1", () => {
          s.write(bytes);
          setTimeout(() => {
            s.resetAndDestroy();
            resolve(null);
          }, waitMs);
        });
        s.on("error", () => resolve(null));
      });
    const one = async (kind: number): Promise<string | null> => {
      if (kind >= 3) {
        const cut = kind === 3 ? Math.floor(rand() * hello.length) : hello.length;
        return await resetter(hello.subarray(0, cut), Math.floor(rand() * 20));
      }
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
      try {
        if (kind === 0) {
          await writeAll(conn, hello.subarray(0, 1 + Math.floor(rand() * (hello.length - 2))));
          return null;
        }
        await writeAll(conn, hello);
        if (kind === 1) return null; // gone while the backend is connected
        const go = await readExact(conn, 1);
        assert.equal(go[0], GO);
        await writeAll(conn, payload);
        await conn.closeWrite();
        return sha256(await readExact(conn, payload.length));
      } finally {
        conn.close();
      }
    };
    const kinds = Array.from({ length: 400 }, () => Math.floor(rand() * 5));
    const got = await within(60_000, "every client done", Promise.all(kinds.map(one)));
    // every client that sent its hello and stayed was served: none refused for a name not yet read
    assert.ok(!/cannot resolve/.test(p.stderr()), p.stderr().slice(-2000));
    const whole = got.filter((h) => h !== null);
    assert.equal(whole.length, kinds.filter((k) => k === 2).length);
    assert.ok(whole.every((h) => h === want));
    await untilSessions(p, 0, 15_000);
    await sleep(200);
    assert.ok(fdCount(p.pid) <= fds0, `${fdCount(p.pid)} descriptors, ${fds0} before`);
  },
  { timeoutMs: 90_000 },
);

e2eTest(
  "many idle clients time out at client_hello_ms together; after a reload changes it (and " +
    "connect_ms), new clients get the new length while those before keep theirs",
  async (scope) => {
    const hole = await blackHole(scope);
    const config = {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "hole.test", backends: [hole] }],
      timeouts: { client_hello_ms: 600, connect_ms: 600 },
      ebpf: { enabled: false },
    };
    const p = await startProxy(scope, config);
    const fds0 = fdCount(p.pid);
    const open = (n: number) =>
      Promise.all(
        Array.from({ length: n }, () => Deno.connect({ hostname: "127.0.0.1", port: p.port() })),
      );
    const closedAt = (c: Deno.TcpConn, t0: number) =>
      readOutcome(c).then(() => performance.now() - t0);
    const t0 = performance.now();
    const first = await open(100);
    const firstDial = await helloSent(p.port(), "hole.test");
    const firstClosed = [...first, firstDial].map((c) => closedAt(c, t0));
    const mark = p.stderr().length;
    await p.writeConfig({
      ...config,
      timeouts: { client_hello_ms: 2000, connect_ms: 2000 },
    });
    p.signal("SIGHUP");
    await p.waitForLog("reloaded", 5000, mark);
    const t1 = performance.now();
    const second = await open(100);
    const secondDial = await helloSent(p.port(), "hole.test");
    const secondClosed = [...second, secondDial].map((c) => closedAt(c, t1));
    const a = await within(5000, "first batch closed", Promise.all(firstClosed));
    assert.ok(Math.max(...a) < 1800, `first batch closed after ${Math.max(...a)} ms`);
    const b = await within(8000, "second batch closed", Promise.all(secondClosed));
    assert.ok(Math.min(...b) >= 1800, `second batch closed after ${Math.min(...b)} ms`);
    assert.ok(Math.max(...b) < 4000, `second batch closed after ${Math.max(...b)} ms`);
    [...first, ...second, firstDial, secondDial].forEach((c) => c.close());
    const entries = await accessEntries(p, 202);
    const reasons = entries.map((e) => e.close_reason);
    assert.equal(reasons.filter((r) => r === "client_hello_timeout").length, 200);
    assert.equal(reasons.filter((r) => r === "connect_failed").length, 2);
    await sleep(200);
    assert.ok(fdCount(p.pid) <= fds0, `${fdCount(p.pid)} descriptors, ${fds0} before`);
  },
  { timeoutMs: 40_000 },
);
