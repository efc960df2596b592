/**
 * ClientHello and HTTP head parsers over hellos captured from real clients at test time
 * (openssl s_client, curl, Deno, Node), fed in every split, plus malformed input.
 */
import assert from "node:assert/strict";
import { type ClientHello, ClientHelloError, ClientHelloParser } from "../src/clienthello.ts";
import { HttpHostParser, HttpRequestError } from "../src/http.ts";

/** Listens once, records what the client sends until a whole hello is there, then hangs up. */
async function captureHello(run: (port: number) => Deno.ChildProcess | Promise<unknown>) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const client = run(listener.addr.port);
  const conn = await listener.accept();
  const parser = new ClientHelloParser(65536);
  const buf = new Uint8Array(4096);
  let hello: ClientHello | null = null;
  while (!hello) {
    const n = await conn.read(buf);
    if (n === null) break;
    hello = parser.push(buf.subarray(0, n));
  }
  const bytes = parser.data.slice(0, hello?.recordBytes ?? parser.data.length);
  conn.close();
  listener.close();
  if (client instanceof Deno.ChildProcess) {
    try {
      client.kill("SIGKILL");
    } catch { /* exited */ }
    await client.output().catch(() => {});
  } else {
    await (client as Promise<unknown>).catch(() => {});
  }
  assert.ok(hello, "the captured bytes hold a complete hello");
  return { bytes, hello };
}

const spawn = (cmd: string, args: string[]) =>
  new Deno.Command(cmd, { args, stdin: "null", stdout: "piped", stderr: "piped" }).spawn();

interface Captured {
  client: string;
  bytes: Uint8Array;
  expect: Partial<ClientHello>;
}

const captured: Captured[] = [];

async function capture(): Promise<Captured[]> {
  if (captured.length) return captured;
  const add = async (
    client: string,
    expect: Partial<ClientHello>,
    run: (port: number) => Deno.ChildProcess | Promise<unknown>,
  ) => {
    const { bytes } = await captureHello(run);
    captured.push({ client, bytes, expect });
  };
  await add(
    "openssl s_client",
    { serverName: "a.example.test", alpn: ["h2", "http/1.1"] },
    (port) =>
      spawn("openssl", [
        "s_client",
        "-connect",
        `127.0.0.1:${port}`,
        "-servername",
        "A.Example.Test",
        "-alpn",
        "h2,http/1.1",
      ]),
  );
  await add(
    "openssl s_client -noservername -tls1_2",
    { serverName: null },
    (port) =>
      spawn("openssl", ["s_client", "-connect", `127.0.0.1:${port}`, "-noservername", "-tls1_2"]),
  );
  await add(
    "curl --http2",
    { serverName: "curl.example.test", alpn: ["h2", "http/1.1"] },
    (port) =>
      spawn("curl", [
        "-sk",
        "--http2",
        "--max-time",
        "5",
        "--resolve",
        `curl.example.test:${port}:127.0.0.1`,
        `https://curl.example.test:${port}/`,
      ]),
  );
  await add(
    "Deno.startTls",
    { serverName: "deno.example.test", alpn: ["x-test"] },
    async (port) => {
      const raw = await Deno.connect({ hostname: "127.0.0.1", port });
      const tls = await Deno.startTls(raw, {
        hostname: "deno.example.test",
        alpnProtocols: ["x-test"],
      });
      await tls.handshake().catch(() => {});
      tls.close();
    },
  );
  await add(
    "node tls",
    { serverName: "node.example.test", alpn: ["http/1.1"] },
    (port) =>
      spawn("node", [
        "-e",
        `require('tls').connect({host:'127.0.0.1',port:${port},servername:'node.example.test',` +
        `ALPNProtocols:['http/1.1'],rejectUnauthorized:false}).on('error',()=>{})`,
      ]),
  );
  return captured;
}

function parseWhole(bytes: Uint8Array, max = 65536): ClientHello {
  const p = new ClientHelloParser(max);
  const r = p.push(bytes);
  assert.ok(r, "complete after all bytes");
  return r;
}

function assertHello(got: ClientHello, c: Captured) {
  for (const [k, v] of Object.entries(c.expect)) {
    assert.deepEqual(got[k as keyof ClientHello], v, `${c.client}: ${k}`);
  }
  assert.equal(got.recordBytes, c.bytes.length, `${c.client}: recordBytes`);
}

/** Re-frames a hello's handshake message into records of at most `size` bytes. */
function fragment(bytes: Uint8Array, size: number): Uint8Array {
  const hs = bytes.subarray(5);
  const out: number[] = [];
  for (let i = 0; i < hs.length; i += size) {
    const part = hs.subarray(i, Math.min(i + size, hs.length));
    out.push(0x16, 3, 1, part.length >> 8, part.length & 0xff, ...part);
  }
  return new Uint8Array(out);
}

/** Builds a hello from parts, with correct lengths, for the malformed cases. */
function buildHello(exts: Uint8Array[], opts: { padTo?: number } = {}): Uint8Array {
  const u16 = (n: number) => [n >> 8, n & 0xff];
  let extBytes = exts.flatMap((e) => [...e]);
  if (opts.padTo) {
    const pad = opts.padTo;
    extBytes = [...extBytes, 0, 21, ...u16(pad), ...new Array(pad).fill(0)];
  }
  const body = [
    3,
    3,
    ...new Array(32).fill(7),
    0,
    ...u16(2),
    0x13,
    0x01,
    1,
    0,
    ...u16(extBytes.length),
    ...extBytes,
  ];
  const hs = [1, body.length >> 16, (body.length >> 8) & 0xff, body.length & 0xff, ...body];
  const out: number[] = [];
  for (let i = 0; i < hs.length; i += 16384) {
    const part = hs.slice(i, i + 16384);
    out.push(0x16, 3, 1, ...u16(part.length), ...part);
  }
  return new Uint8Array(out);
}

function sniExt(name: Uint8Array | string): Uint8Array {
  const n = typeof name === "string" ? new TextEncoder().encode(name) : name;
  const entry = [0, n.length >> 8, n.length & 0xff, ...n];
  const list = [entry.length >> 8, entry.length & 0xff, ...entry];
  return new Uint8Array([0, 0, list.length >> 8, list.length & 0xff, ...list]);
}

function errorKind(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    if (e instanceof ClientHelloError || e instanceof HttpRequestError) return e.kind;
    throw e;
  }
  return "none";
}

Deno.test("real clients' hellos parse whole, in every two-piece split and byte by byte", async () => {
  for (const c of await capture()) {
    assertHello(parseWhole(c.bytes), c);
    for (let cut = 1; cut < c.bytes.length; cut++) {
      const p = new ClientHelloParser();
      assert.equal(p.push(c.bytes.subarray(0, cut)), null, `${c.client}: incomplete at ${cut}`);
      assertHello(p.push(c.bytes.subarray(cut))!, c);
      assert.deepEqual(p.data, c.bytes, "data is the input, unchanged");
    }
    const p = new ClientHelloParser();
    let r: ClientHello | null = null;
    for (let i = 0; i < c.bytes.length; i++) {
      r = p.push(c.bytes.subarray(i, i + 1));
      assert.equal(r === null, i < c.bytes.length - 1, `${c.client}: done only at the last byte`);
    }
    assertHello(r!, c);
  }
});

Deno.test("a hello fragmented over many records (splits mid-extension) is reassembled", async () => {
  for (const c of await capture()) {
    for (const size of [1, 7, 100]) {
      const bytes = fragment(c.bytes, size);
      const got = parseWhole(bytes);
      assert.deepEqual(got.serverName, c.expect.serverName, `${c.client} in ${size}-byte records`);
      assert.equal(got.recordBytes, bytes.length);
    }
  }
});

Deno.test("bytes after the hello are kept in data but not in recordBytes", async () => {
  const [c] = await capture();
  const p = new ClientHelloParser();
  const extra = new Uint8Array([0x17, 3, 3, 0, 1, 9]);
  const r = p.push(new Uint8Array([...c.bytes, ...extra]))!;
  assert.equal(r.recordBytes, c.bytes.length);
  assert.equal(p.data.length, c.bytes.length + extra.length);
});

Deno.test("a hello cut at any byte is truncated at EOF, never complete or crashing", async () => {
  for (const c of await capture()) {
    for (let cut = 0; cut < c.bytes.length; cut++) {
      const p = new ClientHelloParser();
      assert.equal(p.push(c.bytes.subarray(0, cut)), null);
      assert.equal(errorKind(() => p.end()), "truncated");
    }
  }
});

Deno.test("lying lengths, empty or illegal names, wrong record types are typed errors", () => {
  const good = buildHello([sniExt("ok.test")]);
  assert.equal(parseWhole(good).serverName, "ok.test");
  const mutate = (at: number, delta: number) => {
    const b = good.slice();
    b[at] = (b[at] + delta) & 0xff;
    return b;
  };
  // record length bigger: waits, then truncated; smaller: the message does not fit
  assert.equal(
    errorKind(() => {
      const p = new ClientHelloParser();
      p.push(mutate(4, 1));
      p.end();
    }),
    "truncated",
  );
  // every length field made to lie: handshake, session_id, cipher_suites, compression,
  // extensions block, SNI extension, server_name list, host_name
  for (const at of [8, 43, 45, 48, 51, 55, 57, 60]) {
    for (const delta of [1, -1, 0x40]) {
      const kind = errorKind(() => {
        const p = new ClientHelloParser();
        p.push(mutate(at, delta));
        p.end();
      });
      assert.ok(
        ["bad_length", "bad_extension", "truncated", "too_large", "bad_server_name"].includes(kind),
        `offset ${at} ${delta}: ${kind}`,
      );
    }
  }
  assert.equal(errorKind(() => parseWhole(buildHello([sniExt("")]))), "bad_server_name");
  assert.equal(errorKind(() => parseWhole(buildHello([sniExt("a/b.test")]))), "bad_server_name");
  assert.equal(
    errorKind(() => parseWhole(buildHello([sniExt(new Uint8Array([0x61, 0, 0x62]))]))),
    "bad_server_name",
  );
  assert.equal(errorKind(() => parseWhole(buildHello([sniExt("a..b")]))), "bad_server_name");
  assert.equal(parseWhole(buildHello([sniExt("Trailing.Dot.")])).serverName, "trailing.dot");
  assert.equal(
    errorKind(() => parseWhole(buildHello([sniExt("a.test"), sniExt("b.test")]))),
    "bad_extension",
  );
  assert.equal(
    errorKind(() => new ClientHelloParser().push(new Uint8Array([0x15, 3, 3, 0, 2, 2, 40]))),
    "not_tls",
  );
  assert.equal(
    errorKind(() => new ClientHelloParser().push(new Uint8Array([0x16, 3, 1, 0, 0]))),
    "bad_length",
  );
  const appData = new Uint8Array([0x16, 3, 1, 0, 4, 1, 0, 0, 200, 0x17, 3, 3, 0, 1, 0]);
  assert.equal(errorKind(() => new ClientHelloParser().push(appData)), "not_handshake");
  assert.equal(
    errorKind(() => new ClientHelloParser().push(new Uint8Array([0x16, 3, 1, 0, 4, 2, 0, 0, 0]))),
    "not_client_hello",
  );
  const sslv2 = new Uint8Array([0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15]);
  assert.equal(errorKind(() => new ClientHelloParser().push(sslv2)), "sslv2");
  assert.equal(
    errorKind(() => new ClientHelloParser().push(new TextEncoder().encode("GET / HTTP/1.1\r\n"))),
    "not_tls",
  );
});

Deno.test("hellos over the size limit are refused as too_large, before buffering them all", () => {
  const big = buildHello([sniExt("big.test")], { padTo: 17000 });
  assert.ok(big.length > 16384);
  const p = new ClientHelloParser(16384);
  assert.equal(errorKind(() => p.push(big.subarray(0, 10))), "too_large", "known from the headers");
  assert.equal(parseWhole(big, 65536).serverName, "big.test");
  const small = buildHello([sniExt("s.test")], { padTo: 3000 });
  assert.equal(errorKind(() => new ClientHelloParser(2048).push(small)), "too_large");
});

Deno.test("random mutations of real hellos only ever raise ClientHelloError", async () => {
  const hellos = await capture();
  let seed = 12345;
  const rand = (n: number) => {
    seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
    return seed % n;
  };
  for (let i = 0; i < 4000; i++) {
    const b = hellos[i % hellos.length].bytes.slice();
    for (let k = 0; k <= rand(4); k++) b[rand(b.length)] = rand(256);
    const p = new ClientHelloParser();
    try {
      const step = 1 + rand(300);
      for (let off = 0; off < b.length; off += step) p.push(b.subarray(off, off + step));
      p.end();
    } catch (e) {
      if (!(e instanceof ClientHelloError)) throw e;
    }
  }
});

Deno.test("early_data and encrypted_client_hello are detected; ECH routes by the outer name", () => {
  const ext = (type: number, data: number[]) =>
    new Uint8Array([type >> 8, type & 0xff, data.length >> 8, data.length & 0xff, ...data]);
  const h = parseWhole(buildHello([sniExt("public.test"), ext(42, []), ext(0xfe0d, [0, 1, 2, 3])]));
  assert.equal(h.earlyData, true);
  assert.equal(h.encryptedClientHello, true);
  assert.equal(h.serverName, "public.test");
  const plain = parseWhole(buildHello([sniExt("x.test")]));
  assert.equal(plain.earlyData, false);
  assert.equal(plain.encryptedClientHello, false);
});

function http(text: string, max?: number) {
  const p = new HttpHostParser(max);
  const bytes = new TextEncoder().encode(text);
  let r = null;
  for (let i = 0; i < bytes.length; i++) r = p.push(bytes.subarray(i, i + 1));
  return r;
}

Deno.test("HTTP heads give the Host without port, any case, byte by byte", () => {
  assert.equal(
    http("GET / HTTP/1.1\r\nHost: WWW.Example.test:8080\r\n\r\n")?.serverName,
    "www.example.test",
  );
  assert.equal(http("GET / HTTP/1.1\r\nhost: [::1]:80\r\n\r\n")?.serverName, "::1");
  assert.equal(http("GET / HTTP/1.1\nX: y\nHost: a.test.\n\n")?.serverName, "a.test");
  assert.equal(http("GET / HTTP/1.0\r\n\r\n")?.serverName, null);
  const head = "POST /x HTTP/1.1\r\nHost: a.test\r\n\r\n";
  assert.equal(http(head + "body")?.headBytes, head.length);
  assert.equal(http("GET / HTTP/1.1\r\nHost: a.test"), null, "incomplete");
});

Deno.test("bad HTTP heads are typed errors", () => {
  assert.equal(errorKind(() => http("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")), "bad_host");
  assert.equal(errorKind(() => http("GET / HTTP/1.1\r\nHost: a b\r\n\r\n")), "bad_host");
  assert.equal(errorKind(() => http("GET / HTTP/1.1\r\nHost: a.test:http\r\n\r\n")), "bad_host");
  assert.equal(errorKind(() => http("\x16\x03\x01\x02\x00")), "not_http");
  assert.equal(errorKind(() => http("GET / SPDY/3\r\n\r\n")), "not_http");
  assert.equal(
    errorKind(() => http("GET / HTTP/1.1\r\nX: " + "a".repeat(3000) + "\r\n\r\n", 1024)),
    "too_large",
  );
  const p = new HttpHostParser();
  p.push(new TextEncoder().encode("GET / HTTP/1.1\r\nHo"));
  assert.equal(errorKind(() => p.end()), "truncated");
});
