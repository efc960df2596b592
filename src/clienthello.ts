/**
 * Incremental TLS ClientHello parser: takes bytes in any split (one at a time included),
 * reassembles a handshake message spread over several records and segments, and returns the
 * server name, ALPN list and the presence of early_data and encrypted_client_hello. Every
 * malformed, truncated, oversized or non-TLS input ends in a {@link ClientHelloError}.
 *
 * @module
 */

/** What was wrong with the bytes. */
export type ClientHelloErrorKind =
  | "not_tls"
  | "sslv2"
  | "not_handshake"
  | "not_client_hello"
  | "bad_length"
  | "bad_extension"
  | "bad_server_name"
  | "too_large"
  | "truncated";

/** A hello the proxy cannot route; `kind` says why. */
export class ClientHelloError extends Error {
  readonly kind: ClientHelloErrorKind;
  constructor(kind: ClientHelloErrorKind, message: string) {
    super(message);
    this.name = "ClientHelloError";
    this.kind = kind;
  }
}

/** What the proxy needs from a ClientHello. */
export interface ClientHello {
  /** SNI host_name, lower-cased, trailing dot removed; null when absent. With ECH, the outer name. */
  serverName: string | null;
  /** ALPN protocol names in client order ([] when absent). */
  alpn: string[];
  /** The early_data (42) extension is present: the client may send 0-RTT data next. */
  earlyData: boolean;
  /** The encrypted_client_hello (0xfe0d) extension is present. */
  encryptedClientHello: boolean;
  /** Bytes of the TLS records that carried the hello, record headers included. */
  recordBytes: number;
}

const RECORD_HANDSHAKE = 22;
const HANDSHAKE_CLIENT_HELLO = 1;
const RECORD_HEADER = 5;
/** TLSPlaintext.length must not exceed 2^14. */
const MAX_RECORD = 16384;
const EXT_SERVER_NAME = 0;
const EXT_ALPN = 16;
const EXT_EARLY_DATA = 42;
const EXT_ECH = 0xfe0d;

const latin1 = new TextDecoder("latin1");

/** Parses one ClientHello from bytes as they arrive. */
export class ClientHelloParser {
  readonly #max: number;
  #buf: Uint8Array;
  #len = 0;
  /** Offset in #buf of the next record header not yet consumed. */
  #recordOff = 0;
  /** Handshake bytes reassembled from record payloads. */
  #hs: Uint8Array | null = null;
  #hsLen = 0;
  #result: ClientHello | null = null;

  /** `maxBytes`: the most bytes (records with headers) a hello may take. */
  constructor(maxBytes = 16384) {
    this.#max = maxBytes;
    this.#buf = new Uint8Array(Math.min(1024, maxBytes + RECORD_HEADER));
  }

  /** Every byte pushed so far, unchanged (a view, valid until the next push). */
  get data(): Uint8Array {
    return this.#buf.subarray(0, this.#len);
  }

  /** Feeds the next bytes; returns the hello once complete, else null. Throws ClientHelloError. */
  push(chunk: Uint8Array): ClientHello | null {
    this.#append(chunk);
    if (this.#result) return this.#result;
    this.#advance();
    return this.#result;
  }

  /** The peer ended its side: returns the hello if complete, else throws `truncated`. */
  end(): ClientHello {
    if (this.#result) return this.#result;
    throw new ClientHelloError(
      "truncated",
      `connection ended after ${this.#len} bytes, before the ClientHello was complete`,
    );
  }

  #append(chunk: Uint8Array): void {
    const need = this.#len + chunk.length;
    if (need > this.#buf.length) {
      let cap = this.#buf.length * 2;
      while (cap < need) cap *= 2;
      const next = new Uint8Array(cap);
      next.set(this.#buf.subarray(0, this.#len));
      this.#buf = next;
    }
    this.#buf.set(chunk, this.#len);
    this.#len = need;
  }

  #advance(): void {
    const b = this.#buf;
    if (this.#recordOff === 0 && this.#len > 0 && b[0] !== RECORD_HANDSHAKE) {
      // SSLv2-compatible hello: 2-byte length with the high bit set, then msg type 1
      if (b[0] & 0x80) {
        if (this.#len < 3) return;
        if (b[2] === 1) throw new ClientHelloError("sslv2", "SSLv2-format ClientHello");
      }
      throw new ClientHelloError("not_tls", `not a TLS handshake (first byte 0x${hex(b[0])})`);
    }
    while (this.#len - this.#recordOff >= RECORD_HEADER) {
      const off = this.#recordOff;
      if (b[off] !== RECORD_HANDSHAKE) {
        throw new ClientHelloError(
          "not_handshake",
          `record of type ${b[off]} before the ClientHello was complete`,
        );
      }
      if (b[off + 1] !== 3 || b[off + 2] > 4) {
        throw new ClientHelloError(
          "not_tls",
          `unknown record version ${b[off + 1]}.${b[off + 2]}`,
        );
      }
      const length = (b[off + 3] << 8) | b[off + 4];
      if (length === 0 || length > MAX_RECORD) {
        throw new ClientHelloError("bad_length", `handshake record length ${length}`);
      }
      const end = off + RECORD_HEADER + length;
      if (end > this.#max) {
        throw new ClientHelloError("too_large", `ClientHello larger than ${this.#max} bytes`);
      }
      if (this.#len < end) return;
      this.#appendHandshake(b.subarray(off + RECORD_HEADER, end));
      this.#recordOff = end;
      if (this.#hsLen >= 4) {
        const hs = this.#hs!;
        if (hs[0] !== HANDSHAKE_CLIENT_HELLO) {
          throw new ClientHelloError("not_client_hello", `handshake message type ${hs[0]}`);
        }
        const msgLen = (hs[1] << 16) | (hs[2] << 8) | hs[3];
        // the records carrying it need at least one 5-byte header per 2^14 bytes
        if (4 + msgLen + RECORD_HEADER > this.#max) {
          throw new ClientHelloError("too_large", `ClientHello of ${4 + msgLen} bytes`);
        }
        if (this.#hsLen >= 4 + msgLen) {
          this.#result = parseBody(hs.subarray(4, 4 + msgLen), end);
          return;
        }
      }
    }
  }

  #appendHandshake(payload: Uint8Array): void {
    if (this.#hs === null && payload.length >= 4) {
      // common case: the whole message in one record; parse it in place
      this.#hs = payload;
      this.#hsLen = payload.length;
      return;
    }
    const need = this.#hsLen + payload.length;
    const next = new Uint8Array(need);
    if (this.#hs) next.set(this.#hs.subarray(0, this.#hsLen));
    next.set(payload, this.#hsLen);
    this.#hs = next;
    this.#hsLen = need;
  }
}

/** A bounds-checked reader over one length-delimited block. */
class Reader {
  pos: number;
  constructor(readonly b: Uint8Array, pos: number, readonly end: number) {
    this.pos = pos;
  }
  need(n: number, what: string): void {
    if (this.pos + n > this.end) {
      throw new ClientHelloError("bad_length", `${what} runs past its container`);
    }
  }
  u8(what: string): number {
    this.need(1, what);
    return this.b[this.pos++];
  }
  u16(what: string): number {
    this.need(2, what);
    const v = (this.b[this.pos] << 8) | this.b[this.pos + 1];
    this.pos += 2;
    return v;
  }
  /** A vector with a 1- or 2-byte length: returns [start, end] and skips it. */
  vec(lenBytes: 1 | 2, what: string): [number, number] {
    const n = lenBytes === 1 ? this.u8(what) : this.u16(what);
    this.need(n, what);
    const start = this.pos;
    this.pos += n;
    return [start, this.pos];
  }
}

function parseBody(body: Uint8Array, recordBytes: number): ClientHello {
  const r = new Reader(body, 0, body.length);
  r.u16("legacy_version");
  r.need(32, "random");
  r.pos += 32;
  const [sidStart, sidEnd] = r.vec(1, "session_id");
  if (sidEnd - sidStart > 32) throw new ClientHelloError("bad_length", "session_id over 32 bytes");
  const [csStart, csEnd] = r.vec(2, "cipher_suites");
  if (csEnd === csStart || (csEnd - csStart) % 2 !== 0) {
    throw new ClientHelloError("bad_length", "cipher_suites length is zero or odd");
  }
  const [cmStart, cmEnd] = r.vec(1, "compression_methods");
  if (cmEnd === cmStart) throw new ClientHelloError("bad_length", "no compression methods");
  const hello: ClientHello = {
    serverName: null,
    alpn: [],
    earlyData: false,
    encryptedClientHello: false,
    recordBytes,
  };
  if (r.pos === r.end) return hello; // no extensions (allowed before TLS 1.3)
  const [extStart, extEnd] = r.vec(2, "extensions");
  if (extEnd !== r.end) {
    throw new ClientHelloError("bad_length", "bytes after the extensions block");
  }
  const seen = new Set<number>();
  const ext = new Reader(body, extStart, extEnd);
  while (ext.pos < ext.end) {
    const type = ext.u16("extension type");
    const [start, end] = ext.vec(2, `extension ${type}`);
    if (seen.has(type)) throw new ClientHelloError("bad_extension", `extension ${type} repeated`);
    seen.add(type);
    switch (type) {
      case EXT_SERVER_NAME:
        hello.serverName = parseServerName(body, start, end);
        break;
      case EXT_ALPN:
        hello.alpn = parseAlpn(body, start, end);
        break;
      case EXT_EARLY_DATA:
        hello.earlyData = true;
        break;
      case EXT_ECH:
        hello.encryptedClientHello = true;
        break;
    }
  }
  return hello;
}

function parseServerName(b: Uint8Array, start: number, end: number): string | null {
  const r = new Reader(b, start, end);
  const [listStart, listEnd] = r.vec(2, "server_name list");
  if (listEnd !== end) throw new ClientHelloError("bad_extension", "server_name list length");
  const list = new Reader(b, listStart, listEnd);
  let name: string | null = null;
  while (list.pos < list.end) {
    const nameType = list.u8("server_name type");
    const [s, e] = list.vec(2, "server_name");
    if (nameType !== 0) continue; // only host_name (0) is defined; skip unknown types
    if (name !== null) throw new ClientHelloError("bad_server_name", "two host_name entries");
    name = validateHostName(b, s, e);
  }
  return name;
}

function parseAlpn(b: Uint8Array, start: number, end: number): string[] {
  const r = new Reader(b, start, end);
  const [listStart, listEnd] = r.vec(2, "ALPN list");
  if (listEnd !== end || listEnd === listStart) {
    throw new ClientHelloError("bad_extension", "ALPN list length");
  }
  const list = new Reader(b, listStart, listEnd);
  const names: string[] = [];
  while (list.pos < list.end) {
    const [s, e] = list.vec(1, "ALPN protocol");
    if (s === e) throw new ClientHelloError("bad_extension", "empty ALPN protocol name");
    names.push(latin1.decode(b.subarray(s, e)));
  }
  return names;
}

/** Checks a host_name's bytes (letters, digits, '-', '_', '.'), returns it normalized. */
function validateHostName(b: Uint8Array, s: number, e: number): string {
  if (s === e) throw new ClientHelloError("bad_server_name", "empty server name");
  let labelLen = 0;
  for (let i = s; i < e; i++) {
    const c = b[i];
    if (c === 0x2e) {
      // an empty label is only allowed as the single trailing dot
      if (labelLen === 0) {
        throw new ClientHelloError("bad_server_name", "empty label in server name");
      }
      labelLen = 0;
      continue;
    }
    const ok = (c >= 0x61 && c <= 0x7a) || (c >= 0x41 && c <= 0x5a) || (c >= 0x30 && c <= 0x39) ||
      c === 0x2d || c === 0x5f;
    if (!ok) {
      throw new ClientHelloError("bad_server_name", `byte 0x${hex(c)} in server name`);
    }
    if (++labelLen > 63) throw new ClientHelloError("bad_server_name", "label over 63 bytes");
  }
  let name = latin1.decode(b.subarray(s, e)).toLowerCase();
  if (name.endsWith(".")) name = name.slice(0, -1);
  if (name.length > 253) {
    throw new ClientHelloError("bad_server_name", "server name over 253 bytes");
  }
  return name;
}

function hex(n: number): string {
  return n.toString(16).padStart(2, "0");
}
