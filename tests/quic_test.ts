/**
 * The QUIC Initial reader: the RFC 9001 and RFC 9369 Appendix A vectors (keys, header
 * protection, the whole client Initial), the first flights of real clients captured by
 * tests/fixtures/capture_quic.ts (ngtcp2's gtlsclient, Chromium's post-quantum hello over two
 * Initials, in every order), and Initials built by tests/harness/quic_initial.ts: coalesced,
 * reordered, repeated, overlapping, cut, flipped, oversized, with frames an Initial may not
 * carry; Retry and Version Negotiation classified; a mutation loop that never throws.
 */
import assert from "node:assert/strict";
import { ClientHelloParser } from "../src/proto/clienthello.ts";
import {
  classifyDatagram,
  longHeaderIds,
  QUIC_V1,
  QUIC_V2,
  QuicInitialReader,
  type QuicReadResult,
} from "../src/proto/quic.ts";
import { initialKeys, InitialOpener } from "../src/proto/quic_crypto.ts";
import {
  concatBytes,
  cryptoFrame,
  cryptoPieces,
  fromHex,
  handshakeOfRecords,
  type PacketSpec,
  protectPacket,
  readDatagrams,
  toHex,
  varint,
} from "./harness/quic_initial.ts";
import {
  captureFirstFlight,
  chromiumFirstFlight,
  haveCommand,
  startGtlsclient,
} from "./harness/quic_clients.ts";

const dir = new URL("./fixtures/quic/", import.meta.url);
const rfc = JSON.parse(Deno.readTextFileSync(new URL("rfc_vectors.json", dir)));
const manifest = JSON.parse(Deno.readTextFileSync(new URL("manifest.json", dir))) as {
  clients: { file: string; client: string; expect: { serverName: string; alpn: string[] } }[];
};
const flights = Object.fromEntries(
  manifest.clients.map((c) => [c.file, readDatagrams(Deno.readFileSync(new URL(c.file, dir)))]),
);
const expectOf = (file: string) => manifest.clients.find((c) => c.file === file)!.expect;

/** Chromium's post-quantum TLS hello (1.9 KB) from the TCP fixtures, as a handshake message. */
const pqHello = handshakeOfRecords(
  Deno.readFileSync(new URL("./fixtures/hellos/chromium_pq.bin", import.meta.url)),
);
/** The RFC 9001 A.2 hello (example.com, ALPN "alpn"), from its CRYPTO frame. */
const rfcHello = fromHex(rfc.cryptoFrame).subarray(4);

const DCID = fromHex("8394c8f03e515708");
const SCID = fromHex("c0ffee00");

function reader(maxBytes = 16384, extra: { maxPackets?: number; maxPieces?: number } = {}) {
  return new QuicInitialReader({ maxBytes, fingerprint: true, ...extra });
}

function pushAll(r: QuicInitialReader, datagrams: Uint8Array[]): QuicReadResult {
  let res: QuicReadResult = { kind: "more" };
  for (const d of datagrams) res = r.push(d);
  return res;
}

function helloOf(res: QuicReadResult) {
  assert.equal(res.kind, "hello", JSON.stringify(res));
  return res as Extract<QuicReadResult, { kind: "hello" }>;
}

function badOf(res: QuicReadResult, reason: string, final?: boolean) {
  assert.equal(res.kind, "bad", JSON.stringify(res));
  const b = res as Extract<QuicReadResult, { kind: "bad" }>;
  assert.equal(b.reason, reason, b.message);
  if (final !== undefined) assert.equal(b.final, final, `final for ${b.reason}: ${b.message}`);
  return b;
}

/** One datagram of one padded Initial carrying `frames`. */
function initial(frames: Uint8Array, over: Partial<PacketSpec> = {}): Uint8Array {
  return protectPacket({ dcid: DCID, scid: SCID, pn: 0, frames, size: 1200, ...over });
}

/** `hello` over `n` Initials (one CRYPTO frame each), each in its own 1200-byte datagram. */
function helloInitials(hello: Uint8Array, n: number, over: Partial<PacketSpec> = {}) {
  const piece = Math.ceil(hello.length / n);
  return cryptoPieces(hello, piece).map(([off, data], i) =>
    initial(cryptoFrame(off, data), { pn: i, ...over })
  );
}

/** Every ordering of `xs`. */
function permutations<T>(xs: T[]): T[][] {
  if (xs.length <= 1) return [xs];
  return xs.flatMap((x, i) =>
    permutations([...xs.slice(0, i), ...xs.slice(i + 1)]).map((p) => [x, ...p])
  );
}

for (const ver of ["v1", "v2"] as const) {
  const version = ver === "v1" ? QUIC_V1 : QUIC_V2;
  const v = rfc[ver];
  const name = ver === "v1" ? "RFC 9001" : "RFC 9369";

  Deno.test(`${name} A.1: client and server Initial keys of QUIC ${ver}`, () => {
    for (const side of ["client", "server"] as const) {
      const k = initialKeys(version, DCID, side);
      assert.equal(toHex(k.secret), v[`${side}Secret`]);
      assert.equal(toHex(k.key), v[`${side}Key`]);
      assert.equal(toHex(k.iv), v[`${side}Iv`]);
      assert.equal(toHex(k.hp), v[`${side}Hp`]);
    }
  });

  Deno.test(`${name} A.2: the header-protection mask of the client Initial's sample (${ver})`, () => {
    const mask = new InitialOpener(version, DCID).mask(fromHex(v.sample));
    assert.equal(toHex(mask.subarray(0, 5)), v.mask);
  });

  Deno.test(`${name} A.2: the client Initial decrypts to its CRYPTO frame and hello (${ver})`, () => {
    const packet = fromHex(v.packet);
    const before = packet.slice();
    const opened = new InitialOpener(version, DCID).open(packet, 0, 18, packet.length, -1);
    assert.ok(opened, "the RFC packet authenticates");
    assert.equal(opened.pn, rfc.packetNumber);
    assert.equal(opened.firstByte, fromHex(v.unprotectedHeader)[0]);
    const frame = fromHex(rfc.cryptoFrame);
    assert.equal(toHex(opened.payload.subarray(0, frame.length)), rfc.cryptoFrame);
    assert.equal(opened.payload.length, frame.length + rfc.paddingAfterFrame);
    assert.ok(opened.payload.subarray(frame.length).every((b) => b === 0), "PADDING after it");
    assert.deepEqual(packet, before, "the packet is not modified");

    assert.equal(classifyDatagram(packet), "initial");
    const got = helloOf(reader().push(packet));
    assert.equal(got.version, version);
    assert.equal(toHex(got.dcid), rfc.dcid);
    assert.equal(got.scid.length, 0);
    assert.equal(got.hello.serverName, "example.com");
    assert.deepEqual(got.hello.alpn, ["alpn"]);
    assert.match(got.hello.fingerprints!.ja4, /^q13d/);
  });

  Deno.test(`the test encryptor rebuilds the ${name} A.2 packet byte for byte (${ver})`, () => {
    const built = protectPacket({
      version,
      dcid: DCID,
      pn: rfc.packetNumber,
      pnLen: 4,
      frames: fromHex(rfc.cryptoFrame),
      size: 1200,
    });
    assert.equal(toHex(built), v.packet);
  });
}

Deno.test("gtlsclient's first Initial gives its server name, ALPN h3 and a q JA4", () => {
  const flight = flights["gtlsclient.bin"];
  const before = flight.map((d) => d.slice());
  const got = helloOf(pushAll(reader(), flight));
  assert.equal(got.hello.serverName, expectOf("gtlsclient.bin").serverName);
  assert.deepEqual(got.hello.alpn, ["h3"]);
  assert.equal(got.version, QUIC_V1);
  assert.match(got.hello.fingerprints!.ja4, /^q13d\d{4}h3_[0-9a-f]{12}_[0-9a-f]{12}$/);
  assert.deepEqual(got.dcid, longHeaderIds(flight[0])!.dcid);
  assert.deepEqual(got.scid, longHeaderIds(flight[0])!.scid);
  assert.deepEqual(flight, before, "the datagrams are not modified");
});

Deno.test({
  name: "a gtlsclient started now: its first datagram gives localhost and h3",
  ignore: !(await haveCommand("gtlsclient")),
  async fn() {
    const flight = await captureFirstFlight(startGtlsclient, { quietMs: 200, maxDatagrams: 2 });
    const got = helloOf(reader().push(flight[0]));
    assert.equal(got.hello.serverName, "localhost");
    assert.deepEqual(got.hello.alpn, ["h3"]);
    assert.match(got.hello.fingerprints!.ja4, /^q13d/);
  },
});

Deno.test({
  name: "a headless Chromium started now: its hello is read from its first flight",
  ignore: !(await haveCommand("chromium")),
  async fn() {
    const flight = await chromiumFirstFlight("live.example.test", { firstWithinMs: 20_000 });
    const r = reader();
    const results = flight.map((d) => r.push(d));
    const first = results.findIndex((x) => x.kind === "hello");
    assert.ok(
      first >= 1,
      `the hello needs two datagrams (results ${JSON.stringify(results.map((x) => x.kind))})`,
    );
    const got = helloOf(results[first]);
    assert.equal(got.hello.serverName, "live.example.test");
    assert.deepEqual(got.hello.alpn, ["h3"]);
    assert.equal(got.hello.fingerprints!.ja4[0], "q");
  },
});

Deno.test("Chromium's post-quantum hello needs both of its first two Initials", () => {
  const [first, second] = flights["chromium.bin"];
  assert.equal(reader().push(first).kind, "more");
  assert.equal(reader().push(second).kind, "more");
  const got = helloOf(pushAll(reader(), [first, second]));
  assert.equal(got.hello.serverName, expectOf("chromium.bin").serverName);
  assert.deepEqual(got.hello.alpn, ["h3"]);
  assert.ok(got.hello.recordBytes > 1500, `a post-quantum hello (${got.hello.recordBytes} B)`);
  assert.match(got.hello.fingerprints!.ja4, /^q13d\d{4}h3_/);
});

Deno.test("Chromium's first flight gives the same hello in every order of its datagrams", () => {
  const flight = flights["chromium.bin"];
  const want = helloOf(pushAll(reader(), flight)).hello;
  for (const order of permutations(flight)) {
    const r = reader();
    const results = order.map((d) => r.push(d));
    const got = helloOf(results.at(-1)!);
    assert.deepEqual(got.hello, want);
    // "more" until the hello, then the hello again
    const firstHello = results.findIndex((x) => x.kind === "hello");
    assert.ok(results.slice(0, firstHello).every((x) => x.kind === "more"));
  }
});

Deno.test("a QUIC hello's JA4 is the TCP JA4 of the same hello with q for t", () => {
  const quic = helloOf(pushAll(reader(), flights["chromium.bin"]));
  const r = new QuicInitialReader({ maxBytes: 16384, fingerprint: true });
  const packets = helloInitials(pqHello, 2);
  const built = helloOf(pushAll(r, packets)).hello.fingerprints!.ja4;
  const tcp = new ClientHelloParser(16384, true).push(
    handshakeRecord(pqHello),
  )!.fingerprints!.ja4;
  assert.equal(tcp[0], "t");
  assert.equal(built, `q${tcp.slice(1)}`);
  assert.equal(quic.hello.fingerprints!.ja4[0], "q");
});

/** A handshake message in one TLS record. */
function handshakeRecord(message: Uint8Array): Uint8Array {
  return concatBytes(
    Uint8Array.of(22, 3, 1, message.length >> 8, message.length & 0xff),
    message,
  );
}

Deno.test("a hello over two Initials in two datagrams, in order and reversed", () => {
  for (const version of [QUIC_V1, QUIC_V2]) {
    const [a, b] = helloInitials(pqHello, 2, { version });
    for (const order of [[a, b], [b, a]]) {
      const r = reader();
      assert.equal(r.push(order[0]).kind, "more");
      const got = helloOf(r.push(order[1]));
      assert.equal(got.hello.serverName, "pq.example");
      assert.equal(got.version, version);
      assert.deepEqual(got.scid, SCID);
      assert.equal(r.packets, 2);
    }
  }
});

Deno.test("coalesced Initials in one datagram give the hello at once", () => {
  const pieces = cryptoPieces(pqHello, 1000);
  const p0 = protectPacket({ dcid: DCID, pn: 0, frames: cryptoFrame(...pieces[0]) });
  const p1 = protectPacket({ dcid: DCID, pn: 1, frames: cryptoFrame(...pieces[1]), size: 1100 });
  const got = helloOf(reader().push(concatBytes(p1, p0)));
  assert.equal(got.hello.serverName, "pq.example");
});

Deno.test("a coalesced 0-RTT packet, one of another connection and trailing padding are left out", () => {
  const hello = protectPacket({ dcid: DCID, pn: 0, frames: cryptoFrame(0, rfcHello) });
  const zeroRtt = protectPacket({
    dcid: DCID,
    pn: 0,
    type: "zero_rtt",
    frames: new Uint8Array(40),
  });
  const other = protectPacket({
    dcid: fromHex("0102030405060708"),
    pn: 0,
    frames: Uint8Array.of(1),
  });
  const padding = new Uint8Array(1200);
  for (
    const parts of [[hello, zeroRtt], [hello, other], [hello, padding], [hello, zeroRtt, other]]
  ) {
    const got = helloOf(reader().push(concatBytes(...parts, new Uint8Array(1200))));
    assert.equal(got.hello.serverName, "example.com");
  }
  // a short-header packet after the Initial is the rest of the datagram
  const short = concatBytes(Uint8Array.of(0x40), DCID, new Uint8Array(1000));
  assert.equal(helloOf(reader().push(concatBytes(hello, short))).hello.serverName, "example.com");
});

Deno.test("CRYPTO pieces out of order, repeated and overlapping give the same hello", () => {
  const want = helloOf(reader().push(initial(cryptoFrame(0, pqHello)))).hello;
  // 97-byte pieces, written backwards, each also sent again shifted by 40 bytes over the next
  const pieces = cryptoPieces(pqHello, 97).reverse();
  const frames = pieces.flatMap(([off, data]) => {
    const shifted = pqHello.subarray(off + 40, Math.min(pqHello.length, off + 40 + 97));
    return [cryptoFrame(off, data), cryptoFrame(off + 40, shifted)];
  });
  const half = frames.length / 2;
  const a = initial(concatBytes(...frames.slice(0, half)), { pn: 0 });
  const b = initial(concatBytes(...frames.slice(half)), { pn: 1 });
  for (const order of [[a, b], [b, a], [a, a, b], [b, b, a, a]]) {
    const r = reader();
    assert.deepEqual(helloOf(pushAll(r, order)).hello, want);
  }
});

Deno.test("the first copy of repeated CRYPTO data is kept", () => {
  const bogus = pqHello.slice(0, 200).fill(0x41);
  const r = reader();
  assert.equal(r.push(initial(cryptoFrame(0, pqHello.subarray(0, 200)))).kind, "more");
  const got = helloOf(
    r.push(
      initial(concatBytes(cryptoFrame(0, bogus), cryptoFrame(200, pqHello.subarray(200))), {
        pn: 1,
      }),
    ),
  );
  assert.equal(got.hello.serverName, "pq.example");
});

Deno.test("an Initial with a token (after a Retry or NEW_TOKEN) is read", () => {
  const token = new Uint8Array(120).fill(0x5a);
  const got = helloOf(reader().push(initial(cryptoFrame(0, rfcHello), { token })));
  assert.equal(got.hello.serverName, "example.com");
});

Deno.test("packet numbers of 1 to 4 bytes decode against the largest one seen", () => {
  for (const [pn, pnLen] of [[0, 1], [200, 2], [70000, 3], [0x1234567, 4]] as const) {
    const got = helloOf(reader().push(initial(cryptoFrame(0, rfcHello), { pn, pnLen })));
    assert.equal(got.hello.serverName, "example.com", `pn ${pn} in ${pnLen} bytes`);
  }
  // 0x1ff then 0x200 sent as its low byte 0x00: the nonce holds the full number, so a wrong
  // decoding would not authenticate
  const first = initial(cryptoFrame(0, pqHello.subarray(0, 1000)), { pn: 0x1ff, pnLen: 2 });
  const second = initial(cryptoFrame(1000, pqHello.subarray(1000)), { pn: 0x200, pnLen: 1 });
  const r = reader();
  assert.equal(r.push(first).kind, "more");
  assert.equal(helloOf(r.push(second)).hello.serverName, "pq.example");
});

Deno.test("ACK, ACK with ECN counts, PING and PADDING frames are skipped", () => {
  const ack = concatBytes(
    Uint8Array.of(0x02),
    varint(5),
    varint(100),
    varint(2),
    varint(1),
    varint(0),
    varint(1),
    varint(0),
    varint(0),
  );
  const ackEcn = concatBytes(
    Uint8Array.of(0x03),
    varint(5),
    varint(0),
    varint(0),
    varint(3),
    varint(1),
    varint(2),
    varint(300),
  );
  const frames = concatBytes(
    Uint8Array.of(0x01),
    ack,
    new Uint8Array(7),
    ackEcn,
    cryptoFrame(0, rfcHello),
  );
  assert.equal(helloOf(reader().push(initial(frames))).hello.serverName, "example.com");
});

Deno.test("cut datagrams: a header or a Length past the end is truncated", () => {
  const good = initial(cryptoFrame(0, rfcHello));
  for (const n of [7, 12, 16]) badOf(reader().push(good.subarray(0, n)), "truncated", false);
  // the Length says 1182 bytes follow; 1199 bytes of datagram cannot hold them
  badOf(reader().push(good.subarray(0, good.length - 1)), "truncated", false);
});

Deno.test("garbage, short headers and unknown versions are not Initials", () => {
  const good = initial(cryptoFrame(0, rfcHello));
  badOf(reader().push(new Uint8Array(0)), "not_initial", false);
  badOf(reader().push(new Uint8Array(1300).fill(0x17)), "not_initial", false);
  const fixedBitClear = good.slice();
  fixedBitClear[0] &= ~0x40;
  badOf(reader().push(fixedBitClear), "not_initial", false);
  assert.equal(classifyDatagram(fixedBitClear), "garbage");
  const draft29 = good.slice();
  draft29.set([0xff, 0, 0, 29], 1);
  badOf(reader().push(draft29), "wrong_version", false);
  assert.equal(classifyDatagram(draft29), "unknown_version");
  assert.equal(classifyDatagram(new Uint8Array(0)), "garbage");
  assert.equal(classifyDatagram(Uint8Array.of(0xc0, 0, 0, 0, 1)), "garbage");
  assert.equal(
    classifyDatagram(concatBytes(Uint8Array.of(0x41), DCID, new Uint8Array(30))),
    "short",
  );
});

Deno.test("a flipped byte makes the datagram undecryptable, and the flow still reads the good one", () => {
  const good = initial(cryptoFrame(0, rfcHello));
  for (const at of [40, 600, good.length - 1]) {
    const flipped = good.slice();
    flipped[at] ^= 0x01;
    const r = reader();
    badOf(r.push(flipped), "undecryptable", false);
    assert.equal(helloOf(r.push(good)).hello.serverName, "example.com");
  }
});

Deno.test("an Initial in a datagram under 1200 bytes is refused", () => {
  const small = protectPacket({ dcid: DCID, pn: 0, frames: cryptoFrame(0, rfcHello), size: 1199 });
  const r = reader();
  badOf(r.push(small), "small_datagram", false);
  assert.equal(r.packets, 0);
});

Deno.test("an Initial of another connection does not join the flow", () => {
  const [a, b] = helloInitials(pqHello, 2);
  const r = reader();
  assert.equal(r.push(a).kind, "more");
  badOf(
    r.push(helloInitials(pqHello, 2, { dcid: fromHex("0102030405060708") })[1]),
    "other_connection",
    false,
  );
  badOf(r.push(helloInitials(pqHello, 2, { version: QUIC_V2 })[1]), "other_connection", false);
  assert.equal(helloOf(r.push(b)).hello.serverName, "pq.example");
});

Deno.test("limits: bytes, packets and pieces past the bound are too_large", () => {
  // a hello longer than maxBytes: refused on its length field, before the rest arrives
  const [a] = helloInitials(pqHello, 2);
  badOf(reader(1024).push(a), "too_large", true);
  // CRYPTO data past maxBytes
  badOf(reader(1024).push(initial(cryptoFrame(1000, new Uint8Array(100)))), "too_large", true);
  // the hello fits exactly
  helloOf(pushAll(reader(pqHello.length), helloInitials(pqHello, 2)));
  badOf(pushAll(reader(pqHello.length - 1), helloInitials(pqHello, 2)), "too_large", true);
  // more Initials than maxPackets
  const six = helloInitials(pqHello, 6);
  helloOf(pushAll(reader(16384, { maxPackets: 6 }), six));
  const r = reader(16384, { maxPackets: 5 });
  const results = six.map((d) => r.push(d));
  badOf(results[5], "too_large", true);
  // more separate pieces than maxPieces: every other 10-byte piece, 12 gaps
  const pieces = cryptoPieces(pqHello, 10).filter((_, i) => i % 2 === 1 && i < 24);
  const sparse = initial(concatBytes(...pieces.map(([o, d]) => cryptoFrame(o, d))));
  assert.equal(reader(16384, { maxPieces: 12 }).push(sparse).kind, "more");
  badOf(reader(16384, { maxPieces: 11 }).push(sparse), "too_large", true);
  // a final result stays
  const done = reader(1024);
  done.push(a);
  badOf(done.push(helloInitials(pqHello, 2)[1]), "too_large", true);
});

Deno.test("frames an Initial may not carry, or cut frames, are bad_frame", () => {
  const cases: [string, Uint8Array][] = [
    ["STREAM", concatBytes(Uint8Array.of(0x08, 0, 2, 0x68, 0x69))],
    ["application CONNECTION_CLOSE", Uint8Array.of(0x1d, 0, 0)],
    ["HANDSHAKE_DONE", Uint8Array.of(0x1e)],
    ["cut ACK", Uint8Array.of(0x02, 5, 0)],
    [
      "ACK ranges past the end",
      concatBytes(Uint8Array.of(0x02, 5, 0), varint(1000), Uint8Array.of(0)),
    ],
    ["CRYPTO past the end", concatBytes(Uint8Array.of(0x06, 0), varint(2000), rfcHello)],
  ];
  for (const [what, frames] of cases) {
    // no PADDING after the frames (it would complete a cut one); a 4-byte packet number leaves
    // room for the header-protection sample however short the frames are
    const packet = protectPacket({ dcid: DCID, pn: 0, pnLen: 4, frames });
    const d = concatBytes(packet, new Uint8Array(1200));
    const bad = badOf(reader().push(d), "bad_frame", true);
    assert.ok(bad.message.length > 0, what);
  }
  const reserved = initial(cryptoFrame(0, rfcHello), { reservedBits: 1 });
  badOf(reader().push(reserved), "bad_frame", true);
});

Deno.test("a client's CONNECTION_CLOSE ends the read", () => {
  const close = concatBytes(
    Uint8Array.of(0x1c),
    varint(0x0a),
    varint(0),
    varint(3),
    new TextEncoder().encode("bye"),
  );
  const bad = badOf(reader().push(initial(close)), "closed", true);
  assert.match(bad.message, /bye/);
});

Deno.test("a CRYPTO stream that is not a valid ClientHello is bad_hello", () => {
  const serverHello = rfcHello.slice();
  serverHello[0] = 2;
  badOf(reader().push(initial(cryptoFrame(0, serverHello))), "bad_hello", true);
  // the SNI host_name bytes of the RFC hello made illegal
  const badName = rfcHello.slice();
  const at = toHex(badName).indexOf(toHex(new TextEncoder().encode("example"))) / 2;
  badName[at] = 0x20;
  const bad = badOf(reader().push(initial(cryptoFrame(0, badName))), "bad_hello", true);
  assert.match(bad.message, /bad_server_name/);
  // a length field that lies
  const lying = rfcHello.slice();
  lying[3] -= 10;
  badOf(reader().push(initial(cryptoFrame(0, lying))), "bad_hello", true);
});

Deno.test("Retry, Version Negotiation and Handshake packets are classified, not read", () => {
  const serverCid = fromHex("f067a5502a4262b5");
  for (const [version, typeBits] of [[QUIC_V1, 3], [QUIC_V2, 0]]) {
    const retry = concatBytes(
      Uint8Array.of(
        0xc0 | (typeBits << 4),
        version >>> 24,
        (version >> 16) & 0xff,
        (version >> 8) & 0xff,
        version & 0xff,
      ),
      Uint8Array.of(0),
      Uint8Array.of(serverCid.length),
      serverCid,
      new TextEncoder().encode("token"),
      new Uint8Array(16),
    );
    assert.equal(classifyDatagram(retry), "retry");
    badOf(reader().push(retry), "not_initial", false);
    assert.deepEqual(longHeaderIds(retry)?.scid, serverCid);
  }
  const vn = concatBytes(
    Uint8Array.of(0x80 | 0x2a, 0, 0, 0, 0, DCID.length),
    DCID,
    Uint8Array.of(serverCid.length),
    serverCid,
    Uint8Array.of(0, 0, 0, 1, 0x6b, 0x33, 0x43, 0xcf),
  );
  assert.equal(classifyDatagram(vn), "version_negotiation");
  badOf(reader().push(vn), "not_initial", false);
  assert.deepEqual(longHeaderIds(vn), { version: 0, dcid: DCID, scid: serverCid });
  const handshake = protectPacket({
    dcid: DCID,
    pn: 0,
    type: "handshake",
    frames: new Uint8Array(30),
  });
  assert.equal(classifyDatagram(handshake), "other_long");
  badOf(reader().push(handshake), "not_initial", false);
  assert.equal(longHeaderIds(Uint8Array.of(0x40, 1, 2, 3, 4, 5, 6, 7)), null);
});

Deno.test("the reader keeps no view of a pushed datagram: its buffer may be reused", () => {
  const buf = new Uint8Array(1500);
  const [a, b] = helloInitials(pqHello, 2);
  const r = reader();
  buf.set(a);
  assert.equal(r.push(buf.subarray(0, a.length)).kind, "more");
  buf.fill(0xee);
  buf.set(b);
  const got = helloOf(r.push(buf.subarray(0, b.length)));
  buf.fill(0);
  assert.equal(got.hello.serverName, "pq.example");
  assert.deepEqual(got.dcid, DCID);
  assert.deepEqual(got.scid, SCID);
});

Deno.test("mutated real datagrams never throw and give a known result", () => {
  let seed = 19;
  const rand = (n: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  const all = [...flights["gtlsclient.bin"], ...flights["chromium.bin"]];
  const kinds = new Set<string>();
  for (let i = 0; i < 400; i++) {
    const d = all[rand(all.length)].slice();
    // flip header bytes mostly: that is where the parsing is
    for (let j = rand(3) + 1; j > 0; j--) d[rand(2) ? rand(40) : rand(d.length)] ^= 1 << rand(8);
    const cut = rand(4) === 0 ? d.subarray(0, rand(d.length)) : d;
    const res = reader().push(cut);
    kinds.add(res.kind === "bad" ? res.reason : res.kind);
    classifyDatagram(cut);
    longHeaderIds(cut);
  }
  assert.ok(kinds.has("undecryptable") && kinds.has("truncated"), [...kinds].join(","));
});
