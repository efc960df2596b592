/**
 * End to end, routing on what the ClientHello offers besides the name: ALPN routes (openssl
 * s_client -alpn, curl --http2 / --http1.1, Deno TLS without ALPN).
 */
import assert from "node:assert/strict";
import {
  curl,
  e2eTest,
  identityBackend,
  opensslClient,
  startProxy,
  whoAnswers,
} from "./helpers.ts";

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
