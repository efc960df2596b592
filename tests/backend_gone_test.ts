/**
 * A backend that resets the connection before the proxy wrote it the hello (an overloaded
 * server shedding connections): the session ends as `backend_reset`, the client gets a reset,
 * never a catch-all `error`. In sockmap mode the pairing is then refused (the backend socket is
 * no longer established) and the session falls back to writing the hello in userspace, which is
 * where the send failed with EPIPE and escaped as an unexpected error.
 *
 * @module
 */
import assert from "node:assert/strict";
import { resetSocket } from "../ffi/libc.ts";
import {
  type AccessEntry,
  clientHelloBytes,
  e2eTest,
  fdOf,
  kernelSkipReason,
  type ProxyProcess,
  readOutcome,
  relayModeProxy,
  type Scope,
  writeAll,
} from "./harness/mod.ts";

const KERNEL_SKIP = await kernelSkipReason();
if (KERNEL_SKIP) {
  console.warn(`\n!!! SKIPPING the kernel modes of tests/backend_gone_test.ts: ${KERNEL_SKIP}\n`);
}

const CONNECTIONS = 60;
const ROUNDS = 10;
/** The content type of a TLS alert record. */
const TLS_ALERT = 21;

/** The hello write to the backend failed: the backend reset before it had the hello. */
function resetBeforeHello(e: AccessEntry): boolean {
  return e.bytes_up === 0 && /^\w+: send: /.test(String(e.error ?? ""));
}

/** One client: sends a hello and reads what comes (a backend that resets says nothing). */
async function helloAndOutcome(proxy: ProxyProcess, hello: Uint8Array): Promise<void> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port() });
  try {
    await writeAll(conn, hello);
    const o = await readOutcome(conn);
    // the proxy's own TLS alert (a connect that failed) is all a client may read
    const alert = o.kind === "data" && o.bytes?.[0] === TLS_ALERT;
    assert.ok(o.kind !== "data" || alert, `the client got bytes: ${JSON.stringify(o)}`);
  } finally {
    conn.close();
  }
}

/** The access-log entries after the first `seen - CONNECTIONS`, once there are `seen`. */
async function newEntries(proxy: ProxyProcess, seen: number): Promise<AccessEntry[]> {
  const deadline = Date.now() + 10_000;
  let all = await proxy.access();
  while (all.length < seen && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 50));
    all = await proxy.access();
  }
  assert.equal(all.length, seen, "a session has no access-log entry");
  return all.slice(seen - CONNECTIONS);
}

/** A backend that resets every connection as soon as it accepts it. */
function resettingBackend(scope: Scope): string {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  scope.defer(() => listener.close());
  (async () => {
    for await (const conn of listener) {
      resetSocket(fdOf(conn));
      conn.close();
    }
  })().catch(() => {});
  return `127.0.0.1:${(listener.addr as Deno.NetAddr).port}`;
}

// pipe mode is not here: its relay writes the hello itself, and ends on a reset as it would later
for (const mode of ["userspace", "sockmap"] as const) {
  e2eTest(
    `${mode} mode: ${CONNECTIONS} clients of a backend that resets on accept: each session ends ` +
      `as backend_reset (never error), the client is cut, no session warning`,
    async (scope) => {
      const backend = resettingBackend(scope);
      // a reset that comes before the connect is seen counts as a failed connect (more so on a
      // busy host): passive health must not take the backend out before the race is won
      const proxy = await relayModeProxy(scope, mode, backend, { health: { max_fails: 1000 } });
      const hello = await clientHelloBytes("a.test");
      const entries: AccessEntry[] = [];
      // the reset must come before the proxy writes the hello: a race, so up to ROUNDS rounds
      for (let round = 0; round < ROUNDS && !entries.some(resetBeforeHello); round++) {
        await Promise.all(Array.from({ length: CONNECTIONS }, () => helloAndOutcome(proxy, hello)));
        entries.push(...await newEntries(proxy, entries.length + CONNECTIONS));
      }
      const reasons: Record<string, number> = {};
      for (const e of entries) reasons[e.close_reason] = (reasons[e.close_reason] ?? 0) + 1;
      assert.equal(reasons["error"] ?? 0, 0, JSON.stringify(reasons));
      assert.ok(
        entries.some(resetBeforeHello),
        `no reset before the hello: ${JSON.stringify(reasons)}`,
      );
      for (const e of entries.filter(resetBeforeHello)) {
        assert.equal(e.close_reason, "backend_reset");
      }
      assert.doesNotMatch(proxy.stderr(), /session 127\.0\.0\.1:\d+: /);
    },
    { timeoutMs: 60_000, ignore: mode !== "userspace" && KERNEL_SKIP !== null },
  );
}
