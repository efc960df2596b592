/**
 * End to end, how a route shares its connections: weights over 10,000 real connections (plain
 * HTTP, so each is cheap), backup backends that serve only while every primary is down, and
 * per-backend `max_connections` (a full backend is skipped; all full is refused, logged and
 * counted).
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  identityBackend,
  LineReader,
  scrapeMetrics,
  sleep,
  spread,
  startProxy,
  tlsConnect,
  tlsFailure,
  whoAnswers,
  writeAll,
} from "./harness/mod.ts";

for (const balance of ["round_robin", "random", "least_conn", "source_hash"] as const) {
  e2eTest(
    `${balance}: weights 1:3:6 hold within 2 points over 10,000 connections`,
    async (s) => {
      const backends = await Promise.all(
        ["w1", "w3", "w6"].map((n) => identityBackend(s, n, { tls: false })),
      );
      const proxy = await startProxy(s, {
        listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
        routes: [{
          match: "a.test",
          balance,
          backends: [
            backends[0].address, // a plain string: weight 1
            { address: backends[1].address, weight: 3 },
            { address: backends[2].address, weight: 6 },
          ],
        }],
        log: { level: "info", ...(balance === "source_hash" ? {} : { access_log: false }) },
      });
      // source_hash shares clients, not connections: 10,000 sources, the first 2,000 of them
      // connecting twice (to see them stay put)
      const sources = balance === "source_hash" ? 10_000 : 0;
      const total = sources ? 12_000 : 10_000;
      const counts = await spread(proxy.port(), total, 32, sources);
      for (const [name, share] of [["w1", 0.1], ["w3", 0.3], ["w6", 0.6]] as const) {
        const got = (counts.get(name) ?? 0) / total;
        assert.ok(Math.abs(got - share) < 0.02, `${name}: ${got} of the connections, not ${share}`);
      }
      if (balance === "round_robin") {
        // smooth weighted round robin is exact over every 10 picks
        assert.deepEqual([...counts].sort(), [["w1", 1000], ["w3", 3000], ["w6", 6000]]);
      }
      if (balance === "source_hash") {
        const entries = await proxy.access();
        const byClient = new Map<string, Set<string | null>>();
        for (const e of entries) {
          const ip = e.client.replace(/:\d+$/, "");
          byClient.set(ip, (byClient.get(ip) ?? new Set()).add(e.backend));
        }
        assert.equal(byClient.size, sources);
        for (const [ip, used] of byClient) assert.equal(used.size, 1, `${ip} stays on one backend`);
      }
    },
    { timeoutMs: 120_000 },
  );
}

e2eTest(
  "backups serve only while every primary is down, and are left when one returns",
  async (s) => {
    const a = await identityBackend(s, "a", { tls: false });
    const b = await identityBackend(s, "b", { tls: false });
    const spare = await identityBackend(s, "spare", { tls: false });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
      routes: [{
        match: "a.test",
        backends: [a.address, b.address, { address: spare.address, backup: true }],
        health: { max_fails: 1, fail_timeout_ms: 300 },
      }],
    });
    const port = proxy.port();
    assert.deepEqual([...(await spread(port, 20, 1))].sort(), [["a", 10], ["b", 10]]);

    a.close();
    b.close();
    assert.deepEqual([...await spread(port, 20, 1)], [["spare", 20]], "both primaries down");
    await proxy.waitForLog(`backend ${a.address} of route "a.test" down`);

    // a comes back on its port: once its back-off ends it takes everything again
    await identityBackend(s, "a", { tls: false, port: a.port });
    await sleep(400);
    assert.deepEqual([...await spread(port, 20, 1)], [["a", 20]], "a is back; b still down");
    assert.equal(spare.accepted, 20);
  },
);

e2eTest(
  "max_connections: a full backend is skipped; all full is refused, logged and counted",
  async (s) => {
    const one = await identityBackend(s, "one");
    const two = await identityBackend(s, "two");
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{
        match: "a.test",
        backends: [
          { address: one.address, max_connections: 1 },
          { address: two.address, max_connections: 2 },
        ],
      }],
      metrics: { address: "127.0.0.1:0" },
    });
    const port = proxy.port();
    /** A live connection, with the backend that answered it. */
    const hold = async () => {
      const conn = await tlsConnect(port, "a.test");
      s.defer(() => {
        try {
          conn.close();
        } catch { /* closed by the test */ }
      });
      await writeAll(conn, new TextEncoder().encode("who\n"));
      const line = await new LineReader(conn).line();
      return { conn, who: /^backend=(\S+) who$/.exec(line ?? "")?.[1] };
    };
    const first = await hold();
    assert.equal(first.who, "one");
    assert.equal((await hold()).who, "two");
    assert.equal((await hold()).who, "two", "one is full: skipped, though its turn");

    const refused = await tlsFailure(port, "a.test");
    assert.ok(refused !== null, "every backend full: refused");
    const entry = await proxy.waitAccess((e) => e.close_reason === "backend_full");
    assert.equal(entry.backend, null);
    assert.equal(entry.route, "a.test");
    await proxy.waitForLog(`every backend of route "a.test" that is up is at its max_connections`);
    const metrics = await scrapeMetrics(proxy);
    assert.match(metrics, /sni_proxy_connections_closed_total\{reason="backend_full"\} 1/);

    first.conn.close();
    await sleep(200); // the proxy sees the close and frees one's slot
    assert.equal(await whoAnswers(port, "a.test"), "one", "a slot came free");
  },
);
