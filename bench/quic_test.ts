/**
 * The QUIC test's handshake timing against a real gtlsserver and a real traced gtlsclient:
 * `deno test -A --unstable-net bench/quic_test.ts` (needs gtlsserver, gtlsclient, strace; not part of
 * `deno task test`, like the rest of bench/).
 */
import assert from "node:assert/strict";
import { handshakeFromTrace, startQuicServer, timedHandshake } from "./quic.ts";
import { killChildren } from "./procs.ts";

Deno.test("a traced QUIC download yields a handshake shorter than the download, above 0", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sni-bench-quic-test-" });
  try {
    const server = await startQuicServer(dir, 1 << 20);
    const t0 = performance.now();
    const ms = await timedHandshake(server.port, `${dir}/dl`);
    const wall = performance.now() - t0;
    assert.ok(ms > 0 && ms < wall, `handshake ${ms} ms, download ${wall} ms`);
    // the same trace cut before the server's answer has no handshake
    const trace = await Deno.readTextFile(`${dir}/dl/trace`);
    const lines = trace.split("\n");
    const firstRecv = lines.findIndex((l) =>
      /recvm?msg\(\d+, \{msg_name=\{sa_family=AF_INET/.test(l)
    );
    assert.ok(firstRecv > 0, trace);
    assert.equal(handshakeFromTrace(lines.slice(0, firstRecv).join("\n")), undefined);
    await server.stop();
  } finally {
    await killChildren();
    await Deno.remove(dir, { recursive: true });
  }
});
