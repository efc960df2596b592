/**
 * A reset is passed on as a reset, in every relay mode: a stream cut by one peer must never look
 * finished to the other (a FIN would). Each peer sends bytes, then resets (SO_LINGER 0); the other
 * peer must read every byte before the reset, then get ConnectionReset, not an EOF. The same
 * through a backend killed mid-download: every client sees a reset.
 *
 * @module
 */
import assert from "node:assert/strict";
import { resetSocket } from "../ffi/libc.ts";
import {
  e2eTest,
  fdOf,
  kernelEbpf,
  kernelSkipReason,
  randomPool,
  rawBackend,
  rawSpliced,
  readExact,
  readOutcome,
  relayModeProxy,
  startKernelProxy,
  startProxy,
  writeAll,
} from "./harness/mod.ts";

const KERNEL_SKIP = await kernelSkipReason();
if (KERNEL_SKIP) {
  console.warn(`\n!!! SKIPPING the kernel modes of tests/resets_test.ts: ${KERNEL_SKIP}\n`);
}

const POOL = randomPool(1 << 20);

/** Resets a Deno conn: SO_LINGER 0 and close, so the peer gets a reset and no FIN. */
function reset(conn: Deno.Conn): void {
  assert.equal(resetSocket(fdOf(conn)), 0);
  conn.close();
}

for (const mode of ["userspace", "pipe", "sockmap"] as const) {
  const ignore = mode !== "userspace" && KERNEL_SKIP !== null;
  for (const side of ["backend", "client"] as const) {
    e2eTest(
      `${mode} mode: a ${side} that sends 1000 bytes and resets: the other side reads the 1000 ` +
        `bytes, then a reset (never an EOF), logged as ${side}_reset`,
      async (scope) => {
        const backend = rawBackend(scope);
        const proxy = await relayModeProxy(scope, mode, backend.address);
        // the raw backend has read the hello and answered; the client has the answer
        const { conn: client } = await rawSpliced(proxy.port(), "a.test");
        const server = await backend.next();
        scope.defer(() => {
          for (const c of [client, server]) {
            try {
              c.close();
            } catch {
              // closed by the test
            }
          }
        });
        const [resetter, other] = side === "client" ? [client, server] : [server, client];
        await writeAll(resetter, POOL.subarray(0, 1000));
        assert.deepEqual(await readExact(other, 1000), POOL.subarray(0, 1000));
        reset(resetter);
        const outcome = await readOutcome(other);
        assert.equal(outcome.kind, "error", `got ${JSON.stringify(outcome)}: a cut stream ended`);
        assert.match(outcome.error ?? "", /ConnectionReset/);
        const entry = await proxy.waitAccess((e) => e.backend === backend.address, 10_000);
        assert.equal(entry.close_reason, `${side}_reset`, JSON.stringify(entry));
      },
      { timeoutMs: 30_000, ignore },
    );
  }

  e2eTest(
    `${mode} mode: a backend killed mid-download: all 20 clients see a reset, none an EOF`,
    async (scope) => {
      const backend = rawBackend(scope);
      const proxy = await relayModeProxy(scope, mode, backend.address);
      const pairs: { client: Deno.TcpConn; server: Deno.TcpConn }[] = [];
      for (let i = 0; i < 20; i++) {
        const { conn } = await rawSpliced(proxy.port(), "a.test");
        pairs.push({ client: conn, server: await backend.next() });
      }
      scope.defer(() => pairs.forEach((p) => p.client.close()));
      // a download under way: bytes sent, some still in flight, then the backend dies
      await Promise.all(pairs.map((p) => writeAll(p.server, POOL.subarray(0, 256 * 1024))));
      for (const p of pairs) reset(p.server);
      const outcomes = await Promise.all(pairs.map(async (p) => {
        for (;;) {
          const o = await readOutcome(p.client);
          if (o.kind !== "data") return o;
        }
      }));
      const eofs = outcomes.filter((o) => o.kind === "eof").length;
      const resets = outcomes.filter((o) => /ConnectionReset/.test(o.error ?? "")).length;
      assert.equal(eofs, 0, `${eofs} of 20 clients took the cut download for a whole one`);
      assert.equal(resets, 20, JSON.stringify(outcomes));
    },
    { timeoutMs: 60_000, ignore },
  );
}

for (const mode of ["userspace", "pipe", "sockmap"] as const) {
  const ignore = mode !== "userspace" && KERNEL_SKIP !== null;
  for (const side of ["backend", "client"] as const) {
    e2eTest(
      `${mode} mode: a ${side} that half-closed and then resets while the other side is silent: ` +
        `the other side is reset at once (not at idle_ms), logged as ${side}_reset`,
      async (scope) => {
        const backend = rawBackend(scope);
        const config = {
          listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
          routes: [{ match: "a.test", backends: [backend.address] }],
          timeouts: { idle_ms: 60_000 },
        };
        const proxy = mode === "userspace"
          ? await startProxy(scope, { ...config, ebpf: { enabled: false } })
          : await startKernelProxy(scope, { ...config, ebpf: kernelEbpf({ splice_mode: mode }) });
        const { conn: client } = await rawSpliced(proxy.port(), "a.test");
        const server = await backend.next();
        scope.defer(() => {
          for (const c of [client, server]) {
            try {
              c.close();
            } catch {
              // closed by the test
            }
          }
        });
        const [resetter, other] = side === "client" ? [client, server] : [server, client];
        // the FIN is passed on: the other side reads its EOF (and keeps its own way open)
        await resetter.closeWrite();
        assert.equal((await readOutcome(other)).kind, "eof");
        reset(resetter);
        const entry = await proxy.waitAccess((e) => e.backend === backend.address, 5_000);
        assert.equal(entry.close_reason, `${side}_reset`, JSON.stringify(entry));
        // the other side's socket was reset: writing to it fails (it would succeed on a socket
        // the proxy still held open)
        await new Promise((r) => setTimeout(r, 100));
        await assert.rejects(async () => {
          for (let i = 0; i < 4; i++) {
            await writeAll(other, POOL.subarray(0, 1000));
            await new Promise((r) => setTimeout(r, 50));
          }
        });
      },
      { timeoutMs: 30_000, ignore },
    );
  }
}
