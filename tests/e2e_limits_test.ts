/**
 * End to end, per-source limits at accept: live connections from one address, and new
 * connections from it over time; other addresses unaffected; refusals counted in the access
 * log and the metrics, and logged once per burst.
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  identityBackend,
  nodeConnect,
  rawServer,
  scrapeMetrics,
  sleep,
  startProxy,
  writeAll,
} from "./harness/mod.ts";

const encoder = new TextEncoder();

/**
 * One plain-HTTP request for `host` through the proxy from `from` (127.0.0.1 unless given):
 * the backend's answer, or "" when the proxy closed the connection unanswered.
 */
async function ask(port: number, host: string, from?: string): Promise<string> {
  const socket = await nodeConnect(port, from ?? "127.0.0.1");
  return await new Promise<string>((resolve) => {
    let got = "";
    socket.on("data", (d: Uint8Array) => (got += new TextDecoder().decode(d)));
    socket.once("close", () => resolve(/\r\n\r\n(.*)$/s.exec(got)?.[1] ?? ""));
    socket.once("error", () => {});
    socket.end(encoder.encode(`GET / HTTP/1.1\r\nhost: ${host}\r\n\r\n`));
  });
}

e2eTest(
  "limits.per_source.max_connections: a source at its limit is refused; others are not",
  async (s) => {
    const answer = await identityBackend(s, "answer", { tls: false });
    // holds every connection until the client goes
    const hold = await rawServer(s, async (conn) => {
      const buf = new Uint8Array(1024);
      while (await conn.read(buf) !== null) { /* hold */ }
    }, { tls: false });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
      routes: [
        { match: "hold.test", backends: [hold.address] },
        { match: "a.test", backends: [answer.address] },
      ],
      limits: { per_source: { max_connections: 2 } },
      metrics: { address: "127.0.0.1:0" },
    });
    const port = proxy.port();
    const held = await Promise.all([1, 2].map(async () => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      await writeAll(conn, encoder.encode("GET / HTTP/1.1\r\nhost: hold.test\r\n\r\n"));
      return conn;
    }));
    while (hold.accepted < 2) await sleep(20);

    for (let i = 0; i < 5; i++) assert.equal(await ask(port, "a.test"), "", `refused (${i})`);
    assert.equal(await ask(port, "a.test", "127.0.0.2"), "answer", "another source is served");
    // the access log is written as connections close: wait for all five
    let refused: Awaited<ReturnType<typeof proxy.access>> = [];
    for (let i = 0; i < 100 && refused.length < 5; i++) {
      if (i > 0) await sleep(50);
      refused = (await proxy.access()).filter((e) => e.close_reason === "source_connections");
    }
    assert.equal(refused.length, 5);
    assert.ok(refused.every((e) => e.client.startsWith("127.0.0.1:") && e.backend === null));
    const lines = proxy.stderr().split("\n").filter((l) => l.includes("refused on"));
    assert.equal(lines.length, 1, `logged once per burst:\n${lines.join("\n")}`);
    assert.match(lines[0], /limits\.per_source\.max_connections \(2\) live connections/);
    const metrics = await scrapeMetrics(proxy);
    assert.match(metrics, /sni_proxy_connections_closed_total\{reason="source_connections"\} 5/);

    held[0].close();
    await sleep(200); // the proxy sees the close and frees the slot
    assert.equal(await ask(port, "a.test"), "answer", "below the limit again");
    held[1].close();
  },
);

e2eTest(
  "limits.per_source.new_per_second: a burst, then the rate; a reload changes it",
  async (s) => {
    const answer = await identityBackend(s, "answer", { tls: false });
    const config = (perSource: Record<string, number>) => ({
      listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
      routes: [{ match: "a.test", backends: [answer.address] }],
      limits: { per_source: perSource },
    });
    const proxy = await startProxy(s, config({ new_per_second: 1, burst: 3 }));
    const port = proxy.port();
    const round = async (n: number) => {
      const out: string[] = [];
      for (let i = 0; i < n; i++) out.push(await ask(port, "a.test"));
      return out;
    };
    assert.deepEqual(await round(5), ["answer", "answer", "answer", "", ""]);
    assert.equal(await ask(port, "a.test", "127.0.0.3"), "answer", "another source has its bucket");
    await sleep(1100); // one more token
    assert.deepEqual(await round(2), ["answer", ""]);
    const entry = await proxy.waitAccess((e) => e.close_reason === "source_rate");
    assert.equal(entry.client.replace(/:\d+$/, ""), "127.0.0.1");
    await proxy.waitForLog("limits.per_source.new_per_second (1, burst 3) new connections");

    // limits apply to new connections after a reload; the source's state carries over
    await proxy.writeConfig(config({ new_per_second: 1000 }));
    const from = proxy.stderr().length;
    proxy.signal("SIGHUP");
    await proxy.waitForLog("reloaded", 10_000, from);
    assert.deepEqual(await round(5), ["answer", "answer", "answer", "answer", "answer"]);
  },
);
