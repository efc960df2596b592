/**
 * ClientHello parser over hellos captured from real clients (tests/fixtures/hellos, captured by
 * tests/fixtures/capture_hellos.ts: openssl, curl, Deno, Node, Chromium's post-quantum hello),
 * fed whole, in every two-piece split and one byte at a time; plus hellos rebuilt from them with
 * lying lengths, bad names, record fragmentation, oversize padding, and a mutation fuzz loop.
 */
import assert from "node:assert/strict";
import {
  type ClientHello,
  ClientHelloError,
  type ClientHelloErrorKind,
  ClientHelloParser,
} from "../src/proto/clienthello.ts";
import { sslv2ClientHello } from "./harness/hello.ts";

const dir = new URL("./fixtures/hellos/", import.meta.url);

interface Fixture {
  file: string;
  client: string;
  bytes: Uint8Array;
  expect: ClientHello;
}

const manifest = JSON.parse(Deno.readTextFileSync(new URL("manifest.json", dir))) as {
  hellos: { file: string; client: string; expect: ClientHello }[];
};
const fixtures: Fixture[] = manifest.hellos.map((h) => ({
  ...h,
  // "curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/..." -> "curl 7.88.1"
  client: h.client.split(" ").slice(0, 2).join(" "),
  bytes: Deno.readFileSync(new URL(h.file, dir)),
}));
const byFile = (f: string) => {
  const x = fixtures.find((x) => x.file === f);
  assert.ok(x, `fixture ${f} is in the manifest`);
  return x;
};

/** Feeds `bytes` cut at `cuts`; returns the hello (null if incomplete) and the parser. */
function feed(bytes: Uint8Array, cuts: number[] = [], max?: number) {
  const p = new ClientHelloParser(max);
  let hello: ClientHello | null = null;
  let from = 0;
  for (const at of [...cuts, bytes.length]) {
    hello = p.push(bytes.subarray(from, at));
    from = at;
  }
  return { hello, parser: p };
}

/** The error kind `bytes` end in (pushed whole, then end()), or the hello if it parses. */
function outcome(bytes: Uint8Array, max?: number): ClientHelloErrorKind | ClientHello {
  const p = new ClientHelloParser(max);
  try {
    p.push(bytes);
    return p.end();
  } catch (e) {
    if (e instanceof ClientHelloError) return e.kind;
    throw e;
  }
}

function assertKind(bytes: Uint8Array, kind: ClientHelloErrorKind, max?: number) {
  assert.equal(outcome(bytes, max), kind);
}

// ---- a small independent ClientHello codec for building variants of captured hellos ----

interface Ext {
  type: number;
  data: Uint8Array;
}
interface Parts {
  /** legacy_version .. compression_methods of the captured hello. */
  head: Uint8Array;
  exts: Ext[];
}

const u16 = (n: number) => [n >> 8, n & 255];
const cat = (...parts: (Uint8Array | number[])[]) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let n = 0;
  for (const p of parts) {
    out.set(p, n);
    n += p.length;
  }
  return out;
};
const ascii = (s: string) => new TextEncoder().encode(s);

function decompose(hello: Uint8Array): Parts {
  assert.equal(hello[0], 22);
  const body = hello.subarray(9, 5 + ((hello[3] << 8) | hello[4]));
  let p = 34;
  p += 1 + body[p];
  p += 2 + ((body[p] << 8) | body[p + 1]);
  p += 1 + body[p];
  const head = body.slice(0, p);
  const end = p + 2 + ((body[p] << 8) | body[p + 1]);
  p += 2;
  const exts: Ext[] = [];
  while (p < end) {
    const len = (body[p + 2] << 8) | body[p + 3];
    exts.push({ type: (body[p] << 8) | body[p + 1], data: body.slice(p + 4, p + 4 + len) });
    p += 4 + len;
  }
  return { head, exts };
}

/** The handshake message (type, 3-byte length, body). */
function handshake(parts: Parts): Uint8Array {
  const exts = cat(...parts.exts.map((e) => cat(u16(e.type), u16(e.data.length), e.data)));
  const body = cat(parts.head, u16(exts.length), exts);
  return cat([1, body.length >> 16, (body.length >> 8) & 255, body.length & 255], body);
}

/** Wraps handshake bytes in records of at most `size` payload bytes (or at the given cuts). */
function records(hs: Uint8Array, cuts: number[] | number = 16384, version = [3, 1]): Uint8Array {
  const bounds = typeof cuts === "number"
    ? Array.from({ length: Math.ceil(hs.length / cuts) - 1 }, (_, i) => (i + 1) * cuts)
    : cuts;
  const out: (Uint8Array | number[])[] = [];
  let from = 0;
  for (const at of [...bounds, hs.length]) {
    out.push([22, ...version, ...u16(at - from)], hs.subarray(from, at));
    from = at;
  }
  return cat(...out);
}

function withExt(parts: Parts, type: number, data: Uint8Array | null): Parts {
  const exts = parts.exts.filter((e) => e.type !== type);
  if (data) exts.splice(1, 0, { type, data });
  return { head: parts.head, exts };
}

function sniData(...names: [number, Uint8Array][]): Uint8Array {
  const list = cat(...names.map(([t, n]) => cat([t], u16(n.length), n)));
  return cat(u16(list.length), list);
}

const base = () => decompose(byFile("curl_http2.bin").bytes);
const helloWithSni = (name: Uint8Array | string) =>
  records(
    handshake(withExt(base(), 0, sniData([0, typeof name === "string" ? ascii(name) : name]))),
  );

// ---- captured hellos ----

Deno.test("the fixtures hold the clients the manifest names, Chromium's post-quantum one included", () => {
  assert.ok(fixtures.length >= 8, `${fixtures.length} fixtures`);
  const pq = byFile("chromium_pq.bin");
  assert.ok(pq.bytes.length > 1500, `Chromium hello is ${pq.bytes.length} bytes`);
  // X25519MLKEM768 (0x11ec) key share: the reason it is big
  const shares = decompose(pq.bytes).exts.find((e) => e.type === 51)!.data;
  assert.ok(shares.some((_, i) => shares[i] === 0x11 && shares[i + 1] === 0xec));
  assert.ok(byFile("openssl_early_data.bin").expect.earlyData);
});

for (const f of fixtures) {
  Deno.test(`${f.client} (${f.file}): whole, every two-piece split and byte by byte give the manifest's hello`, () => {
    const whole = feed(f.bytes);
    assert.deepEqual(whole.hello, f.expect);
    assert.deepEqual(whole.parser.data, f.bytes);
    assert.deepEqual(whole.parser.end(), f.expect);

    for (let cut = 0; cut <= f.bytes.length; cut++) {
      const p = new ClientHelloParser();
      const first = p.push(f.bytes.subarray(0, cut));
      if (cut < f.expect.recordBytes) assert.equal(first, null, `cut at ${cut}`);
      else assert.deepEqual(first, f.expect, `cut at ${cut}`);
      assert.deepEqual(p.push(f.bytes.subarray(cut)), f.expect, `cut at ${cut}`);
      assert.deepEqual(p.data, f.bytes, `data after cut at ${cut}`);
    }

    const p = new ClientHelloParser();
    for (let i = 0; i < f.bytes.length; i++) {
      const r = p.push(f.bytes.subarray(i, i + 1));
      if (i + 1 < f.expect.recordBytes) assert.equal(r, null, `byte ${i}`);
      else assert.deepEqual(r, f.expect, `byte ${i}`);
    }
    assert.deepEqual(p.data, f.bytes);
  });

  Deno.test(`${f.client} (${f.file}): EOF at every byte before the end is 'truncated'`, () => {
    for (let cut = 0; cut < f.expect.recordBytes; cut++) {
      const p = new ClientHelloParser();
      assert.equal(p.push(f.bytes.subarray(0, cut)), null);
      assert.throws(() => p.end(), (e) => e instanceof ClientHelloError && e.kind === "truncated");
    }
  });
}

Deno.test("bytes after the hello (0-RTT records) are kept in data, not counted in recordBytes", () => {
  const f = byFile("openssl_early_data.bin");
  assert.ok(f.expect.recordBytes < f.bytes.length);
  const { hello, parser } = feed(f.bytes.subarray(0, f.expect.recordBytes));
  assert.deepEqual(hello, f.expect);
  const more = f.bytes.subarray(f.expect.recordBytes);
  assert.deepEqual(parser.push(more), f.expect);
  assert.deepEqual(parser.data, f.bytes);
  assert.deepEqual(parser.push(new Uint8Array(5000).fill(7)), f.expect);
  assert.equal(parser.data.length, f.bytes.length + 5000);
});

Deno.test("a hello read in one piece is held in a buffer of its own length, one in pieces grows", () => {
  // a connection keeps its hello's bytes until they are forwarded: no 2 KiB for a 266-byte hello
  for (const f of fixtures) {
    const parser = new ClientHelloParser(16384);
    assert.deepEqual(parser.push(f.bytes), f.expect, f.file);
    assert.equal(parser.data.buffer.byteLength, f.bytes.length, f.file);
  }
  const f = byFile("chromium_pq.bin");
  const parser = new ClientHelloParser(16384);
  for (let i = 0; i < f.bytes.length; i += 100) parser.push(f.bytes.subarray(i, i + 100));
  assert.deepEqual(parser.end(), f.expect);
  assert.deepEqual(parser.data, f.bytes);
  assert.ok(parser.data.buffer.byteLength < 2 * 4096, "doubling, not a buffer per piece");
});

// ---- fragmentation and record versions ----

Deno.test("a hello split over records anywhere (mid-extension, mid-header, 1-byte records) parses the same", () => {
  for (const f of [byFile("chromium_pq.bin"), byFile("node_tls.bin")]) {
    const hs = handshake(decompose(f.bytes));
    const expect = (bytes: Uint8Array) => ({ ...f.expect, recordBytes: bytes.length });
    for (let cut = 1; cut < hs.length; cut += 7) {
      const two = records(hs, [cut]);
      assert.deepEqual(feed(two).hello, expect(two), `record split at ${cut}`);
    }
    for (const size of [1, 2, 3, 100, 1000]) {
      const many = records(hs, size, [3, 3]);
      assert.deepEqual(feed(many).hello, expect(many), `records of ${size}`);
      const p = new ClientHelloParser();
      let r: ClientHello | null = null;
      for (let i = 0; i < many.length; i++) r = p.push(many.subarray(i, i + 1));
      assert.deepEqual(r, expect(many));
    }
  }
});

Deno.test("record versions 3.0 to 3.4 are accepted; others are not TLS", () => {
  const hs = handshake(base());
  for (let minor = 0; minor <= 4; minor++) {
    const bytes = records(hs, 16384, [3, minor]);
    assert.equal((outcome(bytes) as ClientHello).serverName, "curl-h2.example.test");
  }
  assertKind(records(hs, 16384, [3, 5]), "not_tls");
  assertKind(records(hs, 16384, [2, 0]), "not_tls");
  assertKind(records(hs, [100], [3, 1]).map((b, i) => (i === 105 + 2 ? 9 : b)), "not_tls");
});

Deno.test("a record holding the hello and another handshake message: only the hello counts", () => {
  const hs = cat(handshake(base()), [20, 0, 0, 2, 1, 2]);
  const bytes = records(hs);
  const hello = outcome(bytes) as ClientHello;
  assert.equal(hello.serverName, "curl-h2.example.test");
  assert.equal(hello.recordBytes, bytes.length);
});

// ---- not a hello ----

Deno.test("alert and application data records are 'not_handshake', also after a first fragment", () => {
  assertKind(new Uint8Array([0x15, 3, 3, 0, 2, 2, 40]), "not_handshake");
  assertKind(new Uint8Array([0x17, 3, 3, 0, 3, 1, 2, 3]), "not_handshake");
  const hs = handshake(base());
  const first = records(hs.subarray(0, 50));
  assertKind(cat(first, [0x15, 3, 3, 0, 2, 2, 40]), "not_handshake");
  assertKind(cat(first, [0x17, 3, 3, 0, 1, 0]), "not_handshake");
  assertKind(cat(first, [0x47, 0x45, 0x54]), "not_tls");
});

Deno.test("HTTP and garbage are 'not_tls', other handshakes 'not_client_hello'", () => {
  assertKind(ascii("GET / HTTP/1.1\r\n\r\n"), "not_tls");
  assertKind(new Uint8Array([0]), "not_tls");
  // a server_hello (2) refused as soon as its type byte arrives
  assertKind(new Uint8Array([22, 3, 3, 0, 50, 2]), "not_client_hello");
});

// ---- SSLv2-compatible hellos (RFC 6101 E.1, RFC 5246 E.2) ----

/** TLS suites as v2 cipher specs (0x00XXYY), and one SSL 2.0 kind (RC4_128_WITH_MD5). */
const V2_SPECS = [[0, 0, 0x39], [0, 0, 0x2f], [0, 0, 0x35], [1, 0, 0x80], [0, 0, 0xff]];

/** An SSLv2-format CLIENT-HELLO with {@linkcode V2_SPECS} and a 16-byte challenge by default. */
function sslv2Hello(o: Parameters<typeof sslv2ClientHello>[0] = {}): Uint8Array {
  return sslv2ClientHello({ specs: V2_SPECS, challenge: 16, ...o });
}

Deno.test("an SSLv2-compatible hello is a hello without a name: no ALPN, its bytes counted, in any split", () => {
  const v2 = sslv2Hello();
  assert.equal(v2.length, 2 + 9 + 15 + 16);
  const expect: ClientHello = {
    serverName: null,
    alpn: [],
    earlyData: false,
    encryptedClientHello: false,
    recordBytes: v2.length,
  };
  assert.deepEqual(outcome(v2), expect);
  for (let cut = 1; cut < v2.length; cut++) {
    const { hello, parser } = feed(v2, [cut]);
    assert.deepEqual(hello, expect, `cut at ${cut}`);
    assert.deepEqual(parser.data, v2);
  }
  const p = new ClientHelloParser();
  for (let i = 0; i < v2.length - 1; i++) assert.equal(p.push(v2.subarray(i, i + 1)), null);
  assert.deepEqual(p.push(v2.subarray(v2.length - 1)), expect);
  // bytes after it are the client's next ones, not the hello's
  const after = cat(v2, [0x16, 3, 1]);
  assert.equal((outcome(after) as ClientHello).recordBytes, v2.length);
  // SSL 2.0 itself, SSL 3.0 and every TLS version, session ids of 0 or 16, challenges 16 to 32
  for (const version of [0x0002, 0x0300, 0x0301, 0x0302, 0x0303, 0x0304]) {
    const hello = outcome(sslv2Hello({ version })) as ClientHello;
    assert.equal(hello.serverName, null, `0x${version.toString(16)}`);
  }
  assert.equal(
    (outcome(sslv2Hello({ sessionId: 16, challenge: 32 })) as ClientHello).recordBytes,
    2 + 9 + 15 + 16 + 32,
  );
});

Deno.test("an SSLv2-compatible hello's fingerprints: JA4 without SNI, extensions or ALPN; JA3 of its TLS suites", async () => {
  const { createHash } = await import("node:crypto");
  const p = new ClientHelloParser(16384, true);
  const hello = p.push(sslv2Hello())!;
  // the SSL 2.0 spec (0x010080) has no TLS number and is left out: 4 ciphers
  const b = createHash("sha256").update("002f,0035,0039,00ff").digest("hex").slice(0, 12);
  assert.equal(hello.fingerprints!.ja4, `t10i040000_${b}_000000000000`);
  assert.equal(
    hello.fingerprints!.ja3,
    createHash("md5").update("769,57-47-53-255,,,").digest("hex"),
  );
  const s2 = new ClientHelloParser(16384, true).push(
    sslv2Hello({ version: 0x0002, specs: [[1, 0, 0x80], [7, 0, 0xc0]] }),
  )!;
  assert.equal(s2.fingerprints!.ja4, "ts2i000000_000000000000_000000000000");
});

Deno.test("an SSLv2-format message that is no CLIENT-HELLO, or of an unknown version, is 'not_tls'", () => {
  const v2 = sslv2Hello();
  const other = v2.slice();
  other[2] = 2;
  assertKind(other, "not_tls");
  // refused as soon as the type byte is in
  const p = new ClientHelloParser();
  assert.equal(p.push(other.subarray(0, 2)), null);
  assert.throws(
    () => p.push(other.subarray(2, 3)),
    (e) => (e as ClientHelloError).kind === "not_tls",
  );
  assertKind(sslv2Hello({ version: 0x0305 }), "not_tls");
  assertKind(sslv2Hello({ version: 0x0200 }), "not_tls");
  assertKind(new Uint8Array([0x80, 0x2e, 0x02, 0, 0]), "not_tls");
});

Deno.test("an SSLv2-compatible hello with lengths RFC 6101 does not allow is 'bad_length'", () => {
  assertKind(sslv2Hello({ specs: [] }), "bad_length");
  assertKind(sslv2Hello({ specs: [[0, 0x2f]] }), "bad_length");
  assertKind(sslv2Hello({ sessionId: 8 }), "bad_length");
  assertKind(sslv2Hello({ sessionId: 32 }), "bad_length");
  assertKind(sslv2Hello({ challenge: 15 }), "bad_length");
  assertKind(sslv2Hello({ challenge: 33 }), "bad_length");
  // the record length says one byte more, or one less, than the fields hold
  for (const delta of [1, -1]) {
    const v2 = sslv2Hello();
    const n = ((v2[0] & 0x7f) << 8 | v2[1]) + delta;
    v2[0] = 0x80 | (n >> 8);
    v2[1] = n & 255;
    assertKind(delta > 0 ? cat(v2, [0]) : v2.subarray(0, v2.length - 1), "bad_length");
  }
});

Deno.test("an SSLv2-compatible hello cut short is 'truncated'; one over max_client_hello_bytes 'too_large'", () => {
  const v2 = sslv2Hello();
  for (const n of [1, 2, 3, 10, 11, v2.length - 1]) assertKind(v2.subarray(0, n), "truncated");
  assertKind(v2, "too_large", v2.length - 1);
  assert.equal((outcome(v2, v2.length) as ClientHello).recordBytes, v2.length);
  // the largest a v2 length can say: 2^15-1 bytes after it (specs fill what the rest leaves)
  const specs = Array.from({ length: (32767 - 9 - 16) / 3 }, (_, i) => [0, i >> 8, i & 255]);
  const largest = sslv2Hello({ specs });
  assert.deepEqual([...largest.subarray(0, 2)], [0xff, 0xff]);
  assert.equal((outcome(largest, 32769) as ClientHello).recordBytes, 32769);
  // refused by its first three bytes, long before the rest comes
  const p = new ClientHelloParser();
  assert.equal(p.push(largest.subarray(0, 2)), null);
  assert.throws(
    () => p.push(largest.subarray(2, 3)),
    (e) => (e as ClientHelloError).kind === "too_large",
  );
});

Deno.test("a record of length 0 or over 2^14 is 'bad_length'", () => {
  assertKind(new Uint8Array([22, 3, 1, 0, 0]), "bad_length");
  assertKind(cat(records(handshake(base()).subarray(0, 10)), [22, 3, 1, 0, 0]), "bad_length");
  assertKind(new Uint8Array([22, 3, 1, 0x40, 0x01]), "bad_length");
});

// ---- size limits ----

Deno.test("a hello over 16 KiB (big padding extension) is 'too_large' as soon as a header says so", () => {
  const big = handshake(withExt(base(), 21, new Uint8Array(17000)));
  // in one record it breaks the 2^14 record limit; in one full record it is already too large
  assertKind(records(big, [big.length]), "bad_length");
  assertKind(records(big), "too_large");
  const bytes = records(big, 10000);
  assert.equal(bytes[5 + 10000], 22, "two records");
  assertKind(bytes, "too_large");
  // refused once the first record is in (its handshake header says 17343 bytes), long before
  // the second record's payload
  const p = new ClientHelloParser();
  assert.equal(p.push(bytes.subarray(0, 5 + 9999)), null);
  assert.throws(
    () => p.push(bytes.subarray(5 + 9999, 5 + 10000)),
    (e) => (e as ClientHelloError).kind === "too_large",
  );
  // 16370 handshake bytes fit, but not in 1000-byte records: 17 headers push it past 16384;
  // refused at the record header that crosses the limit
  const unpadded = handshake(withExt(base(), 21, null)).length;
  const tight = handshake(withExt(base(), 21, new Uint8Array(16370 - unpadded - 4)));
  assert.equal(tight.length, 16370);
  assert.equal((outcome(records(tight, 16370)) as ClientHello).recordBytes, 16375);
  const split = records(tight, 1000);
  const q = new ClientHelloParser();
  let thrown = -1;
  for (let i = 0; i < split.length && thrown < 0; i++) {
    try {
      q.push(split.subarray(i, i + 1));
    } catch (e) {
      assert.equal((e as ClientHelloError).kind, "too_large");
      thrown = i;
    }
  }
  assert.ok(thrown > 0 && thrown < 16384, `thrown at byte ${thrown} of ${split.length}`);
  // a handshake length that cannot fit is refused from the first record
  assertKind(records(big.subarray(0, 1000)), "too_large");
  // under the limit it parses
  const fits = records(handshake(withExt(base(), 21, new Uint8Array(15000))));
  assert.ok(fits.length <= 16384);
  assert.equal((outcome(fits) as ClientHello).serverName, "curl-h2.example.test");
});

Deno.test("a smaller maxBytes refuses Chromium's hello from its record header alone", () => {
  const pq = byFile("chromium_pq.bin").bytes;
  const p = new ClientHelloParser(1024);
  assert.throws(
    () => p.push(pq.subarray(0, 5)),
    (e) => (e as ClientHelloError).kind === "too_large",
  );
  assertKind(pq, "too_large", pq.length - 1);
  assert.equal((outcome(pq, pq.length) as ClientHello).serverName, "pq.example");
});

// ---- server names ----

Deno.test("server names are lower-cased without the trailing dot; bad ones are 'bad_server_name'", () => {
  const name = (n: string | Uint8Array) => outcome(helloWithSni(n));
  assert.equal((name("WWW.Example.COM.") as ClientHello).serverName, "www.example.com");
  assert.equal(
    (name("_acme-challenge.a-b.test") as ClientHello).serverName,
    "_acme-challenge.a-b.test",
  );
  assert.equal((name("localhost") as ClientHello).serverName, "localhost");
  const label63 = "a".repeat(63);
  const max253 = [label63, label63, label63, "a".repeat(61)].join(".");
  assert.equal(max253.length, 253);
  assert.equal((name(max253) as ClientHello).serverName, max253);
  assert.equal((name(max253 + ".") as ClientHello).serverName, max253);
  for (
    const bad of [
      "",
      ".",
      "a..b",
      ".a.b",
      "a.b..",
      "a b.test",
      "a/b.test",
      "a:443",
      "a\0.test",
      "caf\u00e9.test",
      max253 + "a",
      "a".repeat(64) + ".test",
    ]
  ) {
    assert.equal(name(ascii(bad)), "bad_server_name", JSON.stringify(bad));
  }
  assert.equal(name(new Uint8Array([0x61, 0xff])), "bad_server_name");
});

Deno.test("an SNI list without host_name, or with two, is 'bad_server_name'; an empty one 'bad_extension'", () => {
  const sni = (data: Uint8Array) => outcome(records(handshake(withExt(base(), 0, data))));
  assert.equal(sni(sniData([1, ascii("a.test")])), "bad_server_name");
  assert.equal(sni(sniData([0, ascii("a.test")], [0, ascii("b.test")])), "bad_server_name");
  assert.equal(
    (sni(sniData([7, ascii("x")], [0, ascii("a.test")])) as ClientHello).serverName,
    "a.test",
  );
  assert.equal(sni(new Uint8Array([0, 0])), "bad_extension");
  assert.equal(sni(new Uint8Array(0)), "bad_extension");
});

Deno.test("a repeated extension is refused in every parse, over many parses in a row", () => {
  // the parser's table of seen extensions is shared by all parses: none may see another's
  const twice = base();
  twice.exts.push(twice.exts[0]);
  const bad = records(handshake(twice));
  const good = records(handshake(base()));
  for (let i = 0; i < 600; i++) {
    assertKind(bad, "bad_extension");
    assert.equal(typeof outcome(good), "object", `parse ${i}`);
  }
});

Deno.test("ALPN, early_data and ECH extensions are read and checked", () => {
  const ext = (type: number, data: Uint8Array) =>
    outcome(records(handshake(withExt(base(), type, data))));
  const alpn = (...names: string[]) => {
    const list = cat(...names.map((n) => cat([n.length], ascii(n))));
    return cat(u16(list.length), list);
  };
  assert.deepEqual((ext(16, alpn("h3", "h2", "http/1.1")) as ClientHello).alpn, [
    "h3",
    "h2",
    "http/1.1",
  ]);
  assert.equal(ext(16, alpn("h2", "")), "bad_extension");
  assert.equal(ext(16, new Uint8Array([0, 0])), "bad_extension");
  assert.equal(ext(16, new Uint8Array([0, 3, 2, 0x68])), "bad_extension");
  assert.equal((ext(42, new Uint8Array(0)) as ClientHello).earlyData, true);
  assert.equal(ext(42, new Uint8Array(1)), "bad_extension");
  assert.equal((ext(0xfe0d, new Uint8Array([0, 0, 1])) as ClientHello).encryptedClientHello, true);
  assert.equal(ext(0xfe0d, new Uint8Array(0)), "bad_extension");
  const twice = base();
  twice.exts.push(twice.exts[0]);
  assertKind(records(handshake(twice)), "bad_extension");
  // a hello without any extensions (allowed before TLS 1.3)
  const bare = cat([1, 0, 0, base().head.length], base().head);
  assert.deepEqual(outcome(records(bare)), {
    serverName: null,
    alpn: [],
    earlyData: false,
    encryptedClientHello: false,
    recordBytes: bare.length + 5,
  });
});

// ---- lying lengths ----

interface Field {
  name: string;
  off: number;
  size: 1 | 2 | 3;
}

/** Every length field of a single-record hello, found by walking it. */
function lengthFields(b: Uint8Array): Field[] {
  const u = (o: number, n: number) =>
    n === 1 ? b[o] : n === 2 ? (b[o] << 8) | b[o + 1] : (b[o] << 16) | (b[o + 1] << 8) | b[o + 2];
  const fields: Field[] = [{ name: "record", off: 3, size: 2 }, {
    name: "handshake",
    off: 6,
    size: 3,
  }];
  let p = 9 + 34;
  fields.push({ name: "session_id", off: p, size: 1 });
  p += 1 + b[p];
  fields.push({ name: "cipher_suites", off: p, size: 2 });
  p += 2 + u(p, 2);
  fields.push({ name: "compression", off: p, size: 1 });
  p += 1 + b[p];
  fields.push({ name: "extensions", off: p, size: 2 });
  const end = p + 2 + u(p, 2);
  p += 2;
  while (p < end) {
    const type = u(p, 2);
    const len = u(p + 2, 2);
    fields.push({ name: `extension ${type}`, off: p + 2, size: 2 });
    if (type === 0) {
      fields.push({ name: "server_name list", off: p + 4, size: 2 });
      fields.push({ name: "server_name", off: p + 7, size: 2 });
    }
    if (type === 16) {
      fields.push({ name: "ALPN list", off: p + 4, size: 2 });
      for (let q = p + 6; q < p + 4 + len; q += 1 + b[q]) {
        fields.push({ name: `ALPN name at ${q}`, off: q, size: 1 });
      }
    }
    p += 4 + len;
  }
  return fields;
}

Deno.test("every length field made to lie (bigger, smaller, 0, max) ends in a ClientHelloError", () => {
  for (const file of ["curl_http2.bin", "chromium_pq.bin", "openssl_tls12.bin"]) {
    const good = byFile(file).bytes;
    const fields = lengthFields(good);
    assert.ok(fields.length > 15, `${file}: ${fields.length} fields`);
    for (const f of fields) {
      const orig = f.size === 1
        ? good[f.off]
        : f.size === 2
        ? (good[f.off] << 8) | good[f.off + 1]
        : (good[f.off] << 16) | (good[f.off + 1] << 8) | good[f.off + 2];
      const maxV = 2 ** (8 * f.size) - 1;
      for (const v of new Set([orig + 1, orig - 1, 0, maxV, orig + 300])) {
        if (v < 0 || v > maxV || v === orig) continue;
        const bad = good.slice();
        for (let i = 0; i < f.size; i++) bad[f.off + i] = (v >> (8 * (f.size - 1 - i))) & 255;
        const r = outcome(bad);
        assert.equal(
          typeof r,
          "string",
          `${file}: ${f.name} ${orig} -> ${v} parsed: ${JSON.stringify(r)}`,
        );
        if (f.name !== "record" && f.name !== "handshake") {
          assert.ok(
            ["bad_length", "bad_extension", "bad_server_name"].includes(r as string),
            `${file}: ${f.name} ${orig} -> ${v}: ${r}`,
          );
        }
        if (v > orig && (f.name === "record" || f.name === "handshake")) {
          // more bytes announced than sent: it waits, then EOF, or it cannot fit / be a record
          assert.ok(
            ["truncated", "too_large", "bad_length"].includes(r as string),
            `${f.name}: ${r}`,
          );
        }
      }
    }
  }
});

// ---- fuzz ----

/** mulberry32: a small seeded PRNG so a failure can be replayed. */
function prng(seed: number) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

Deno.test("random mutations of real hellos (and an SSLv2-compatible one), fed in random pieces, only ever throw ClientHelloError", () => {
  const seed = Number(Deno.env.get("FUZZ_SEED") ?? 20261125);
  const rand = prng(seed);
  const int = (n: number) => Math.floor(rand() * n);
  const kinds = new Map<string, number>();
  const sources = [...fixtures.map((f) => f.bytes), sslv2Hello()];
  for (let round = 0; round < 4000; round++) {
    const src = sources[round % sources.length];
    let b = src.slice();
    const edits = 1 + int(4);
    for (let e = 0; e < edits; e++) {
      const at = int(b.length);
      switch (int(5)) {
        case 0:
          b[at] ^= 1 << int(8);
          break;
        case 1:
          b[at] = int(256);
          break;
        case 2: // delete a run
          b = cat(b.subarray(0, at), b.subarray(Math.min(b.length, at + 1 + int(8))));
          break;
        case 3: // insert random bytes
          b = cat(
            b.subarray(0, at),
            Array.from({ length: 1 + int(8) }, () => int(256)),
            b.subarray(at),
          );
          break;
        default: // truncate
          b = b.subarray(0, at);
      }
    }
    // every other round also computes the fingerprints, which walk what the parser checked
    const p = new ClientHelloParser(int(4) === 0 ? 1 + int(3000) : undefined, round % 2 === 0);
    let outcomeKind = "null";
    let from = 0;
    try {
      let r: ClientHello | null = null;
      while (from < b.length) {
        const to = Math.min(b.length, from + 1 + int(600));
        const chunk = b.subarray(from, to);
        from = to;
        r = p.push(chunk);
      }
      r = p.end();
      outcomeKind = "hello";
      assert.ok(r.recordBytes <= b.length);
      assert.ok(r.serverName === null || /^[a-z0-9_-]+(\.[a-z0-9_-]+)*$/.test(r.serverName));
      if (round % 2 === 0) {
        assert.match(r.fingerprints!.ja4, /^t[0-9s]{2}[di]\d{4}\w{2}_\w{12}_\w{12}$/);
      }
    } catch (e) {
      if (!(e instanceof ClientHelloError)) {
        throw new Error(`seed ${seed} round ${round}: ${e}`, { cause: e });
      }
      outcomeKind = e.kind;
    }
    assert.deepEqual(p.data, b.subarray(0, from), `seed ${seed} round ${round}: data`);
    kinds.set(outcomeKind, (kinds.get(outcomeKind) ?? 0) + 1);
  }
  // the loop reached deep into the parser, not just the record header
  for (const k of ["hello", "bad_length", "bad_extension", "truncated", "not_tls"]) {
    assert.ok((kinds.get(k) ?? 0) > 0, `no ${k} in ${JSON.stringify([...kinds])}`);
  }
});

Deno.test("after an error every later push and end() throw the same error", () => {
  const p = new ClientHelloParser();
  let first: unknown;
  try {
    p.push(new Uint8Array([0x15, 3, 3, 0, 2]));
  } catch (e) {
    first = e;
  }
  assert.ok(first instanceof ClientHelloError);
  assert.throws(() => p.push(handshake(base())), (e) => e === first);
  assert.throws(() => p.end(), (e) => e === first);
});
