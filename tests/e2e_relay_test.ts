/**
 * End to end, relaying: bytes arrive intact and complete through the real proxy process, in
 * both directions, with half-close, resets, idle timeouts, many connections at once, and an
 * access log that counts them exactly.
 *
 * Some tests speak raw TCP after a real captured ClientHello ({@linkcode rawSession}) so that
 * byte counts and the order of FIN/RST are exact; the others use TLS end to end.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import net from "node:net";
import {
  clientHelloBytes,
  drainHash,
  e2eTest,
  echoHandler,
  identityBackend,
  LineReader,
  nodeConnect,
  pseudoRandomBytes,
  rawServer,
  rawSession,
  readClientHello,
  readExact,
  readOutcome,
  readToEnd,
  sha256,
  sleep,
  startProxy,
  tlsConnect,
  whoAnswers,
  within,
  writeAll,
} from "./harness/mod.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function tlsRoute(backend: string, extra: Record<string, unknown> = {}) {
  return {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [backend] }],
    ...extra,
  };
}

e2eTest(
  "client half-close over TLS: the backend answers after EOF and the client gets it all",
  async (s) => {
    const up = pseudoRandomBytes(1 << 20, 11);
    const down = pseudoRandomBytes(3 << 20, 12);
    let backendGot = "";
    const backend = await rawServer(s, async (conn) => {
      backendGot = (await drainHash(conn)).sha256; // until the client's EOF
      await writeAll(conn, down); // only then answer
      await conn.closeWrite();
    });
    const proxy = await startProxy(s, tlsRoute(backend.address));
    const conn = await tlsConnect(proxy.port(), "a.test");
    try {
      await writeAll(conn, up);
      await conn.closeWrite();
      const got = await within(20_000, "answer after half-close", drainHash(conn));
      assert.equal(got.bytes, down.length);
      assert.equal(got.sha256, sha256(down));
      assert.equal(backendGot, sha256(up));
    } finally {
      conn.close();
    }
    const e = await proxy.waitAccess((e) => e.sni === "a.test");
    assert.equal(e.close_reason, "done");
    assert.ok(e.bytes_up > up.length && e.bytes_down > down.length, JSON.stringify(e));
  },
);

e2eTest(
  "backend half-close: the client keeps sending after EOF and the backend gets it all",
  async (s) => {
    const down = pseudoRandomBytes(1 << 20, 21);
    const up = pseudoRandomBytes(2 << 20, 22);
    const got = Promise.withResolvers<{ bytes: number; sha256: string }>();
    const backend = await rawServer(s, async (conn) => {
      await readClientHello(conn);
      await writeAll(conn, down);
      await conn.closeWrite(); // backend is done talking first
      got.resolve(await drainHash(conn));
    }, { tls: false });
    const proxy = await startProxy(s, tlsRoute(backend.address));
    const { conn, hello } = await rawSession(proxy.port(), "a.test");
    try {
      const received = await within(10_000, "backend data then EOF", drainHash(conn));
      assert.equal(received.sha256, sha256(down));
      // the client saw EOF; its own direction is still open
      await sleep(200);
      await writeAll(conn, up);
      await conn.closeWrite();
      const atBackend = await within(10_000, "client data after EOF", got.promise);
      assert.equal(atBackend.bytes, up.length);
      assert.equal(atBackend.sha256, sha256(up));
    } finally {
      conn.close();
    }
    const e = await proxy.waitAccess((e) => e.sni === "a.test");
    assert.equal(e.close_reason, "done");
    assert.equal(e.bytes_up, hello.length + up.length);
    assert.equal(e.bytes_down, down.length);
  },
);

e2eTest("1 GiB each way through the proxy arrives with equal sha256 at both ends", async (s) => {
  const UP = 1 << 30;
  const DOWN = 1 << 30;
  const CHUNK = 1 << 20;
  const block = pseudoRandomBytes(CHUNK, 31);
  const stamp = (i: number) => new DataView(block.buffer).setUint32(0, i); // no repeating chunks
  const backendUp = Promise.withResolvers<{ bytes: number; sha256: string }>();
  const downHash = createHash("sha256");
  const backend = await rawServer(s, async (conn) => {
    await readClientHello(conn);
    const downBlock = pseudoRandomBytes(CHUNK, 32);
    const sending = (async () => {
      for (let i = 0; i < DOWN / CHUNK; i++) {
        new DataView(downBlock.buffer).setUint32(0, i);
        downHash.update(downBlock);
        await writeAll(conn, downBlock);
      }
      await conn.closeWrite();
    })();
    backendUp.resolve(await drainHash(conn));
    await sending;
  }, { tls: false });
  const proxy = await startProxy(s, tlsRoute(backend.address));
  const t0 = performance.now();
  const { conn } = await rawSession(proxy.port(), "a.test");
  try {
    const upHash = createHash("sha256");
    const receiving = drainHash(conn);
    for (let i = 0; i < UP / CHUNK; i++) {
      stamp(i);
      upHash.update(block);
      await writeAll(conn, block);
    }
    await conn.closeWrite();
    const [received, atBackend] = await Promise.all([receiving, backendUp.promise]);
    const seconds = (performance.now() - t0) / 1000;
    console.log(`  1 GiB up + 1 GiB down in ${seconds.toFixed(1)} s`);
    assert.equal(atBackend.bytes, UP);
    assert.equal(atBackend.sha256, upHash.digest("hex"));
    assert.equal(received.bytes, DOWN);
    assert.equal(received.sha256, downHash.digest("hex"));
  } finally {
    conn.close();
  }
  const e = await proxy.waitAccess((e) => e.sni === "a.test", 15_000);
  assert.equal(e.mode, "userspace");
  assert.equal(e.bytes_down, DOWN);
  assert.equal(e.close_reason, "done");
}, { timeoutMs: 120_000 });

e2eTest(
  "a ClientHello trickled in one byte at a time is routed and relayed byte for byte",
  async (s) => {
    const got = Promise.withResolvers<Uint8Array>();
    const backend = await rawServer(s, async (conn) => {
      got.resolve(await readClientHello(conn));
      await writeAll(conn, encoder.encode("ok"));
      await conn.closeWrite();
    }, { tls: false });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "x.b.test", backends: [backend.address] }],
    });
    const hello = await clientHelloBytes("x.b.test");
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port() });
    conn.setNoDelay(true);
    try {
      for (let i = 0; i < hello.length; i++) {
        await writeAll(conn, hello.subarray(i, i + 1));
        if (i % 16 === 0) await sleep(1);
      }
      const relayed = await within(10_000, "hello at the backend", got.promise);
      assert.equal(sha256(relayed), sha256(hello));
      await conn.closeWrite();
      assert.equal(decoder.decode(await readToEnd(conn)), "ok");
    } finally {
      conn.close();
    }
    const e = await proxy.waitAccess((e) => e.sni === "x.b.test");
    assert.equal(e.bytes_up, hello.length);
    assert.equal(e.bytes_down, 2);
  },
);

e2eTest("500 concurrent TLS connections each get their random payload echoed intact", async (s) => {
  const N = 500;
  const backend = await rawServer(s, echoHandler);
  const proxy = await startProxy(s, tlsRoute(backend.address));
  const one = async (i: number) => {
    const size = 1 + ((i * 2654435761) >>> 0) % (256 * 1024);
    const payload = pseudoRandomBytes(size, 1000 + i);
    const conn = await tlsConnect(proxy.port(), "a.test");
    try {
      const back = readToEnd(conn);
      await writeAll(conn, payload);
      await conn.closeWrite();
      const got = await back;
      assert.equal(got.length, size, `connection ${i}: length`);
      assert.equal(sha256(got), sha256(payload), `connection ${i}: content`);
    } finally {
      conn.close();
    }
  };
  const t0 = performance.now();
  const results = await Promise.allSettled(Array.from({ length: N }, (_, i) => one(i)));
  console.log(`  ${N} connections in ${((performance.now() - t0) / 1000).toFixed(1)} s`);
  const failed = results.filter((r) => r.status === "rejected") as PromiseRejectedResult[];
  assert.equal(failed.length, 0, `${failed.length} failed, e.g. ${failed[0]?.reason}`);
  // every one of them is in the access log, closed normally
  const deadline = Date.now() + 10_000;
  let done = 0;
  while (Date.now() < deadline) {
    done = (await proxy.access()).filter((e) => e.close_reason === "done").length;
    if (done >= N) break;
    await sleep(100);
  }
  assert.equal(done, N);
}, { timeoutMs: 120_000 });

e2eTest(
  "a connection silent for idle_ms is closed with idle_timeout; a chatty one is not",
  async (s) => {
    const backend = await identityBackend(s, "idle");
    const proxy = await startProxy(s, tlsRoute(backend.address, { timeouts: { idle_ms: 500 } }));

    const chatty = await tlsConnect(proxy.port(), "a.test");
    const quiet = await tlsConnect(proxy.port(), "a.test");
    try {
      const quietLines = new LineReader(quiet);
      await writeAll(quiet, encoder.encode("hi\n"));
      assert.equal(await quietLines.line(), "backend=idle hi");
      const t0 = performance.now();
      const quietEnd = within(5000, "idle close", readOutcome(quiet)).then((o) => ({
        o,
        ms: performance.now() - t0,
      }));
      // chatty talks every 200 ms for 1.5 s: three times idle_ms in total
      const lines = new LineReader(chatty);
      for (let i = 0; i < 8; i++) {
        await writeAll(chatty, encoder.encode(`ping ${i}\n`));
        assert.equal(await within(3000, "chatty answer", lines.line()), `backend=idle ping ${i}`);
        await sleep(200);
      }
      const { o, ms } = await quietEnd;
      assert.notEqual(o.kind, "data");
      assert.ok(ms >= 400 && ms < 3000, `quiet closed after ${ms.toFixed(0)} ms, want ~500`);
    } finally {
      chatty.close();
      quiet.close();
    }
    const e = await proxy.waitAccess((e) => e.close_reason === "idle_timeout");
    assert.equal(e.sni, "a.test");
    assert.ok(e.duration_ms >= 400, `duration ${e.duration_ms}`);
  },
);

e2eTest("a client reset closes the backend connection and the proxy keeps serving", async (s) => {
  const backendEnd = Promise.withResolvers<string>();
  const backend = await rawServer(s, async (conn) => {
    await readClientHello(conn);
    await readExact(conn, 5); // "hello"
    await writeAll(conn, new Uint8Array(32 * 1024)); // unread by the client
    const o = await readOutcome(conn);
    backendEnd.resolve(o.kind === "error" ? "error" : o.kind);
  }, { tls: false });
  const who = await identityBackend(s, "alive");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [
      { match: "a.test", backends: [backend.address] },
      { match: "b.test", backends: [who.address] },
    ],
  });
  const hello = await clientHelloBytes("a.test");
  const before = backend.accepted;

  const sock = await nodeConnect(proxy.port(), "127.0.0.1");
  sock.pause();
  sock.on("error", () => {});
  sock.write(hello);
  sock.write("hello");
  await within(
    5000,
    "backend accepted",
    (async () => {
      while (backend.accepted === before) await sleep(20);
    })(),
  );
  await sleep(300); // the backend's bytes are now in the client's receive queue
  sock.resetAndDestroy();
  const end = await within(5000, "backend sees the close", backendEnd.promise);
  assert.ok(end === "eof" || end === "error", end);
  const e = await proxy.waitAccess((e) => e.sni === "a.test" && e.bytes_up > hello.length);
  assert.equal(e.close_reason, "client_reset");
  assert.equal(await whoAnswers(proxy.port(), "b.test"), "alive");
});

e2eTest("a backend reset closes the client connection with backend_reset", async (s) => {
  // Deno's close() does not reset a socket with unread data; node:net resetAndDestroy() does
  const server = net.createServer((sock) => {
    sock.on("error", () => {});
    sock.once("data", () => setTimeout(() => sock.resetAndDestroy(), 200));
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  s.defer(() => void server.close());
  const backend = `127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  const proxy = await startProxy(s, tlsRoute(backend));
  const { conn } = await rawSession(proxy.port(), "a.test");
  try {
    await writeAll(conn, new Uint8Array(4096).fill(7));
    const o = await within(5000, "client closed", readOutcome(conn));
    assert.notEqual(o.kind, "data");
  } finally {
    conn.close();
  }
  const e = await proxy.waitAccess((e) => e.sni === "a.test");
  assert.equal(e.close_reason, "backend_reset");
});

e2eTest("the access log counts the bytes of a known transfer exactly", async (s) => {
  const UP = 10_000;
  const DOWN = 20_000;
  const backend = await rawServer(s, async (conn) => {
    await readClientHello(conn);
    const got = await readToEnd(conn);
    assert.equal(got.length, UP);
    await writeAll(conn, pseudoRandomBytes(DOWN, 5));
    await conn.closeWrite();
  }, { tls: false });
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "*.b.test", backends: [backend.address] }],
  });
  const t0 = Date.now();
  const { conn, hello } = await rawSession(proxy.port(), "x.b.test");
  const local = conn.localAddr as Deno.NetAddr;
  try {
    await writeAll(conn, pseudoRandomBytes(UP, 4));
    await conn.closeWrite();
    assert.equal((await readToEnd(conn)).length, DOWN);
  } finally {
    conn.close();
  }
  const e = await proxy.waitAccess((e) => e.sni === "x.b.test");
  assert.deepEqual(
    {
      client: e.client,
      listener: e.listener,
      sni: e.sni,
      route: e.route,
      backend: e.backend,
      bytes_up: e.bytes_up,
      bytes_down: e.bytes_down,
      close_reason: e.close_reason,
      mode: e.mode,
    },
    {
      client: `127.0.0.1:${local.port}`,
      listener: `127.0.0.1:${proxy.port()}`,
      sni: "x.b.test",
      route: "*.b.test",
      backend: backend.address,
      bytes_up: hello.length + UP,
      bytes_down: DOWN,
      close_reason: "done",
      mode: "userspace",
    },
  );
  const time = Date.parse(e.time);
  assert.ok(time >= t0 - 1000 && time <= Date.now() + 1000, `time ${e.time}`);
  assert.ok(e.duration_ms >= 0 && e.duration_ms < 10_000, `duration_ms ${e.duration_ms}`);
});

e2eTest(
  "TLS through the proxy is end to end: the client sees the backend's certificate",
  async (s) => {
    const backend = await identityBackend(s, "tls");
    const proxy = await startProxy(s, tlsRoute(backend.address));
    const conn = await tlsConnect(proxy.port(), "a.test");
    try {
      await writeAll(conn, encoder.encode("x\n"));
      const line = await new LineReader(conn).line();
      assert.equal(line, "backend=tls x");
    } finally {
      conn.close();
    }
    const out = await new Deno.Command("openssl", {
      args: ["s_client", "-connect", `127.0.0.1:${proxy.port()}`, "-servername", "a.test"],
      stdin: "null",
    }).output();
    assert.match(decoder.decode(out.stdout), /issuer=CN ?= ?sni-proxy e2e CA/);
  },
);
