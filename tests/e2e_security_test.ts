/**
 * End to end, hardening: a `$sni` name that resolves to an internal address (or to the proxy
 * itself) is not dialled; random `$sni` names do not grow the metrics or the memory; running out
 * of descriptors pauses accepting instead of taking healthy backends down.
 */
import assert from "node:assert/strict";
import {
  clientHelloBytes,
  curl,
  e2eTest,
  identityBackend,
  opensslClient,
  rawServer,
  readClientHello,
  readToEnd,
  type Scope,
  sleep,
  sniRoute,
  startProxy,
  tlsFailure,
  unusedPort,
  whoAnswers,
  within,
  writeAll,
} from "./harness/mod.ts";
import { startFakeDns } from "./fixtures/dns_server.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** The proxy's `/metrics` text. */
async function metrics(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  return await res.text();
}

/** The `/metrics` text once no connection is live any more (or after 5 s). */
async function settledMetrics(port: number): Promise<string> {
  let text = await metrics(port);
  for (let i = 0; i < 50 && sample(text, "connections_active") > 0; i++) {
    await sleep(100);
    text = await metrics(port);
  }
  return text;
}

/** A sample's value in Prometheus text (0 when absent); `series` as printed, labels included. */
function sample(text: string, series: string): number {
  const line = text.split("\n").find((l) => l.startsWith(`sni_proxy_${series} `));
  return line ? Number(line.slice(line.lastIndexOf(" ") + 1)) : 0;
}

/** A fake DNS server that lives as long as the test. */
function fakeDns(s: Scope, records: Parameters<typeof startFakeDns>[0]) {
  const dns = startFakeDns(records);
  s.defer(() => dns.close());
  return dns;
}

/** A plain-TCP backend that reads the relayed hello, answers `ok` and waits for the client's EOF. */
async function okBackend(s: Scope) {
  return await rawServer(s, async (conn) => {
    await readClientHello(conn);
    await writeAll(conn, encoder.encode("ok\n"));
    await readToEnd(conn);
  }, { tls: false });
}

/**
 * One raw session: sends `hello`, expects the backend's `ok`, holds the connection `holdMs`,
 * closes. Resolves with what happened (`ok`, or what went wrong).
 */
async function okSession(port: number, hello: Uint8Array, holdMs = 0): Promise<string> {
  let conn: Deno.TcpConn | null = null;
  try {
    conn = await Deno.connect({ hostname: "127.0.0.1", port });
    await writeAll(conn, hello);
    const buf = new Uint8Array(16);
    const n = await conn.read(buf);
    const answer = n === null ? "eof" : decoder.decode(buf.subarray(0, n));
    if (answer !== "ok\n") return `answer ${JSON.stringify(answer)}`;
    if (holdMs) await sleep(holdMs);
    return "ok";
  } catch (e) {
    return `${(e as Error).name}: ${(e as Error).message}`;
  } finally {
    try {
      conn?.close();
    } catch { /* closed */ }
  }
}

/** `hello` (a ClientHello for `from`) with the server name replaced by `to`, of the same length. */
function renamedHello(hello: Uint8Array, from: string, to: string): Uint8Array {
  assert.equal(to.length, from.length);
  const needle = encoder.encode(from);
  const out = hello.slice();
  let found = 0;
  outer: for (let i = 0; i + needle.length <= out.length; i++) {
    for (let j = 0; j < needle.length; j++) if (out[i + j] !== needle[j]) continue outer;
    out.set(encoder.encode(to), i);
    found++;
  }
  assert.ok(found > 0, `${from} is not in the hello`);
  return out;
}

/** Runs `tasks` with at most `n` at a time; resolves with their results in order. */
async function pooled<T>(n: number, tasks: (() => Promise<T>)[]): Promise<T[]> {
  const out: T[] = new Array(tasks.length);
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) {
      const i = next++;
      out[i] = await tasks[i]();
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, tasks.length) }, worker));
  return out;
}

/** The proxy's resident set size, KiB. */
async function rssKiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]);
}

e2eTest(
  "an allowed $sni name that resolves to an internal address is refused unless the route opts in",
  async (s) => {
    const tlsB = await identityBackend(s, "internal");
    const httpB = await identityBackend(s, "internal-http", { tls: false });
    const dns = fakeDns(s, {
      "x.b.test": { a: ["127.0.0.1"], ttl: 300 },
      "v6.b.test": { aaaa: ["::1"], ttl: 300 },
      "mapped.b.test": { aaaa: ["::ffff:7f00:1"], ttl: 300 }, // IPv4-mapped 127.0.0.1
      "api7.c.test": { a: ["127.0.0.1"], ttl: 300 },
      "api42.c.test": { a: ["127.0.0.1"], ttl: 300 },
      "apix.c.test": { a: ["127.0.0.1"], ttl: 300 },
      "x.h.test": { a: ["127.0.0.1"], ttl: 300 },
      "ok.hp.test": { a: ["127.0.0.1"], ttl: 300 },
    });
    const metricsPort = unusedPort();
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }, { address: "127.0.0.1:0", protocol: "http" }],
      routes: [
        sniRoute("*.b.test", tlsB.port),
        sniRoute("api7.c.test", tlsB.port, { allow_private: true }),
        sniRoute("api42.c.test", tlsB.port, { allow_addresses: ["127.0.0.0/8"] }),
        sniRoute("apix.c.test", tlsB.port, { allow_addresses: ["10.0.0.0/8"] }),
        sniRoute("*.h.test", httpB.port),
        sniRoute("ok.hp.test", httpB.port, { allow_private: true }),
      ],
      dns: { servers: [`${dns.server.ipAddr}:${dns.server.port}`], hosts_file: false },
      metrics: { address: `127.0.0.1:${metricsPort}` },
    });
    const port = proxy.port(0);

    // refused: the TLS client gets unrecognized_name, nothing is dialled
    for (let i = 0; i < 3; i++) {
      const r = await opensslClient(port, "x.b.test");
      assert.equal(r.answer, null);
      assert.match(r.stdout + r.stderr, /unrecognized.name|alert number 112/i, r.stderr);
    }
    for (const name of ["v6.b.test", "mapped.b.test", "apix.c.test"]) {
      assert.notEqual(await tlsFailure(port, name), null, `${name} was served`);
    }
    assert.equal(tlsB.accepted, 0, "no connection reached the internal backend");
    const e = await proxy.waitAccess((e) => e.sni === "x.b.test");
    assert.equal(e.close_reason, "address_denied");
    assert.equal(e.backend, `x.b.test:${tlsB.port}`);
    assert.match(String(e.error), /127\.0\.0\.1 \(loopback\)/);
    const v6 = await proxy.waitAccess((e) => e.sni === "v6.b.test");
    assert.equal(v6.close_reason, "address_denied");
    assert.match(String(v6.error), /::1 \(loopback\)/);

    // the HTTP listener answers 421
    const h = await curl(proxy.port(1), "x.h.test", { http: true });
    assert.match(h.stdout, /status=421$/, `${h.stdout} ${h.stderr}`);
    assert.equal(httpB.accepted, 0);

    // with the opt-in the same loopback backends are reached
    assert.equal(await whoAnswers(port, "api7.c.test"), "internal", "allow_private");
    assert.equal(await whoAnswers(port, "api42.c.test"), "internal", "allow_addresses");
    const hp = await curl(proxy.port(1), "ok.hp.test", { http: true });
    assert.equal(hp.stdout, "internal-http\nstatus=200", hp.stderr);

    // logged once per route and kind, not per connection; the fix is named
    const lines = proxy.stderr().split("\n").filter((l) =>
      l.includes('route "*.b.test": refusing')
    );
    assert.equal(lines.length, 1, lines.join("\n"));
    assert.match(lines[0], /127\.0\.0\.1 is a loopback address/);
    assert.match(lines[0], /routes\[0\]\.allow_private/);
    await proxy.waitForLog('route "apix.c.test": refusing');

    // counted, and the backends' health is untouched
    const text = await metrics(metricsPort);
    // x.b.test ×3, v6, mapped, apix.c.test, x.h.test
    assert.equal(sample(text, 'backend_address_denied_total{kind="loopback"}'), 7, text);
    assert.equal(sample(text, 'connections_closed_total{reason="address_denied"}'), 7, text);
    assert.equal(sample(text, "connect_failures_total"), 0, text);
  },
);

e2eTest("the proxy never dials its own listeners, even with allow_private", async (s) => {
  const own = unusedPort();
  const wildcard = unusedPort();
  const dns = fakeDns(s, {
    "api7.c.test": { a: ["127.0.0.1"], ttl: 300 },
    "x.b.test": { a: ["127.0.0.1"], ttl: 300 },
  });
  const metricsPort = unusedPort();
  const optIn = { allow_private: true };
  const proxy = await startProxy(s, {
    listeners: [{ address: `127.0.0.1:${own}` }, { address: `0.0.0.0:${wildcard}` }],
    routes: [
      { match: "a.test", backends: [`127.0.0.1:${own}`] }, // a configured loop
      sniRoute("*.c.test", own, optIn), // the name resolves to the listener's own address
      sniRoute("*.b.test", wildcard, optIn), // ... to a local address of a wildcard listener
    ],
    dns: { servers: [`${dns.server.ipAddr}:${dns.server.port}`], hosts_file: false },
    metrics: { address: `127.0.0.1:${metricsPort}` },
  });
  for (const name of ["a.test", "api7.c.test", "x.b.test"]) {
    const r = await opensslClient(own, name);
    assert.match(
      r.stdout + r.stderr,
      /unrecognized.name|alert number 112/i,
      `${name}: ${r.stderr}`,
    );
  }
  const e = await proxy.waitAccess((e) => e.sni === "x.b.test");
  assert.equal(e.close_reason, "address_denied");
  assert.match(String(e.error), /127\.0\.0\.1 \(own_listener\)/);
  await proxy.waitForLog("is one of this proxy's own listening sockets (a loop)");
  const text = await metrics(metricsPort);
  assert.equal(sample(text, 'backend_address_denied_total{kind="own_listener"}'), 3, text);
  // three clients, three connections: none came back around through the proxy
  assert.equal(sample(text, "connections_accepted_total"), 3, text);
});

e2eTest("1,000 random $sni names leave /metrics and the proxy's memory bounded", async (s) => {
  const backend = await okBackend(s);
  const dns = fakeDns(s, {});
  const metricsPort = unusedPort();
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [sniRoute("*.b.test", backend.port, { allow_private: true })],
    dns: { servers: [`${dns.server.ipAddr}:${dns.server.port}`], hosts_file: false },
    metrics: { address: `127.0.0.1:${metricsPort}` },
    log: { level: "info" },
    // the V8 young generation as `deno task start` caps it, so RSS follows what is kept
  }, { env: { DENO_V8_FLAGS: "--max-semi-space-size=4" } });
  const template = "n0000000.b.test";
  const hello = await clientHelloBytes(template);
  let serial = 0;
  /** `n` sessions to fresh random names; every other name resolves, the rest are NXDOMAIN. */
  const round = async (n: number) => {
    const tasks = Array.from({ length: n }, () => {
      const i = serial++;
      const name = `${crypto.randomUUID().slice(0, 7)}${i % 2}.b.test`;
      if (i % 2 === 0) dns.records.set(name, { a: ["127.0.0.1"], ttl: 300 });
      return async () => {
        const r = await okSession(proxy.port(), renamedHello(hello, template, name));
        return i % 2 === 0 ? r : "skip";
      };
    });
    const results = await pooled(16, tasks);
    const failed = results.filter((r) => r !== "ok" && r !== "skip");
    assert.deepEqual(failed, [], "every name that resolves is served");
  };
  // warm-up: every code path and label (served, connect_failed), the heap at its working size
  await round(1000);
  const before = await settledMetrics(metricsPort);
  const rssBefore = await rssKiB(proxy.pid);

  await round(1000);
  const after = await settledMetrics(metricsPort);
  const rssAfter = await rssKiB(proxy.pid);

  const backendSeries = after.split("\n").filter((l) =>
    l.startsWith("sni_proxy_connections_backend_total{")
  );
  assert.deepEqual(backendSeries, [
    `sni_proxy_connections_backend_total{backend="$sni:${backend.port}"} 2000`,
  ]);
  assert.doesNotMatch(after, /[0-9a-f]{7}[01]\.b\.test/, "no requested name is a label");
  // the same series; only their numbers grew
  assert.ok(
    after.length - before.length < 100,
    `/metrics grew from ${before.length} to ${after.length} bytes`,
  );
  const stats = await (await fetch(`http://127.0.0.1:${metricsPort}/stats`)).json();
  assert.equal(Object.keys(stats.connections.by_backend).length, 1);
  assert.equal(stats.connections.closed.done, 1000);
  assert.equal(stats.connections.closed.connect_failed, 1000);
  const grewMiB = (rssAfter - rssBefore) / 1024;
  assert.ok(grewMiB < 16, `RSS grew ${grewMiB.toFixed(1)} MiB over 1,000 names`);
  console.log(
    `/metrics ${before.length} → ${after.length} bytes; RSS ${rssBefore} → ${rssAfter} KiB`,
  );
}, { timeoutMs: 120_000 });

e2eTest(
  "out of descriptors (prlimit --nofile=256), 1,000 clients are all served and the backend stays up",
  async (s) => {
    const backend = await okBackend(s);
    const metricsPort = unusedPort();
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{
        match: "a.test",
        backends: [backend.address],
        health: { max_fails: 3, check: { interval_ms: 200, timeout_ms: 1000 } },
      }],
      metrics: { address: `127.0.0.1:${metricsPort}` },
      log: { level: "info" },
    }, { wrapper: ["prlimit", "--nofile=256"] });
    const hello = await clientHelloBytes("a.test");
    const t0 = performance.now();
    // all at once, each holding its connection a while: far more than 256 descriptors' worth
    const results = await within(
      60_000,
      "1,000 sessions",
      Promise.all(Array.from({ length: 1000 }, () => okSession(proxy.port(), hello, 300))),
    );
    const seconds = (performance.now() - t0) / 1000;
    const failed = results.filter((r) => r !== "ok");
    assert.equal(failed.length, 0, `${failed.length} of 1,000 failed, e.g. ${failed.slice(0, 3)}`);
    // right after the pressure: served at once
    const t1 = performance.now();
    assert.equal(await okSession(proxy.port(), hello), "ok");
    assert.ok(performance.now() - t1 < 1000, "served within a second after the load");

    const text = await settledMetrics(metricsPort);
    assert.ok(sample(text, 'accept_paused_total{reason="fd_reserve"}') >= 1, text);
    assert.equal(sample(text, 'connections_closed_total{reason="done"}'), 1001, text);
    assert.equal(sample(text, 'connections_closed_total{reason="no_backend"}'), 0, text);
    assert.equal(sample(text, "connect_failures_total"), 0, text);
    assert.equal(sample(text, "max_fds"), 256, text);
    const log = proxy.stderr();
    assert.doesNotMatch(log, /backend .* down/, "the backend was never marked down");
    assert.doesNotMatch(log, /EMFILE|Too many open files/);
    // one line when the pressure starts, one when it is over
    const paused = log.split("\n").filter((l) => l.includes("not accepting until connections"));
    assert.equal(paused.length, 1, paused.join("\n"));
    await proxy.waitForLog("accepting again: file descriptors to spare", 5000);
    console.log(`1,000 sessions under 256 descriptors in ${seconds.toFixed(1)} s`);
  },
  { timeoutMs: 120_000 },
);
