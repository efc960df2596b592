/** End to end: bytes through the real proxy arrive intact, in order, with half-close and limits. */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  drainHash,
  echoHandler,
  pseudoRandomBytes,
  rawServer,
  readToEnd,
  Scope,
  sha256,
  sleep,
  testCerts,
  tlsConnect,
  withProxy,
  writeAll,
} from "./harness/mod.ts";

const route = (address: string) => ({
  listeners: [{ address: "127.0.0.1:0" }],
  routes: [{ match: "a.test", backends: [address] }],
});

Deno.test("1 GiB each way through the proxy: sha256 equal at both ends, access log exact", async () => {
  await using scope = new Scope();
  const GiB = 1 << 30;
  const block = pseudoRandomBytes(1 << 20, 7);
  // expected hash of the stream: 1024 blocks, each tagged with its index in the first 4 bytes
  const tagged = (i: number) => {
    new DataView(block.buffer).setUint32(0, i);
    return block;
  };
  const h = createHash("sha256");
  for (let i = 0; i < GiB / block.length; i++) h.update(tagged(i));
  const expected = h.digest("hex");
  let upstream: { bytes: number; sha256: string } | null = null;
  const backend = await rawServer(scope, async (conn) => {
    const [got] = await Promise.all([
      drainHash(conn),
      (async () => {
        for (let i = 0; i < GiB / block.length; i++) await writeAll(conn, tagged(i).slice());
        await conn.closeWrite();
      })(),
    ]);
    upstream = got;
  });
  try {
    await withProxy(route(backend.address), async (p) => {
      const conn = await tlsConnect(p.port(), "a.test");
      const t0 = performance.now();
      const [down] = await Promise.all([
        drainHash(conn),
        (async () => {
          for (let i = 0; i < GiB / block.length; i++) await writeAll(conn, tagged(i).slice());
          await conn.closeWrite();
        })(),
      ]);
      const secs = (performance.now() - t0) / 1000;
      conn.close();
      await backend.settled();
      console.log(`  2 GiB (1 GiB each way, TLS both ends) in ${secs.toFixed(1)} s`);
      assert.equal(down.bytes, GiB);
      assert.equal(down.sha256, expected, "backend → client stream intact");
      assert.equal(upstream!.bytes, GiB);
      assert.equal(upstream!.sha256, expected, "client → backend stream intact");
      const e = await p.waitAccess((e) => e.sni === "a.test");
      assert.equal(e.close_reason, "done");
      // TLS framing adds a little on top of the payload, never less than the payload
      assert.ok(
        (e.bytes_up as number) > GiB && (e.bytes_up as number) < GiB * 1.01,
        `${e.bytes_up}`,
      );
      assert.ok((e.bytes_down as number) > GiB && (e.bytes_down as number) < GiB * 1.01);
    });
  } finally {
    backend.close();
  }
});

Deno.test("half-close from the client: the backend's answer after EOF still reaches the client", async () => {
  await using scope = new Scope();
  const backend = await rawServer(scope, async (conn) => {
    const got = await drainHash(conn); // until the client's EOF
    const big = pseudoRandomBytes(8 << 20, got.bytes);
    await writeAll(conn, new TextEncoder().encode(`${got.bytes} ${got.sha256}\n`));
    await writeAll(conn, big);
    await conn.closeWrite();
  });
  try {
    await withProxy(route(backend.address), async (p) => {
      const conn = await tlsConnect(p.port(), "a.test");
      const sent = pseudoRandomBytes(3 << 20, 99);
      await writeAll(conn, sent);
      await conn.closeWrite();
      const reply = await readToEnd(conn);
      conn.close();
      const nl = reply.indexOf(10);
      assert.equal(
        new TextDecoder().decode(reply.subarray(0, nl)),
        `${sent.length} ${sha256(sent)}`,
      );
      assert.equal(sha256(reply.subarray(nl + 1)), sha256(pseudoRandomBytes(8 << 20, sent.length)));
    });
  } finally {
    backend.close();
  }
});

Deno.test("half-close from the backend: the client keeps sending after EOF and all of it arrives", async () => {
  await using scope = new Scope();
  let received: { bytes: number; sha256: string } | null = null;
  const backend = await rawServer(scope, async (conn) => {
    await writeAll(conn, new TextEncoder().encode("bye\n"));
    await conn.closeWrite();
    received = await drainHash(conn);
  });
  try {
    await withProxy(route(backend.address), async (p) => {
      const conn = await tlsConnect(p.port(), "a.test");
      const first = await readToEnd(conn); // the backend's whole output, then EOF
      assert.equal(new TextDecoder().decode(first), "bye\n");
      const late = pseudoRandomBytes(5 << 20, 5);
      await writeAll(conn, late);
      await conn.closeWrite();
      await backend.settled();
      conn.close();
      assert.equal(received!.bytes, late.length);
      assert.equal(received!.sha256, sha256(late));
    });
  } finally {
    backend.close();
  }
});

Deno.test("500 concurrent connections with random payloads all come back intact", async () => {
  await using scope = new Scope();
  const backend = await rawServer(scope, echoHandler);
  try {
    await withProxy(route(backend.address), async (p) => {
      const one = async (i: number) => {
        const conn = await tlsConnect(p.port(), "a.test");
        const payload = pseudoRandomBytes(1 + ((i * 7919) % (256 << 10)), i + 1);
        const [back] = await Promise.all([
          readToEnd(conn),
          (async () => {
            await writeAll(conn, payload);
            await conn.closeWrite();
          })(),
        ]);
        conn.close();
        assert.equal(back.length, payload.length, `connection ${i}: length`);
        assert.equal(sha256(back), sha256(payload), `connection ${i}: content`);
      };
      await Promise.all(Array.from({ length: 500 }, (_, i) => one(i)));
      const entries = await p.access();
      const deadline = Date.now() + 5000;
      while ((await p.access()).length < 500 && Date.now() < deadline) await sleep(100);
      assert.equal(
        (await p.access()).filter((e) => e.close_reason === "done").length,
        500,
        `${entries.length}`,
      );
    });
  } finally {
    backend.close();
  }
});

Deno.test("an idle connection is closed after idle_ms and logged as idle_timeout", async () => {
  await using scope = new Scope();
  const backend = await rawServer(scope, echoHandler);
  try {
    await withProxy({ ...route(backend.address), timeouts: { idle_ms: 400 } }, async (p) => {
      const conn = await tlsConnect(p.port(), "a.test");
      await writeAll(conn, new Uint8Array([1, 2, 3]));
      const t0 = Date.now();
      const got = await readToEnd(conn).catch(() => new Uint8Array(3));
      const waited = Date.now() - t0;
      conn.close();
      assert.equal(got.length, 3);
      assert.ok(waited >= 300 && waited < 3000, `closed after ${waited} ms`);
      const e = await p.waitAccess((e) => e.sni === "a.test");
      assert.equal(e.close_reason, "idle_timeout");
    });
  } finally {
    backend.close();
  }
});

Deno.test("a client that never finishes its hello is closed after client_hello_ms", async () => {
  await withProxy({
    ...route("127.0.0.1:9"),
    timeouts: { client_hello_ms: 400 },
  }, async (p) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
    await conn.write(new Uint8Array([0x16, 3, 1, 0, 200, 1, 0]));
    const t0 = Date.now();
    const n = await conn.read(new Uint8Array(10)).catch(() => null);
    const waited = Date.now() - t0;
    conn.close();
    assert.equal(n, null, "closed without a byte");
    assert.ok(waited >= 300 && waited < 3000, `closed after ${waited} ms`);
    const e = await p.waitAccess(() => true);
    assert.equal(e.close_reason, "client_hello_timeout");
  });
});

Deno.test("garbage, malformed SSLv2-format and oversized hellos are closed; the next client is served", async () => {
  await using scope = new Scope();
  const backend = await rawServer(scope, echoHandler);
  try {
    await withProxy(
      { ...route(backend.address), limits: { max_client_hello_bytes: 4096 } },
      async (p) => {
        const bad = [
          new TextEncoder().encode("GET / HTTP/1.1\r\n\r\n"),
          // an SSLv2-format CLIENT-HELLO of a version no SSL/TLS has (a valid one is routed)
          new Uint8Array([0x80, 0x2e, 0x01, 0x03, 0x09]),
          new Uint8Array([0x16, 3, 1, 0x40, 0, 1, 0, 0x3f, 0xfc]), // a 16 KiB record
          pseudoRandomBytes(2000, 3),
        ];
        for (const bytes of bad) {
          const conn = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
          await conn.write(bytes).catch(() => {});
          const n = await conn.read(new Uint8Array(10)).catch(() => null);
          conn.close();
          assert.equal(n, null);
        }
        const entries = await (async () => {
          for (let i = 0; i < 50; i++) {
            const a = await p.access();
            if (a.length >= bad.length) return a;
            await sleep(100);
          }
          return p.access();
        })();
        assert.deepEqual(entries.map((e) => e.close_reason), bad.map(() => "bad_client_hello"));
        await p.waitForLog("too_large");
        await p.waitForLog("SSLv2-format hello of unknown version 0x0309");
        const ok = await tlsConnect(p.port(), "a.test");
        await writeAll(ok, new Uint8Array([42]));
        await ok.closeWrite();
        assert.deepEqual([...(await readToEnd(ok))], [42]);
        ok.close();
      },
    );
  } finally {
    backend.close();
  }
});

Deno.test("a backend reset closes the client side; the proxy keeps serving", async () => {
  await using scope = new Scope();
  const backend = await rawServer(scope, async (conn) => {
    // close with unread data in the receive buffer: the kernel answers with a RST
    await sleep(200);
    conn.close();
  });
  try {
    await withProxy(route(backend.address), async (p) => {
      const conn = await tlsConnect(p.port(), "a.test");
      await writeAll(conn, pseudoRandomBytes(256 << 10, 1)).catch(() => {});
      const got = await readToEnd(conn).catch(() => null);
      conn.close();
      assert.ok(got === null || got.length === 0, "nothing but the close reaches the client");
      const e = await p.waitAccess((e) => e.sni === "a.test");
      assert.ok(["backend_reset", "done"].includes(String(e.close_reason)), String(e.close_reason));
      const again = await tlsConnect(p.port(), "a.test");
      again.close();
    });
  } finally {
    backend.close();
  }
});

Deno.test("a client reset closes the backend side", async () => {
  await using scope = new Scope();
  let backendSaw: string | null = null;
  const backend = await rawServer(scope, async (conn) => {
    await writeAll(conn, pseudoRandomBytes(4 << 20, 3)).catch(() => {});
    backendSaw = await drainHash(conn).then(() => "eof", (e) => `error ${e.name}`);
  });
  try {
    await withProxy(route(backend.address), async (p) => {
      const raw = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
      const tls = await Deno.startTls(raw, {
        hostname: "a.test",
        caCerts: [(await testCerts()).caPem],
      });
      await tls.handshake();
      await writeAll(tls, new Uint8Array([1]));
      await sleep(300); // unread bytes pile up in the client's receive buffer
      tls.close(); // → RST
      await backend.settled();
      assert.ok(backendSaw !== null, "the backend saw its connection end");
      const e = await p.waitAccess((e) => e.sni === "a.test");
      assert.ok(["client_reset", "backend_reset", "done"].includes(String(e.close_reason)));
    });
  } finally {
    backend.close();
  }
});
