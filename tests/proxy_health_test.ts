/** End to end: passive and active backend health, failover, and every backend down. */
import assert from "node:assert/strict";
import { curl, namedBackend, sleep, testCerts, unusedPort, withProxy } from "./harness/mod.ts";

Deno.test("a refusing backend is skipped: every request still succeeds and it is marked down", async () => {
  const alive = await namedBackend("alive");
  const dead = `127.0.0.1:${unusedPort()}`;
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{
        match: "a.test",
        backends: [dead, alive.address],
        health: { max_fails: 1, fail_timeout_ms: 60000 },
      }],
    }, async (p) => {
      for (let i = 0; i < 6; i++) {
        const r = await curl(p.port(), "a.test");
        assert.equal(r.body, "alive", `request ${i}: ${r.stderr}`);
      }
      await p.waitForLog(
        `backend ${dead} of route "a.test" down for 60000 ms after 1 failed connects`,
      );
      const connects =
        (p.stderr().match(new RegExp(`connect to ${dead} failed`, "g")) ?? []).length;
      assert.equal(connects, 1, "once down, the dead backend is not tried again");
      let entries = await p.access();
      for (let i = 0; i < 50 && entries.length < 6; i++) {
        await sleep(100);
        entries = await p.access();
      }
      assert.equal(entries.length, 6);
      assert.ok(entries.every((e) => e.close_reason === "done" && e.backend === alive.address));
    });
  } finally {
    await alive.close();
  }
});

Deno.test("active checks take a killed backend out and bring it back when it returns", async () => {
  const one = await namedBackend("one");
  const two = await namedBackend("two");
  const restarted: { server?: { close(): Promise<void> } } = {};
  try {
    await withProxy({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{
        match: "a.test",
        backends: [one.address, two.address],
        health: { check: { interval_ms: 100, timeout_ms: 200, rise: 1, fall: 2 } },
      }],
    }, async (p) => {
      const seen = new Set<string>();
      for (let i = 0; i < 4; i++) seen.add((await curl(p.port(), "a.test")).body);
      assert.deepEqual([...seen].sort(), ["one", "two"]);
      await one.close(); // killed mid-test
      await p.waitForLog(`backend ${one.address} of route "a.test" down: 2 failed checks`, 5000);
      for (let i = 0; i < 6; i++) assert.equal((await curl(p.port(), "a.test")).body, "two");
      // it comes back on the same port
      restarted.server = await namedBackendOn("one-again", one.port);
      await p.waitForLog(`backend ${one.address} of route "a.test" up`, 5000);
      const back = new Set<string>();
      for (let i = 0; i < 4; i++) back.add((await curl(p.port(), "a.test")).body);
      assert.ok(back.has("one-again"), `traffic returns to the backend: ${[...back]}`);
    });
  } finally {
    await two.close();
    await restarted.server?.close();
  }
});

/** A named HTTPS backend on a given port (a restarted backend). */
async function namedBackendOn(name: string, port: number) {
  const c = await testCerts();
  for (let i = 0; i < 20; i++) {
    try {
      const server = Deno.serve({
        hostname: "127.0.0.1",
        port,
        cert: c.certPem,
        key: c.keyPem,
        onListen() {},
      }, () => new Response(name));
      return { close: () => server.shutdown() };
    } catch {
      await sleep(100);
    }
  }
  throw new Error(`port ${port} stayed busy`);
}

Deno.test("every backend down: TLS clients get an alert, HTTP clients a 503, logged as no_backend", async () => {
  const dead = `127.0.0.1:${unusedPort()}`;
  await withProxy({
    listeners: [{ address: "127.0.0.1:0" }, { address: "127.0.0.1:0", protocol: "http" }],
    routes: [{
      match: "a.test",
      backends: [dead],
      health: { max_fails: 1, fail_timeout_ms: 60000 },
    }],
  }, async (p) => {
    const first = await curl(p.port(), "a.test");
    assert.notEqual(first.code, 0);
    const e1 = await p.waitAccess((e) => e.sni === "a.test");
    assert.equal(e1.close_reason, "connect_failed");
    const tls = await curl(p.port(), "a.test");
    assert.notEqual(tls.code, 0);
    assert.match(tls.stderr, /internal error|alert/i);
    const http = await curl(p.port(1), "a.test", { http: true, extra: ["-w", "%{http_code}"] });
    assert.equal(http.body, "503");
    await p.waitForLog('all backends of route "a.test" are down');
    await p.waitAccess((e) => e.close_reason === "no_backend");
  });
});
