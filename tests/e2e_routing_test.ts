/**
 * End to end, routing: which backend a real client (Deno TLS, openssl s_client, curl, node:net)
 * reaches through the real proxy process, and how the proxy refuses what it must refuse.
 */
import assert from "node:assert/strict";
import {
  captureClientHello,
  curl,
  e2eTest,
  identityBackend,
  nodeConnect,
  opensslClient,
  readOutcome,
  sleep,
  sniRoute,
  startProxy,
  tlsConnect,
  tlsFailure,
  unusedPort,
  whoAnswers,
  within,
  writeAll,
} from "./harness/mod.ts";

e2eTest(
  "exact, wildcard, regex routes and default_backend each reach their own backend",
  async (s) => {
    const exact = await identityBackend(s, "exact");
    const wild = await identityBackend(s, "wild");
    const regex = await identityBackend(s, "regex");
    const dflt = await identityBackend(s, "dflt");
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [
        { match: "a.test", backends: [exact.address] },
        { match: "*.b.test", backends: [wild.address] },
        { match: "~^api[0-9]+\\.c\\.test$", backends: [regex.address] },
      ],
      default_backend: dflt.address,
    });
    const port = proxy.port();
    const expected: [string, string][] = [
      ["a.test", "exact"],
      ["x.b.test", "wild"],
      ["x.y.b.test", "wild"], // one or more labels
      ["b.test", "dflt"], // *.b.test does not cover b.test itself
      ["api7.c.test", "regex"],
      ["api42.c.test", "regex"],
      ["apix.c.test", "dflt"],
      ["nomatch.test", "dflt"],
    ];
    for (const [name, backend] of expected) {
      assert.equal(await whoAnswers(port, name), backend, `SNI ${name}`);
    }
    const r = await proxy.waitAccess((e) => e.sni === "api42.c.test");
    assert.equal(r.route, "~^api[0-9]+\\.c\\.test$");
    assert.equal(r.backend, regex.address);
    assert.equal(r.close_reason, "done");
    assert.equal(r.mode, "userspace");
    const w = await proxy.waitAccess((e) => e.sni === "x.y.b.test");
    assert.equal(w.route, "*.b.test");
    const d = await proxy.waitAccess((e) => e.sni === "b.test");
    assert.equal(d.route, "default_backend");
    assert.equal(d.backend, dflt.address);
  },
);

e2eTest("a catch-all `*` route takes every name the routes before it did not", async (s) => {
  const exact = await identityBackend(s, "exact");
  const any = await identityBackend(s, "any");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [
      { match: "a.test", backends: [exact.address] },
      { match: "*", backends: [any.address] },
    ],
  });
  assert.equal(await whoAnswers(proxy.port(), "a.test"), "exact");
  assert.equal(await whoAnswers(proxy.port(), "other.test"), "any");
  assert.equal(await whoAnswers(proxy.port(), "x.y.b.test"), "any");
  const e = await proxy.waitAccess((e) => e.sni === "other.test");
  assert.equal(e.route, "*");
});

e2eTest("names match case-insensitively and with a trailing dot (openssl s_client)", async (s) => {
  const exact = await identityBackend(s, "exact");
  const wild = await identityBackend(s, "wild");
  const dflt = await identityBackend(s, "dflt");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [
      { match: "a.test", backends: [exact.address] },
      { match: "*.B.Test", backends: [wild.address] },
    ],
    default_backend: dflt.address,
  });
  const cases: [string, string][] = [
    ["A.TeSt", "exact"],
    ["a.test.", "exact"],
    ["A.TEST.", "exact"],
    ["x.b.test", "wild"],
    ["X.Y.B.TEST.", "wild"],
  ];
  for (const [name, backend] of cases) {
    const r = await opensslClient(proxy.port(), name);
    assert.equal(r.answer, backend, `-servername ${name}:\n${r.stdout}\n${r.stderr}`);
  }
});

e2eTest("a hello without SNI goes to default_backend (openssl -noservername)", async (s) => {
  const exact = await identityBackend(s, "exact");
  const dflt = await identityBackend(s, "dflt");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [exact.address] }],
    default_backend: dflt.address,
  });
  const r = await opensslClient(proxy.port(), null);
  assert.equal(r.answer, "dflt", `${r.stdout}\n${r.stderr}`);
  const e = await proxy.waitAccess((e) => e.sni === null);
  assert.equal(e.route, "default_backend");
  assert.equal(e.backend, dflt.address);
});

e2eTest(
  "without a route or default_backend the client gets an unrecognized_name alert",
  async (s) => {
    const exact = await identityBackend(s, "exact");
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [exact.address] }],
    });
    // no SNI at all
    const noSni = await opensslClient(proxy.port(), null);
    assert.equal(noSni.answer, null);
    assert.match(
      noSni.stdout + noSni.stderr,
      /unrecognized.name|alert number 112/i,
      `openssl output:\n${noSni.stdout}\n${noSni.stderr}`,
    );
    // an SNI that no route takes
    const unknown = await opensslClient(proxy.port(), "nomatch.test");
    assert.equal(unknown.answer, null);
    assert.match(unknown.stdout + unknown.stderr, /unrecognized.name|alert number 112/i);
    // and a Deno client fails its handshake
    assert.notEqual(await tlsFailure(proxy.port(), "other.test"), null);
    assert.equal(exact.accepted, 0, "the backend of another route was never contacted");

    const e1 = await proxy.waitAccess((e) => e.sni === null);
    assert.equal(e1.close_reason, "no_route");
    assert.equal(e1.backend, null);
    const e2 = await proxy.waitAccess((e) => e.sni === "nomatch.test");
    assert.equal(e2.close_reason, "no_route");
    // still serving
    assert.equal(await whoAnswers(proxy.port(), "a.test"), "exact");
  },
);

e2eTest(
  "an http listener routes by Host and answers 421 when no route matches (curl)",
  async (s) => {
    const exact = await identityBackend(s, "exact", { tls: false });
    const wild = await identityBackend(s, "wild", { tls: false });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
      routes: [
        { match: "a.test", backends: [exact.address] },
        { match: "*.b.test", backends: [wild.address] },
      ],
    });
    const port = proxy.port();
    assert.equal(proxy.listeners[0].protocol, "http");
    const a = await curl(port, "a.test", { http: true });
    assert.equal(a.stdout, "exact\nstatus=200", a.stderr);
    // curl sends "Host: a.test:PORT": the port is not part of the name
    assert.equal(exact.hosts[0], `a.test:${port}`);
    const w = await curl(port, "X.Y.B.TEST", { http: true });
    assert.equal(w.stdout, "wild\nstatus=200", w.stderr);

    const miss = await curl(port, "nomatch.test", { http: true });
    assert.match(miss.stdout, /status=421$/, `curl: ${miss.stdout} ${miss.stderr}`);
    assert.equal(exact.accepted + wild.accepted, 2, "the 421 was not relayed from a backend");
    const e = await proxy.waitAccess((e) => e.close_reason === "no_route");
    assert.equal(e.sni, "nomatch.test");
    const ok = await proxy.waitAccess((e) => e.backend === exact.address);
    assert.equal(ok.route, "a.test");
    assert.equal(ok.close_reason, "done");
  },
);

e2eTest("an IPv6 listener relays to an IPv6 backend", async (s) => {
  const v6 = await identityBackend(s, "v6", { hostname: "::1" });
  const proxy = await startProxy(s, {
    listeners: [{ address: "[::1]:0" }],
    routes: [{ match: "a.test", backends: [v6.address] }],
  });
  assert.equal(proxy.listeners[0].host, "::1");
  assert.equal(await whoAnswers(proxy.port(), "a.test", "::1"), "v6");
  const e = await proxy.waitAccess((e) => e.sni === "a.test");
  assert.equal(e.backend, `[::1]:${v6.port}`);
  assert.match(e.client, /^\[::1\]:\d+$/);
  assert.equal(e.listener, `[::1]:${proxy.port()}`);
});

e2eTest(
  "round_robin alternates over its backends; source_hash keeps one client IP on one",
  async (s) => {
    const rr1 = await identityBackend(s, "rr1");
    const rr2 = await identityBackend(s, "rr2");
    const sh1 = await identityBackend(s, "sh1");
    const sh2 = await identityBackend(s, "sh2");
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [
        { match: "a.test", backends: [rr1.address, rr2.address], balance: "round_robin" },
        { match: "*.b.test", backends: [sh1.address, sh2.address], balance: "source_hash" },
      ],
    });
    const rr: string[] = [];
    for (let i = 0; i < 8; i++) rr.push(await whoAnswers(proxy.port(), "a.test"));
    assert.equal(rr.filter((n) => n === "rr1").length, 4, `round robin order: ${rr}`);
    assert.equal(rr.filter((n) => n === "rr2").length, 4, `round robin order: ${rr}`);
    for (let i = 1; i < rr.length; i++) assert.notEqual(rr[i], rr[i - 1], `alternates: ${rr}`);

    // every source IP sticks to one backend, whatever the name under the route
    for (const source of ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]) {
      const seen = new Set<string>();
      for (let i = 0; i < 4; i++) {
        const r = await curl(proxy.port(), `x${i}.b.test`, { iface: source });
        assert.equal(r.code, 0, `curl from ${source}: ${r.stderr}`);
        seen.add(r.stdout.split("\n")[0]);
      }
      assert.equal(seen.size, 1, `source ${source} reached ${[...seen]}`);
    }
  },
);

e2eTest("a backend given by host name (localhost:PORT) is resolved and reached", async (s) => {
  const named = await identityBackend(s, "named");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [`localhost:${named.port}`] }],
  });
  assert.equal(await whoAnswers(proxy.port(), "a.test"), "named");
  const e = await proxy.waitAccess((e) => e.sni === "a.test");
  assert.equal(e.close_reason, "done");
  assert.match(String(e.backend), new RegExp(`:${named.port}$`));
});

e2eTest("a $sni route connects to the requested name, only for allowed names", async (s) => {
  const dyn = await identityBackend(s, "dyn");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    // localhost is a loopback address: the route must opt in to internal addresses
    routes: [sniRoute("*", dyn.port, { allow: ["localhost"], allow_private: true })],
  });
  assert.equal(await whoAnswers(proxy.port(), "localhost"), "dyn");
  assert.equal(dyn.accepted, 1);
  // a.test is not allowed (it would be an open proxy): closed, nothing dialled
  assert.notEqual(await tlsFailure(proxy.port(), "a.test"), null);
  assert.equal(dyn.accepted, 1, "no connection was made for a name outside allow");
  const denied = await proxy.waitAccess((e) => e.sni === "a.test");
  assert.equal(denied.close_reason, "no_route");
  assert.equal(denied.backend, null);
  const ok = await proxy.waitAccess((e) => e.sni === "localhost");
  assert.equal(ok.close_reason, "done");
});

e2eTest("acl.deny closes a denied source at accept; others are served", async (s) => {
  const exact = await identityBackend(s, "exact");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [exact.address] }],
    acl: { deny: ["127.0.0.2/32"] },
  });
  const denied = await curl(proxy.port(), "a.test", { iface: "127.0.0.2" });
  assert.notEqual(denied.code, 0, `curl from a denied source succeeded: ${denied.stdout}`);
  const allowed = await curl(proxy.port(), "a.test", { iface: "127.0.0.3" });
  assert.equal(allowed.stdout, "exact\nstatus=200", allowed.stderr);

  // at accept, before anything is read: the socket closes although the client sent nothing
  const sock = await nodeConnect(proxy.port(), "127.0.0.2");
  const closed = await within(
    5000,
    "denied socket closes",
    new Promise<string>((resolve) => {
      sock.on("data", () => resolve("data"));
      sock.on("close", () => resolve("close"));
      sock.on("error", () => {});
    }),
  );
  assert.equal(closed, "close");
  const e = await proxy.waitAccess((e) => e.close_reason === "acl_denied");
  assert.match(e.client, /^127\.0\.0\.2:\d+$/);
  assert.equal(e.bytes_up, 0);
  assert.equal(e.bytes_down, 0);
  assert.equal(exact.accepted, 1, "only the allowed client reached the backend");
});

e2eTest("a non-empty acl.allow serves only the listed sources", async (s) => {
  const exact = await identityBackend(s, "exact");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [exact.address] }],
    acl: { allow: ["127.0.0.3/32", "127.0.0.4/31"] },
  });
  assert.equal((await curl(proxy.port(), "a.test", { iface: "127.0.0.3" })).code, 0);
  assert.equal((await curl(proxy.port(), "a.test", { iface: "127.0.0.5" })).code, 0);
  assert.notEqual((await curl(proxy.port(), "a.test", { iface: "127.0.0.1" })).code, 0);
  assert.notEqual((await curl(proxy.port(), "a.test", { iface: "127.0.0.6" })).code, 0);
  assert.equal(exact.accepted, 2);
  const e = await proxy.waitAccess((e) => e.close_reason === "acl_denied");
  assert.match(e.client, /^127\.0\.0\.[16]:\d+$/);
});

e2eTest("a ClientHello that does not arrive within client_hello_ms is closed", async (s) => {
  const exact = await identityBackend(s, "exact");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [exact.address] }],
    timeouts: { client_hello_ms: 500 },
  });
  const hello = await captureClientHello("a.test");
  for (const sent of [hello.subarray(0, hello.length >> 1), new Uint8Array(0)]) {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port() });
    try {
      const t0 = performance.now();
      if (sent.length) await writeAll(conn, sent);
      const outcome = await within(5000, "hello timeout", readOutcome(conn));
      const ms = performance.now() - t0;
      assert.notEqual(outcome.kind, "data", "no backend bytes for an incomplete hello");
      assert.ok(ms >= 400 && ms < 3000, `closed after ${ms.toFixed(0)} ms, want ~500`);
    } finally {
      conn.close();
    }
  }
  const e = await proxy.waitAccess((e) => e.close_reason === "client_hello_timeout");
  assert.equal(e.backend, null);
  assert.equal(exact.accepted, 0);
  assert.equal(await whoAnswers(proxy.port(), "a.test"), "exact");
});

e2eTest("garbage instead of a ClientHello is closed and the next client is served", async (s) => {
  const exact = await identityBackend(s, "exact");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [exact.address] }],
    default_backend: exact.address, // even a catch-all must not get garbage
  });
  const junk = [
    new TextEncoder().encode("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n"),
    Uint8Array.from([0x16, 0x03, 0x01, 0x00, 0x05, 0x02, 0x00, 0x00, 0x01, 0x00]), // ServerHello
    Uint8Array.from({ length: 600 }, (_, i) => (i * 7919 + 13) & 0xff),
  ];
  for (const bytes of junk) {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port() });
    try {
      await writeAll(conn, bytes);
      const outcome = await within(5000, "garbage closed", readOutcome(conn));
      // an alert record is fine; an answer from a backend is not
      if (outcome.kind === "data") assert.equal(outcome.bytes![0], 0x15, "only a TLS alert");
    } finally {
      conn.close();
    }
  }
  const e = await proxy.waitAccess((e) => e.close_reason === "bad_client_hello");
  assert.equal(e.backend, null);
  assert.equal(exact.accepted, 0, "no garbage reached a backend");
  assert.equal(await whoAnswers(proxy.port(), "a.test"), "exact");
});

e2eTest(
  "a backend that refuses the connection: client closed, connect_failed logged",
  async (s) => {
    const exact = await identityBackend(s, "exact");
    const dead = `127.0.0.1:${unusedPort()}`;
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [
        { match: "a.test", backends: [exact.address] },
        { match: "*.b.test", backends: [dead] },
      ],
    });
    const t0 = performance.now();
    assert.notEqual(await tlsFailure(proxy.port(), "x.b.test"), null);
    assert.ok(performance.now() - t0 < 5000, "refused connect fails fast");
    const e = await proxy.waitAccess((e) => e.sni === "x.b.test");
    assert.equal(e.close_reason, "connect_failed");
    assert.equal(e.backend, dead);
    assert.equal(e.bytes_down, 0);
    await proxy.waitForLog(/connect to .*failed/);
    assert.equal(await whoAnswers(proxy.port(), "a.test"), "exact");
  },
);

e2eTest("a live TLS session survives other clients' failures", async (s) => {
  const exact = await identityBackend(s, "exact");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [exact.address] }],
    timeouts: { client_hello_ms: 300 },
  });
  const live = await tlsConnect(proxy.port(), "a.test");
  try {
    const probe = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port() });
    await writeAll(probe, new Uint8Array(64).fill(0xff));
    await readOutcome(probe);
    probe.close();
    await sleep(400);
    await writeAll(live, new TextEncoder().encode("still\n"));
    const buf = new Uint8Array(100);
    const n = await within(5000, "live answer", live.read(buf));
    assert.equal(new TextDecoder().decode(buf.subarray(0, n ?? 0)), "backend=exact still\n");
  } finally {
    live.close();
  }
});

e2eTest(
  "tls and http listeners side by side, logged in config order, each by its protocol",
  async (s) => {
    const tlsB = await identityBackend(s, "tlsb");
    const httpB = await identityBackend(s, "httpb", { tls: false });
    const proxy = await startProxy(s, {
      listeners: [
        { address: "127.0.0.1:0", protocol: "tls" },
        { address: "[::1]:0", protocol: "http" },
      ],
      routes: [
        { match: "a.test", backends: [tlsB.address] },
        { match: "b.test", backends: [httpB.address] },
      ],
    });
    assert.deepEqual(proxy.listeners.map((l) => [l.host, l.protocol]), [
      ["127.0.0.1", "tls"],
      ["::1", "http"],
    ]);
    assert.equal(await whoAnswers(proxy.port(0), "a.test"), "tlsb");
    const r = await curl(proxy.port(1), "b.test", { http: true, ip: "::1" });
    assert.equal(r.stdout, "httpb\nstatus=200", r.stderr);
    const e = await proxy.waitAccess((e) => e.sni === "b.test");
    assert.equal(e.listener, `[::1]:${proxy.port(1)}`);
    assert.equal(e.backend, httpB.address);
  },
);

e2eTest(
  "a ClientHello over limits.max_client_hello_bytes is refused as bad_client_hello",
  async (s) => {
    const exact = await identityBackend(s, "exact");
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [exact.address] }],
      limits: { max_client_hello_bytes: 512 },
    });
    const small = await opensslClient(proxy.port(), "a.test");
    assert.equal(small.answer, "exact", `a normal hello fits 512 bytes:\n${small.stderr}`);
    // three 200-byte ALPN protocol names make the hello well over 512 bytes
    const alpn = ["x", "y", "z"].map((c) => c.repeat(200)).join(",");
    const big = await opensslClient(proxy.port(), "a.test", 5000, ["-alpn", alpn]);
    assert.equal(big.answer, null, "the big hello was not relayed");
    const e = await proxy.waitAccess((e) => e.close_reason === "bad_client_hello");
    assert.equal(e.backend, null);
    assert.equal(exact.accepted, 1);
  },
);
