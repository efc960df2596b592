/** End to end: which backend a real client reaches, through the real proxy process. */
import assert from "node:assert/strict";
import {
  curl,
  type NamedBackend,
  namedBackend,
  sniRoute,
  testCerts,
  tlsConnect,
  unusedPort,
  withProxy,
} from "./harness/mod.ts";

async function backends(...names: string[]): Promise<Record<string, NamedBackend>> {
  const out: Record<string, NamedBackend> = {};
  for (const n of names) out[n] = await namedBackend(n);
  return out;
}

async function closeAll(b: Record<string, NamedBackend>) {
  for (const x of Object.values(b)) await x.close();
}

async function opensslNoSni(port: number): Promise<string> {
  const c = await testCerts();
  const out = await new Deno.Command("openssl", {
    args: ["s_client", "-connect", `127.0.0.1:${port}`, "-noservername", "-CAfile", c.caFile],
    stdin: "null",
  }).output();
  return new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
}

Deno.test("exact, wildcard, regex, catch-all and default routes reach their backends (curl)", async () => {
  const b = await backends("exact", "wild", "regex", "any", "dflt");
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [
        { match: "a.test", backends: [b.exact.address] },
        { match: "*.b.test", backends: [b.wild.address] },
        { match: "~^api[0-9]+\\.c\\.test$", backends: [b.regex.address] },
        { match: "other.test", backends: [b.any.address] },
      ],
      default_backend: b.dflt.address,
    }, async (p) => {
      const port = p.port();
      const expect: [string, string][] = [
        ["a.test", "exact"],
        ["x.y.b.test", "wild"],
        ["b.test", "dflt"],
        ["api7.c.test", "regex"],
        ["apix.c.test", "dflt"],
        ["other.test", "any"],
        ["A.TEST", "exact"],
      ];
      for (const [name, backend] of expect) {
        const r = await curl(port, name);
        assert.equal(r.body, backend, `${name}: ${r.stderr}`);
      }
      const e = await p.waitAccess((e) => e.sni === "api7.c.test");
      assert.equal(e.route, "~^api[0-9]+\\.c\\.test$");
      assert.equal(e.backend, b.regex.address);
      assert.equal(e.close_reason, "done");
      assert.equal(e.mode, "userspace");
      const d = await p.waitAccess((e) => e.sni === "b.test");
      assert.equal(d.route, "default_backend");
    });
  } finally {
    await closeAll(b);
  }
});

Deno.test("a trailing-dot name routes like the name without it (Deno TLS client)", async () => {
  const b = await backends("exact");
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [b.exact.address] }],
    }, async (p) => {
      const conn = await tlsConnect(p.port(), "a.test");
      conn.close();
      const r = await curl(p.port(), "a.test.");
      assert.equal(r.body, "exact", r.stderr);
    });
  } finally {
    await closeAll(b);
  }
});

Deno.test("no SNI goes to the default backend; without one the client gets unrecognized_name", async () => {
  const b = await backends("dflt");
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [b.dflt.address] }],
      default_backend: b.dflt.address,
    }, async (p) => {
      const out = await opensslNoSni(p.port());
      assert.match(out, /Verify return code: 0 \(ok\)/, out);
      const e = await p.waitAccess((e) => e.sni === null);
      assert.equal(e.route, "default_backend");
    });
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [b.dflt.address] }],
    }, async (p) => {
      const out = await opensslNoSni(p.port());
      assert.match(out, /unrecognized name|alert number 112/i, out);
      const r = await curl(p.port(), "nomatch.test");
      assert.notEqual(r.code, 0);
      assert.match(r.stderr, /unrecognized name|alert/i);
      const e = await p.waitAccess((e) => e.sni === "nomatch.test");
      assert.equal(e.close_reason, "no_route");
      assert.equal(e.backend, null);
    });
  } finally {
    await closeAll(b);
  }
});

Deno.test("HTTP listeners route by Host, and answer 421 when nothing matches", async () => {
  const a = await namedBackend("plain-a", { tls: false });
  const w = await namedBackend("plain-w", { tls: false });
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
      routes: [
        { match: "a.test", backends: [a.address] },
        { match: "*.b.test", backends: [w.address] },
      ],
    }, async (p) => {
      assert.equal((await curl(p.port(), "a.test", { http: true })).body, "plain-a");
      assert.equal((await curl(p.port(), "q.b.test", { http: true })).body, "plain-w");
      const miss = await curl(p.port(), "zzz.test", {
        http: true,
        extra: ["-w", "%{http_code}"],
      });
      assert.equal(miss.body, "421");
    });
  } finally {
    await a.close();
    await w.close();
  }
});

Deno.test("an IPv6 listener proxies to an IPv6 backend", async () => {
  const b6 = await namedBackend("v6", { hostname: "::1" });
  try {
    await withProxy({
      listeners: [{ address: "[::1]:0" }],
      routes: [{ match: "a.test", backends: [b6.address] }],
    }, async (p) => {
      const r = await curl(p.port(), "a.test", { ip: "::1" });
      assert.equal(r.body, "v6", r.stderr);
      const e = await p.waitAccess((e) => e.sni === "a.test");
      assert.match(String(e.client), /^\[::1\]:\d+$/);
      assert.match(String(e.listener), /^\[::1\]:\d+$/);
    });
  } finally {
    await b6.close();
  }
});

Deno.test("round_robin spreads over backends, source_hash keeps one client on one backend", async () => {
  const b = await backends("one", "two");
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }, { address: "127.0.0.1:0" }],
      routes: [
        { match: "a.test", backends: [b.one.address, b.two.address] },
        { match: "other.test", backends: [b.one.address, b.two.address], balance: "source_hash" },
      ],
    }, async (p) => {
      const rr = [];
      for (let i = 0; i < 4; i++) rr.push((await curl(p.port(), "a.test")).body);
      assert.deepEqual(rr.toSorted(), ["one", "one", "two", "two"]);
      assert.notEqual(rr[0], rr[1]);
      const sh = new Set<string>();
      for (let i = 0; i < 4; i++) sh.add((await curl(p.port(1), "other.test")).body);
      assert.equal(sh.size, 1);
    });
  } finally {
    await closeAll(b);
  }
});

Deno.test("hostname backends resolve, and $sni routes connect only to allowed names", async () => {
  const b = await backends("byname");
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }, { address: "127.0.0.1:0" }],
      routes: [
        { match: "a.test", backends: [`localhost:${b.byname.port}`] },
        // localhost is loopback: internal addresses need the opt-in
        sniRoute("*", b.byname.port, { allow: ["localhost"], allow_private: true }),
      ],
    }, async (p) => {
      assert.equal((await curl(p.port(), "a.test")).body, "byname");
      assert.equal((await curl(p.port(), "localhost")).body, "byname");
      const e = await p.waitAccess((e) => e.sni === "localhost");
      assert.equal(e.backend, `localhost:${b.byname.port}`);
      const denied = await curl(p.port(), "evil.test");
      assert.notEqual(denied.code, 0, "a name outside the allow list is refused");
      const d = await p.waitAccess((e) => e.sni === "evil.test");
      assert.equal(d.close_reason, "no_route");
      await p.waitForLog("not its allow list");
    });
  } finally {
    await closeAll(b);
  }
});

Deno.test("ACL: a denied source is closed before anything is read; others are served", async () => {
  const b = await backends("ok");
  try {
    await withProxy({
      listeners: [{ address: "0.0.0.0:0" }],
      routes: [{ match: "a.test", backends: [b.ok.address] }],
      acl: { deny: ["127.0.0.2/32"] },
    }, async (p) => {
      const denied = await curl(p.port(), "a.test", { extra: ["--interface", "127.0.0.2"] });
      assert.notEqual(denied.code, 0, "denied source must not get through");
      const e = await p.waitAccess((e) => e.close_reason === "acl_denied");
      assert.match(String(e.client), /^127\.0\.0\.2:/);
      assert.equal(e.bytes_up, 0);
      const ok = await curl(p.port(), "a.test");
      assert.equal(ok.body, "ok", ok.stderr);
    });
  } finally {
    await closeAll(b);
  }
});

Deno.test("a backend that refuses the connection: client closed, logged, proxy keeps serving", async () => {
  const b = await backends("alive");
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [
        { match: "a.test", backends: [`127.0.0.1:${unusedPort()}`] },
        { match: "other.test", backends: [b.alive.address] },
      ],
      timeouts: { connect_ms: 2000 },
    }, async (p) => {
      const r = await curl(p.port(), "a.test");
      assert.notEqual(r.code, 0);
      const e = await p.waitAccess((e) => e.sni === "a.test");
      assert.equal(e.close_reason, "connect_failed");
      await p.waitForLog(/connect to 127\.0\.0\.1:\d+ failed/);
      assert.equal((await curl(p.port(), "other.test")).body, "alive");
    });
  } finally {
    await closeAll(b);
  }
});

Deno.test("$sni backends resolve through the configured DNS servers, cached by TTL", async () => {
  const { startFakeDns } = await import("./fixtures/dns_server.ts");
  const b = await backends("resolved");
  const dns = startFakeDns({ "web.b.test": { a: ["127.0.0.1"], ttl: 300 } });
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      // the test DNS answers loopback
      routes: [sniRoute("*.b.test", b.resolved.port, { allow_addresses: ["127.0.0.0/8"] })],
      dns: { servers: [`${dns.server.ipAddr}:${dns.server.port}`], hosts_file: false },
      metrics: { address: `127.0.0.1:${unusedPort()}` },
    }, async (p) => {
      for (let i = 0; i < 3; i++) {
        const r = await curl(p.port(), "web.b.test");
        assert.equal(r.body, "resolved", r.stderr);
      }
      assert.equal(dns.queries("web.b.test", "A"), 1, "one DNS query, then cache hits");
      const e = await p.waitAccess((e) => e.sni === "web.b.test");
      assert.equal(e.backend, `web.b.test:${b.resolved.port}`);
      const unknown = await curl(p.port(), "nx.b.test");
      assert.notEqual(unknown.code, 0, "a name DNS does not know is refused");
      await p.waitForLog(/connect to nx\.b\.test:\d+ failed/);
    });
  } finally {
    await dns.close();
    await closeAll(b);
  }
});
