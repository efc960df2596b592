/**
 * Sessions stopped by the admin API (`ctl close --all`) at every stage of their life: while the
 * hello is read, while the backend connect is in progress (a backend whose accept queue is full
 * drops the SYNs), and while relaying. Every such session ends at once with `admin` in the access
 * log, every client is closed, and after many rounds the proxy holds no more descriptors than
 * after the first (nothing leaks: sockets, pipes).
 *
 * @module
 */
import assert from "node:assert/strict";
import {
  blackHole,
  clientHelloBytes,
  e2eTest,
  fdCount,
  kernelEbpf,
  kernelSkipReason,
  type ProxyProcess,
  rawBackend,
  rawSpliced,
  readOutcome,
  runCli,
  sleep,
  startKernelProxy,
  startProxy,
  within,
  writeAll,
} from "./harness/mod.ts";

const KERNEL_SKIP = await kernelSkipReason();

/** The number of live sessions `p` lists. */
async function sessionCount(p: ProxyProcess): Promise<number> {
  const r = await runCli(["ctl", "--config", p.configPath, "--json", "sessions"]);
  assert.equal(r.code, 0, r.stderr);
  return (JSON.parse(r.stdout).sessions as unknown[]).length;
}

const PER_STAGE = 8;
const ROUNDS = 4;

for (const mode of ["userspace", "pipe", "sockmap"] as const) {
  e2eTest(
    `${mode} mode: sessions closed by the admin API while reading the hello, while connecting ` +
      `and while relaying end at once, logged as admin, and leave no descriptor behind`,
    async (scope) => {
      const relayBackend = rawBackend(scope);
      const slow = await blackHole(scope);
      const dir = await Deno.makeTempDir({ prefix: "sni-stop-" });
      scope.defer(() => Deno.remove(dir, { recursive: true }));
      const config = {
        admin: { socket: `${dir}/admin.sock` },
        listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
        routes: [
          { match: "a.test", backends: [relayBackend.address] },
          { match: "slow.test", backends: [slow] },
        ],
        timeouts: { connect_ms: 60_000, client_hello_ms: 60_000, idle_ms: 60_000 },
      };
      const p = mode === "userspace"
        ? await startProxy(scope, { ...config, ebpf: { enabled: false } })
        : await startKernelProxy(scope, { ...config, ebpf: kernelEbpf({ splice_mode: mode }) });
      await p.waitForLog("admin API on");
      const hello = await clientHelloBytes("slow.test");
      let fdsAfterFirst = 0;
      let logged = 0;
      for (let round = 0; round < ROUNDS; round++) {
        const clients: Deno.TcpConn[] = [];
        for (let i = 0; i < PER_STAGE; i++) {
          // reading the hello: half of it sent
          const reading = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
          await writeAll(reading, hello.subarray(0, 20));
          // connecting: the whole hello sent, the backend's SYN dropped
          const connecting = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
          await writeAll(connecting, hello);
          const relaying = (await rawSpliced(p.port(), "a.test")).conn;
          await relayBackend.next();
          clients.push(reading, connecting, relaying);
        }
        const deadline = Date.now() + 10_000;
        while ((await sessionCount(p)) < clients.length) {
          assert.ok(Date.now() < deadline, "every session listed");
          await sleep(50);
        }
        const r = await runCli(["ctl", "--config", p.configPath, "close", "--all"]);
        assert.equal(r.code, 0, r.stderr);
        const outcomes = await within(
          5000,
          "every client closed",
          Promise.all(clients.map((c) => readOutcome(c))),
        );
        assert.ok(outcomes.every((o) => o.kind !== "data"), JSON.stringify(outcomes));
        clients.forEach((c) => c.close());
        logged += clients.length;
        const entries = await within(
          5000,
          "access log",
          (async () => {
            for (;;) {
              const all = await p.access();
              if (all.length >= logged) return all;
              await sleep(50);
            }
          })(),
        );
        assert.equal(entries.length, logged);
        const reasons = new Set(entries.map((e) => e.close_reason));
        assert.deepEqual([...reasons], ["admin"], JSON.stringify(entries.slice(-3)));
        assert.equal(await sessionCount(p), 0);
        await sleep(200);
        if (round === 0) fdsAfterFirst = fdCount(p.pid);
        else {
          assert.ok(
            fdCount(p.pid) <= fdsAfterFirst,
            `round ${round}: ${fdCount(p.pid)} descriptors, ${fdsAfterFirst} after the first`,
          );
        }
      }
    },
    { timeoutMs: 90_000, ignore: mode !== "userspace" && KERNEL_SKIP !== null },
  );
}
