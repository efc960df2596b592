/**
 * JA4 and JA3 of the real hellos in tests/fixtures/hellos (curl, openssl, Deno, Node,
 * Chromium), checked against values this file computes on its own from the published
 * algorithms (its own hello walk, WebCrypto's SHA-256), against published Chrome values, and
 * on a built hello with GREASE everywhere, no SNI and an ALPN value that is not alphanumeric.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { ClientHelloParser } from "../src/proto/clienthello.ts";
import { compileFingerprintPatterns } from "../src/proto/fingerprint.ts";

const dir = new URL("./fixtures/hellos/", import.meta.url);
const manifest = JSON.parse(Deno.readTextFileSync(new URL("manifest.json", dir))) as {
  hellos: { file: string; client: string }[];
};

/** The fields of a hello the fingerprints read, in hello order, GREASE included. */
interface Walked {
  legacy: number;
  ciphers: number[];
  exts: { type: number; data: Uint8Array }[];
}

/** Walks one TLS record holding a whole ClientHello. */
function walk(record: Uint8Array): Walked {
  const v = new DataView(record.buffer, record.byteOffset, record.byteLength);
  let p = 5 + 4; // record header, handshake header
  const legacy = v.getUint16(p);
  p += 2 + 32;
  p += 1 + v.getUint8(p); // session id
  const ciphers: number[] = [];
  const cEnd = p + 2 + v.getUint16(p);
  for (p += 2; p < cEnd; p += 2) ciphers.push(v.getUint16(p));
  p += 1 + v.getUint8(p); // compression
  const exts: Walked["exts"] = [];
  if (p < record.length) {
    const eEnd = p + 2 + v.getUint16(p);
    for (p += 2; p < eEnd;) {
      const len = v.getUint16(p + 2);
      exts.push({ type: v.getUint16(p), data: record.subarray(p + 4, p + 4 + len) });
      p += 4 + len;
    }
  }
  return { legacy, ciphers, exts };
}

const grease = (x: number) => x % 256 === x >> 8 && (x & 0x0f) === 0x0a;
const list16 = (d: Uint8Array, from: number) =>
  Array.from(
    { length: (d.length - from) >> 1 },
    (_, i) => (d[from + 2 * i] << 8) | d[from + 2 * i + 1],
  );
const hex = (x: number) => x.toString(16).padStart(4, "0");

async function sha256_12(s: string): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(s));
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("").slice(0, 12);
}

/** JA4 as FoxIO's technical details describe it (TCP), and its raw form JA4_r. */
async function expectedJa4(record: Uint8Array): Promise<{ ja4: string; raw: string }> {
  const h = walk(record);
  const ext = (t: number) => h.exts.find((e) => e.type === t)?.data;
  const supported = ext(43);
  const versions = supported ? list16(supported, 1).filter((x) => !grease(x)) : [h.legacy];
  const version = ({ 0x304: "13", 0x303: "12", 0x302: "11", 0x301: "10" } as Record<
    number,
    string
  >)[Math.max(...versions)] ?? "00";
  const ciphers = h.ciphers.filter((c) => !grease(c));
  const types = h.exts.map((e) => e.type).filter((t) => !grease(t));
  const alpnExt = ext(16);
  let alpn = "00";
  if (alpnExt) {
    const first = alpnExt.subarray(3, 3 + alpnExt[2]);
    const ok = (b: number) => /[0-9A-Za-z]/.test(String.fromCharCode(b));
    const x = [...first].map((b) => b.toString(16).padStart(2, "0")).join("");
    alpn = ok(first[0]) && ok(first[first.length - 1])
      ? String.fromCharCode(first[0], first[first.length - 1])
      : x[0] + x[x.length - 1];
  }
  const two = (n: number) => String(Math.min(n, 99)).padStart(2, "0");
  const a = `t${version}${ext(0) ? "d" : "i"}${two(ciphers.length)}${two(types.length)}${alpn}`;
  const sortedCiphers = ciphers.map(hex).sort().join(",");
  const sortedExts = types.filter((t) => t !== 0 && t !== 16).map(hex).sort().join(",");
  const sig = ext(13);
  const sigalgs = sig ? list16(sig, 2).filter((x) => !grease(x)).map(hex).join(",") : "";
  const cPart = sigalgs ? `${sortedExts}_${sigalgs}` : sortedExts;
  return {
    ja4: `${a}_${await sha256_12(sortedCiphers)}_${await sha256_12(cPart)}`,
    raw: `${a}_${sortedCiphers}_${cPart}`,
  };
}

/** JA3's string: legacy version, ciphers, extensions, groups, point formats (decimal). */
function expectedJa3(record: Uint8Array): string {
  const h = walk(record);
  const ext = (t: number) => h.exts.find((e) => e.type === t)?.data;
  const groups = ext(10) ? list16(ext(10)!, 2).filter((x) => !grease(x)) : [];
  const formats = ext(11) ? [...ext(11)!.subarray(1)] : [];
  const text = [
    h.legacy,
    h.ciphers.filter((c) => !grease(c)).join("-"),
    h.exts.map((e) => e.type).filter((t) => !grease(t)).join("-"),
    groups.join("-"),
    formats.join("-"),
  ].join(",");
  return createHash("md5").update(text).digest("hex");
}

function parsed(bytes: Uint8Array) {
  const hello = new ClientHelloParser(16384, true).push(bytes);
  assert.ok(hello?.fingerprints, "a hello with fingerprints");
  return hello.fingerprints;
}

for (const f of manifest.hellos) {
  Deno.test(`${f.client.split(" ").slice(0, 2).join(" ")} (${f.file}): JA4 and JA3 as published`, async () => {
    const bytes = Deno.readFileSync(new URL(f.file, dir));
    const record = bytes.subarray(0, 5 + ((bytes[3] << 8) | bytes[4]));
    const fp = parsed(bytes);
    const want = await expectedJa4(record);
    assert.equal(fp.ja4, want.ja4, `JA4_r: ${want.raw}`);
    assert.match(fp.ja4, /^t1[0-3][di]\d{4}[0-9a-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}$/);
    assert.equal(fp.ja3, expectedJa3(record));
  });
}

Deno.test("the fixtures' JA4 parts match how each client was told to connect", () => {
  const ja4 = (file: string) => parsed(Deno.readFileSync(new URL(file, dir))).ja4;
  assert.match(ja4("openssl_no_sni.bin"), /^t13i\d{4}00_/, "no SNI, no ALPN");
  assert.match(ja4("openssl_tls12.bin"), /^t12d\d{4}h1_/, "-tls1_2 -alpn http/1.1");
  assert.match(ja4("curl_http11.bin"), /^t13d\d{4}h1_/);
  assert.match(ja4("curl_http2.bin"), /^t13d\d{4}h2_/);
  // curl asked for h2 or http/1.1 only changes the ALPN characters
  assert.equal(ja4("curl_http2.bin").slice(11), ja4("curl_http11.bin").slice(11));
  // published Chrome values (JA4 t13d1516h2_8daaf6152771_…): the same 15 ciphers, hence the
  // same cipher hash; this Chromium sends one more extension (0xca34) than that capture's 16
  const chromium = ja4("chromium_pq.bin");
  assert.match(chromium, /^t13d1517h2_8daaf6152771_[0-9a-f]{12}$/);
});

Deno.test("GREASE is left out everywhere; a non-alphanumeric ALPN value shows as hex", async () => {
  const u16 = (x: number) => [x >> 8, x & 255];
  const ext = (type: number, data: number[]) => [...u16(type), ...u16(data.length), ...data];
  const alpnName = [0x01, 0x68, 0xff]; // "\x01h\xff"
  const exts = [
    ...ext(0x2a2a, []),
    ...ext(10, [0, 6, ...u16(0x3a3a), ...u16(29), ...u16(23)]),
    ...ext(11, [1, 0]),
    ...ext(13, [0, 6, ...u16(0x5a5a), ...u16(0x0403), ...u16(0x0804)]),
    ...ext(16, [0, alpnName.length + 4, alpnName.length, ...alpnName, 2, 0x68, 0x32]),
    ...ext(43, [6, ...u16(0x7a7a), ...u16(0x0304), ...u16(0x0303)]),
  ];
  const body = [
    ...u16(0x0303),
    ...new Array(32).fill(7),
    0,
    ...u16(6),
    ...u16(0x0a0a),
    ...u16(0x1301),
    ...u16(0xc02b),
    1,
    0,
    ...u16(exts.length),
    ...exts,
  ];
  const hs = [1, 0, body.length >> 8, body.length & 255, ...body];
  const record = new Uint8Array([22, 3, 1, ...u16(hs.length), ...hs]);
  const fp = parsed(record);
  // no SNI, 2 ciphers, 5 extensions (ALPN counts), ALPN "\x01h\xff" -> hex "0168ff" -> "0f"
  assert.equal(fp.ja4.slice(0, 10), "t13i02050f");
  assert.equal(fp.ja4, (await expectedJa4(record)).ja4);
  assert.equal(
    fp.ja4.split("_")[2],
    await sha256_12("000a,000b,000d,002b_0403,0804"),
    "sorted extensions without ALPN, then the signature algorithms in order",
  );
  const ja3 = createHash("md5").update("771,4865-49195,10-11-13-16-43,29-23,0").digest("hex");
  assert.equal(fp.ja3, ja3);
});

Deno.test("a hello without extensions: version from the hello, zero hashes for extensions", () => {
  const u16 = (x: number) => [x >> 8, x & 255];
  const body = [...u16(0x0301), ...new Array(32).fill(1), 0, ...u16(2), ...u16(0x002f), 1, 0];
  const hs = [1, 0, 0, body.length, ...body];
  const fp = parsed(new Uint8Array([22, 3, 1, ...u16(hs.length), ...hs]));
  assert.match(fp.ja4, /^t10i010000_[0-9a-f]{12}_000000000000$/);
});

Deno.test("fingerprint patterns: exact JA4 or JA3, or with * wildcards", () => {
  const p = compileFingerprintPatterns([
    "t13d1516h2_8daaf6152771_02713d6af862",
    "0149f47eabf9a20d0893e2a44e5a6323",
    "t12*",
    "*_e8f1e7e78f70_*",
  ])!;
  const ja3 = "ffffffffffffffffffffffffffffffff";
  assert.equal(
    p.match("t13d1516h2_8daaf6152771_02713d6af862", ja3),
    "t13d1516h2_8daaf6152771_02713d6af862",
  );
  assert.equal(
    p.match("t13d0000h2_000000000000_000000000000", "0149f47eabf9a20d0893e2a44e5a6323"),
    "0149f47eabf9a20d0893e2a44e5a6323",
  );
  assert.equal(p.match("t12d2808h1_d943125447b4_e7e480e5a997", ja3), "t12*");
  assert.equal(p.match("t13d3112h2_e8f1e7e78f70_b26ce05bbdd6", ja3), "*_e8f1e7e78f70_*");
  assert.equal(p.match("t13d1011h2_61a7ad8aa9b6_f9531d972513", ja3), null);
  assert.equal(compileFingerprintPatterns([]), null);
});

Deno.test("a hello split over several records, fed byte by byte, has the same fingerprints", () => {
  const whole = Deno.readFileSync(new URL("chromium_pq.bin", dir));
  const hs = whole.subarray(5, 5 + ((whole[3] << 8) | whole[4]));
  // records of 1, 700 and the rest of the handshake bytes: cuts inside the extensions
  const cuts = [0, 1, 701, hs.length];
  const parts: number[] = [];
  for (let i = 1; i < cuts.length; i++) {
    const len = cuts[i] - cuts[i - 1];
    parts.push(22, 3, 1, len >> 8, len & 255, ...hs.subarray(cuts[i - 1], cuts[i]));
  }
  const split = new Uint8Array(parts);
  const p = new ClientHelloParser(16384, true);
  let hello = null;
  for (let i = 0; i < split.length; i++) hello = p.push(split.subarray(i, i + 1));
  assert.deepEqual(hello?.fingerprints, parsed(whole));
});
