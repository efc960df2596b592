/**
 * End to end, hardening: a `$sni` name that resolves to an internal address (or to the proxy
 * itself) is not dialled.
 */
import assert from "node:assert/strict";
import {
  curl,
  e2eTest,
  identityBackend,
  opensslClient,
  type Scope,
  startProxy,
  tlsFailure,
  unusedPort,
  whoAnswers,
} from "./helpers.ts";
import { startFakeDns } from "./fixtures/dns_server.ts";

/** The proxy's `/metrics` text. */
async function metrics(port: number): Promise<string> {
  const res = await fetch(`http://127.0.0.1:${port}/metrics`);
  return await res.text();
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
    const dynamic = (match: string, port: number, extra: Record<string, unknown> = {}) => ({
      match,
      backends: [`$sni:${port}`],
      allow: [match.replace(/^[^.]+/, "*")],
      ...extra,
    });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }, { address: "127.0.0.1:0", protocol: "http" }],
      routes: [
        dynamic("*.b.test", tlsB.port),
        dynamic("api7.c.test", tlsB.port, { allow_private: true }),
        dynamic("api42.c.test", tlsB.port, { allow_addresses: ["127.0.0.0/8"] }),
        dynamic("apix.c.test", tlsB.port, { allow_addresses: ["10.0.0.0/8"] }),
        dynamic("*.h.test", httpB.port),
        dynamic("ok.hp.test", httpB.port, { allow_private: true }),
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
  const dynamic = (match: string, port: number) => ({
    match,
    backends: [`$sni:${port}`],
    allow: [match],
    allow_private: true,
  });
  const proxy = await startProxy(s, {
    listeners: [{ address: `127.0.0.1:${own}` }, { address: `0.0.0.0:${wildcard}` }],
    routes: [
      { match: "a.test", backends: [`127.0.0.1:${own}`] }, // a configured loop
      dynamic("*.c.test", own), // the name resolves to the listener's own address
      dynamic("*.b.test", wildcard), // ... to a local address of a wildcard listener
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
