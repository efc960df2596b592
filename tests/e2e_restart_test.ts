/**
 * End to end, a restart without downtime: a new proxy process starts on the ports of the running
 * one (SO_REUSEPORT), then the old one gets SIGTERM and drains, while clients keep opening new
 * connections and moving bytes. No connection may be refused or reset, no byte lost.
 *
 * Runs in a network namespace of its own (loopback only), where `net.ipv4.tcp_migrate_req` is on:
 * connections queued on the old process's listening socket when it closes move to the new one's.
 * Needs root (`ip netns`).
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  ip,
  type Scope,
  served,
  sleep,
  startProxy,
  traffic,
  within,
} from "./harness/mod.ts";

const isRoot = Deno.uid() === 0;
if (!isRoot) console.warn("!!! SKIPPING the restart tests: they need root (ip netns)");

/** A network namespace with loopback up and tcp_migrate_req on; removed when the test ends. */
async function namespace(s: Scope): Promise<string[]> {
  const ns = `sni-restart-${Deno.pid}`;
  await ip("netns", "del", ns).catch(() => {});
  await ip("netns", "add", ns);
  s.defer(() => ip("netns", "del", ns));
  await ip("-n", ns, "link", "set", "lo", "up");
  await ip("netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=1");
  return ["ip", "netns", "exec", ns];
}

for (const workers of [1, 2]) {
  e2eTest(
    `restart (workers ${workers}): a new process on the same port, SIGTERM to the old: ` +
      `nothing refused, no byte lost`,
    async (s) => {
      const wrapper = await namespace(s);
      const load = await traffic(s, wrapper);
      const config = (port: number) => ({
        workers,
        listeners: [{ address: `127.0.0.1:${port}`, protocol: "http" }],
        routes: [{ match: "a.test", backends: [`127.0.0.1:${load.backend}`] }],
        timeouts: { drain_ms: 20_000 },
        log: { level: "info" },
        // bound by both processes for a while, like the listener (the namespace's own port)
        metrics: { address: "127.0.0.1:9090" },
      });
      const old = await startProxy(s, config(0), { wrapper });
      const port = old.port();
      await load.start(port);
      await served(old, 20);
      const next = await startProxy(s, config(port), { wrapper });
      const shared = /listeners\[0\] 127\.0\.0\.1:\d+: another socket listens there already/;
      assert.match(next.stderr(), shared, "the new process says it shares the port");
      assert.doesNotMatch(old.stderr(), shared);
      await sleep(300);
      old.signal("SIGTERM");
      assert.equal((await within(30_000, "the old proxy's exit", old.status)).code, 0);
      const before = (await next.access()).length;
      await served(next, before + 20);
      const result = await load.stop();
      assert.deepEqual(result.errors, [], `of ${result.connections} connections`);
      const oldEntries = await old.access();
      // the access log is written in batches: wait for the running proxy's last ones
      await served(next, result.connections - oldEntries.length).catch(async (e) => {
        const n = (await next.access()).length;
        const clients = new Set([...oldEntries, ...await next.access()].map((x) => x.client));
        throw new Error(
          `${e.message}: ${result.connections} connections, old ${oldEntries.length}, new ${n}, ` +
            `distinct clients ${clients.size}\nold:\n${old.stderr().slice(-3000)}\nnew:\n${
              next.stderr().slice(-3000)
            }`,
        );
      });
      const newEntries = await next.access();
      assert.ok(oldEntries.length >= 20 && newEntries.length >= 20, "both served");
      assert.equal(
        oldEntries.length + newEntries.length,
        result.connections,
        "every connection was served by one of them",
      );
      for (const e of [...oldEntries, ...newEntries]) {
        assert.equal(e.close_reason, "done", JSON.stringify(e));
      }
      assert.match(old.stderr(), /stopped/);
    },
    { timeoutMs: 90_000, ignore: !isRoot },
  );
}
