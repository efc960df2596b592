/**
 * End to end, routing on what the ClientHello offers besides the name: ALPN routes (openssl
 * s_client -alpn, curl --http2 / --http1.1, Deno TLS without ALPN), and the TLS fingerprints
 * (JA4, JA3) in the access log and in the ACL and route deny lists, applied by a reload.
 */
import assert from "node:assert/strict";
import {
  curl,
  e2eTest,
  identityBackend,
  opensslClient,
  startProxy,
  tlsFailure,
  whoAnswers,
} from "./harness/mod.ts";

e2eTest(
  "one name, two backends by ALPN; a hello without ALPN takes the route without one",
  async (s) => {
    const acme = await identityBackend(s, "acme");
    const h2 = await identityBackend(s, "h2");
    const web = await identityBackend(s, "web");
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [
        // TLS-ALPN-01 challenges go to the ACME responder, the rest of a.test elsewhere
        { match: "a.test", alpn: ["acme-tls/1"], backends: [acme.address] },
        { match: "a.test", alpn: ["h2"], backends: [h2.address] },
        { match: "a.test", backends: [web.address] },
      ],
    });
    const port = proxy.port();

    const challenge = await opensslClient(port, "a.test", 5000, ["-alpn", "acme-tls/1"]);
    assert.equal(challenge.answer, "acme", challenge.stderr);
    const plain = await opensslClient(port, "a.test");
    assert.equal(plain.answer, "web", "openssl without -alpn");
    const both = await opensslClient(port, "a.test", 5000, ["-alpn", "http/1.1,acme-tls/1"]);
    assert.equal(both.answer, "acme", "any offered protocol counts, not only the first");
    assert.equal(await whoAnswers(port, "a.test"), "web", "Deno TLS offers no ALPN");

    // curl offers h2 and http/1.1, or http/1.1 alone; the backend answers HTTP/1.1 either way
    const viaH2 = await curl(port, "a.test", { extra: ["--http2"] });
    assert.match(viaH2.stdout, /^h2\nstatus=200$/, viaH2.stderr);
    const viaH1 = await curl(port, "a.test", { extra: ["--http1.1"] });
    assert.match(viaH1.stdout, /^web\nstatus=200$/, viaH1.stderr);
    assert.equal(acme.accepted, 2);

    const logged = await proxy.waitAccess((e) => e.route === "a.test alpn=acme-tls/1");
    assert.deepEqual(logged.alpn, ["acme-tls/1"]);
    assert.equal(logged.backend, acme.address);
    const h2Entry = await proxy.waitAccess((e) => e.backend === h2.address);
    assert.deepEqual(h2Entry.alpn, ["h2", "http/1.1"]);
    assert.equal(h2Entry.route, "a.test alpn=h2");
    const none = await proxy.waitAccess((e) => e.route === "a.test" && e.alpn?.length === 0);
    assert.equal(none.backend, web.address);
  },
);

e2eTest(
  "an ALPN route does not take a hello offering none of its protocols, nor another name",
  async (s) => {
    const acme = await identityBackend(s, "acme");
    const dflt = await identityBackend(s, "dflt");
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "*.b.test", alpn: ["acme-tls/1"], backends: [acme.address] }],
      default_backend: dflt.address,
    });
    const port = proxy.port();
    assert.equal((await opensslClient(port, "x.b.test", 5000, ["-alpn", "h2"])).answer, "dflt");
    assert.equal(
      (await opensslClient(port, "a.test", 5000, ["-alpn", "acme-tls/1"])).answer,
      "dflt",
    );
    assert.equal(
      (await opensslClient(port, "x.b.test", 5000, ["-alpn", "acme-tls/1"])).answer,
      "acme",
    );
  },
);

e2eTest(
  "JA4 and JA3 in the access log; the ACL and a route refuse by fingerprint after a reload",
  async (s) => {
    const web = await identityBackend(s, "web");
    const legacy = await identityBackend(s, "legacy");
    const config = (acl: string[], route: string[]) => ({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [
        { match: "a.test", backends: [web.address] },
        { match: "b.test", backends: [legacy.address], deny_fingerprints: route },
      ],
      acl: { deny_fingerprints: acl },
    });
    const proxy = await startProxy(s, config([], []));
    const port = proxy.port();

    const first = await curl(port, "a.test");
    assert.match(first.stdout, /^web\nstatus=200$/, first.stderr);
    const entry = await proxy.waitAccess((e) => e.sni === "a.test");
    const ja4 = entry.ja4 as string;
    assert.match(ja4, /^t13d\d{4}h2_[0-9a-f]{12}_[0-9a-f]{12}$/, "curl: TLS 1.3, SNI, h2 first");
    assert.match(entry.ja3 as string, /^[0-9a-f]{32}$/);
    // curl closes with the server's close_notify unread: its kernel resets, and unless the
    // backend's end came within the relay's 250 ms for it (a busy host) the line says so
    assert.ok(["done", "client_reset"].includes(entry.close_reason), JSON.stringify(entry));
    // the record drops the parsed hello once the relay starts: its line still has every field
    // (and the reset's error when it was one)
    assert.deepEqual(Object.keys(entry).filter((k) => k !== "error").sort(), [
      "alpn",
      "backend",
      "bytes_down",
      "bytes_up",
      "client",
      "close_reason",
      "duration_ms",
      "ja3",
      "ja4",
      "listener",
      "mode",
      "route",
      "sni",
      "time",
    ]);
    assert.deepEqual(entry.alpn, ["h2", "http/1.1"]);
    assert.equal("error" in entry, entry.close_reason !== "done", JSON.stringify(entry));
    assert.ok(entry.bytes_up > 0 && entry.bytes_down > 0, "the relay's bytes");
    assert.equal((await opensslClient(port, "b.test", 5000, ["-tls1_2"])).answer, "legacy");

    // curl's JA4 refused by the ACL, TLS 1.2 hellos by b.test's route
    await proxy.writeConfig(config([ja4], ["t12*"]));
    const from = proxy.stderr().length;
    proxy.signal("SIGHUP");
    await proxy.waitForLog("reloaded", 10_000, from);

    const refused = await curl(port, "a.test");
    assert.notEqual(refused.code, 0, "curl is refused");
    assert.match(refused.stderr, /handshake failure|alert/i);
    const denied = await proxy.waitAccess((e) =>
      e.close_reason === "fingerprint_denied" && e.route === null
    );
    assert.equal(denied.ja4, ja4);
    assert.equal(denied.backend, null, "refused before any backend was dialled");
    await proxy.waitForLog(`acl: refusing`, 5000, from);
    assert.match(proxy.stderr().slice(from), new RegExp(`matches "${ja4}"`));

    assert.equal(await whoAnswers(port, "a.test"), "web", "Deno's fingerprint is not denied");
    const tls12 = await opensslClient(port, "b.test", 5000, ["-tls1_2"]);
    assert.equal(tls12.answer, null, "TLS 1.2 refused on b.test");
    assert.equal(await tlsFailure(port, "b.test"), null, "TLS 1.3 still served on b.test");
    const byRoute = await proxy.waitAccess((e) =>
      e.close_reason === "fingerprint_denied" && e.route === "b.test"
    );
    assert.match(byRoute.ja4 as string, /^t12d/);
    assert.equal(legacy.accepted, 2, "only the allowed ones reached the backend");
  },
);
