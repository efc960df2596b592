/**
 * TLS client fingerprints of a ClientHello: JA4 (FoxIO's published algorithm, TCP form) and
 * JA3 (Salesforce's), computed once from the hello the parser has already checked, and the
 * patterns a config denies clients by.
 *
 * JA4 is `a_b_c`: `a` is `t` (TCP) or `q` (QUIC), the TLS version (the highest of supported_versions, else the
 * legacy version), `d`/`i` for SNI present or not, the cipher and extension counts (2 digits,
 * at most 99) and the first and last characters of the first ALPN value (`00` without ALPN);
 * `b` the first 12 hex digits of the SHA-256 of the sorted cipher list, `c` of the sorted
 * extension list without SNI and ALPN, then `_` and the signature algorithms in hello order.
 * GREASE values are left out everywhere.
 *
 * @module
 */
import { md5Hex, sha256Hex } from "../net/digest.ts";

/** The transport a hello came over: JA4's first character, `t` for TCP, `q` for QUIC. */
export type HelloTransport = "tcp" | "quic";

/** A hello's fingerprints. */
export interface Fingerprints {
  ja4: string;
  /** MD5 hex of `version,ciphers,extensions,groups,point_formats` (decimal, GREASE left out). */
  ja3: string;
}

const EXT_SERVER_NAME = 0x0000;
const EXT_SUPPORTED_GROUPS = 0x000a;
const EXT_EC_POINT_FORMATS = 0x000b;
const EXT_SIGNATURE_ALGORITHMS = 0x000d;
const EXT_ALPN = 0x0010;
const EXT_SUPPORTED_VERSIONS = 0x002b;

/** RFC 8701 GREASE values: 0x0a0a, 0x1a1a, ... 0xfafa. */
function isGrease(v: number): boolean {
  return (v & 0x0f0f) === 0x0a0a && (v >> 8) === (v & 0xff);
}

const VERSIONS: Record<number, string> = {
  0x0304: "13",
  0x0303: "12",
  0x0302: "11",
  0x0301: "10",
  0x0300: "s3",
  0x0002: "s2",
};

function hex4(v: number): string {
  return v.toString(16).padStart(4, "0");
}

function hash12(text: string): string {
  return sha256Hex(text).slice(0, 12);
}

function count2(n: number): string {
  return n > 99 ? "99" : n < 10 ? `0${n}` : `${n}`;
}

function isAlnum(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}

/** JA4's two ALPN characters: first and last of the first value, its hex when not alphanumeric. */
function alpnChars(first: string | undefined): string {
  if (first === undefined || first.length === 0) return "00";
  const a = first.charCodeAt(0);
  const z = first.charCodeAt(first.length - 1);
  if (isAlnum(a) && isAlnum(z)) return first[0] + first[first.length - 1];
  return a.toString(16).padStart(2, "0")[0] + z.toString(16).padStart(2, "0")[1];
}

/** u16 values of `b[start, end)`. */
function u16s(b: Uint8Array, start: number, end: number): number[] {
  const out: number[] = [];
  for (let i = start; i + 1 < end; i += 2) out.push((b[i] << 8) | b[i + 1]);
  return out;
}

/**
 * The fingerprints of a ClientHello body (the handshake message without its 4-byte header)
 * whose structure the parser has checked: `ciphers` and `extensions` are the [start, end)
 * offsets of the cipher_suites content and of the extensions block content (both -1 when the
 * hello has no extensions); `alpn` the offered protocols; `transport` what carried the hello.
 */
export function fingerprints(
  body: Uint8Array,
  ciphersStart: number,
  ciphersEnd: number,
  extStart: number,
  extEnd: number,
  alpn: readonly string[],
  transport: HelloTransport = "tcp",
): Fingerprints {
  const legacy = (body[0] << 8) | body[1];
  const ciphers = u16s(body, ciphersStart, ciphersEnd).filter((c) => !isGrease(c));
  const exts: number[] = [];
  let version = legacy;
  let sni = false;
  let sigalgs: number[] = [];
  let groups: number[] = [];
  let pointFormats: number[] = [];
  for (let p = extStart; p >= 0 && p + 4 <= extEnd;) {
    const type = (body[p] << 8) | body[p + 1];
    const len = (body[p + 2] << 8) | body[p + 3];
    const s = p + 4;
    p = s + len;
    if (isGrease(type)) continue;
    exts.push(type);
    switch (type) {
      case EXT_SERVER_NAME:
        sni = true;
        break;
      case EXT_SUPPORTED_VERSIONS: {
        // u8 length, then u16 versions: the highest that is not GREASE
        let best = 0;
        for (const v of u16s(body, s + 1, Math.min(p, s + 1 + (len > 0 ? body[s] : 0)))) {
          if (!isGrease(v) && v > best) best = v;
        }
        if (best) version = best;
        break;
      }
      case EXT_SIGNATURE_ALGORITHMS:
        if (len >= 2) sigalgs = u16s(body, s + 2, p).filter((v) => !isGrease(v));
        break;
      case EXT_SUPPORTED_GROUPS:
        if (len >= 2) groups = u16s(body, s + 2, p).filter((v) => !isGrease(v));
        break;
      case EXT_EC_POINT_FORMATS:
        if (len >= 1) pointFormats = [...body.subarray(s + 1, p)];
        break;
    }
  }
  const a = `${transport === "quic" ? "q" : "t"}${VERSIONS[version] ?? "00"}${sni ? "d" : "i"}${
    count2(ciphers.length)
  }${count2(exts.length)}${alpnChars(alpn[0])}`;
  const b = ciphers.length
    ? hash12([...ciphers].sort((x, y) => x - y).map(hex4).join(","))
    : "000000000000";
  const hashed = exts.filter((t) => t !== EXT_SERVER_NAME && t !== EXT_ALPN).sort((x, y) => x - y);
  const c = hashed.length
    ? hash12(
      hashed.map(hex4).join(",") + (sigalgs.length ? "_" + sigalgs.map(hex4).join(",") : ""),
    )
    : "000000000000";
  const ja3 = md5Hex(
    [legacy, ciphers.join("-"), exts.join("-"), groups.join("-"), pointFormats.join("-")].join(","),
  );
  return { ja4: `${a}_${b}_${c}`, ja3 };
}

/**
 * The fingerprints of an SSLv2-format hello (src/proto/sslv2.ts) with `version` and the 3-byte
 * cipher specs `specs`. It has no extensions: JA4 `t{version}i{ciphers}0000` (`s2` for SSL 2.0
 * itself, as JA4 names it) with `c` all zeros, JA3 `version,ciphers,,,`. Only the specs that
 * stand for a TLS cipher suite (first byte 0, RFC 5246 E.2) count as ciphers: the SSL 2.0 kinds
 * have no TLS number.
 */
export function sslv2Fingerprints(version: number, specs: Uint8Array): Fingerprints {
  const ciphers: number[] = [];
  for (let i = 0; i + 2 < specs.length; i += 3) {
    const suite = (specs[i + 1] << 8) | specs[i + 2];
    if (specs[i] === 0 && !isGrease(suite)) ciphers.push(suite);
  }
  const a = `t${VERSIONS[version] ?? "00"}i${count2(ciphers.length)}0000`;
  const b = ciphers.length
    ? hash12([...ciphers].sort((x, y) => x - y).map(hex4).join(","))
    : "000000000000";
  const ja3 = md5Hex(`${version},${ciphers.join("-")},,,`);
  return { ja4: `${a}_${b}_000000000000`, ja3 };
}

/** Compiled fingerprint patterns: each matches a JA4 or a JA3 string, `*` any run of characters. */
export interface FingerprintPatterns {
  /** The patterns as written in the config. */
  texts: readonly string[];
  /** The first pattern that matches `ja4` or `ja3`, or null. */
  match(ja4: string, ja3: string): string | null;
}

/** Compiles a (validated) pattern list; null when it is empty. */
export function compileFingerprintPatterns(texts: readonly string[]): FingerprintPatterns | null {
  if (texts.length === 0) return null;
  const exact = new Set(texts.filter((t) => !t.includes("*")));
  const wild = texts.filter((t) => t.includes("*")).map((t) => ({
    text: t,
    re: new RegExp(`^${t.replaceAll("*", ".*")}$`),
  }));
  return {
    texts,
    match(ja4, ja3) {
      if (exact.has(ja4)) return ja4;
      if (exact.has(ja3)) return ja3;
      for (const w of wild) if (w.re.test(ja4) || w.re.test(ja3)) return w.text;
      return null;
    },
  };
}
