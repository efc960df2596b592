/**
 * Incremental TLS ClientHello parser: takes bytes in any split (one at a time included),
 * reassembles a handshake message spread over several records and TCP segments, and returns the
 * server name, ALPN list and the presence of early_data and encrypted_client_hello. An
 * SSLv2-compatible hello (src/proto/sslv2.ts) is a hello without a name. Every malformed,
 * truncated, oversized or non-TLS input ends in a {@link ClientHelloError}; no other exception
 * escapes. {@link parseClientHelloMessage} parses a whole handshake message without records, as
 * QUIC carries it (src/proto/quic.ts).
 *
 * Cost: bytes are copied once into one growing buffer (doubling); a record is looked at only
 * when its header, and then its whole payload, is there, so feeding one byte at a time is linear.
 * A hello in one record is parsed in place; one spread over several records is copied once.
 *
 * @module
 */
import { fingerprints, type HelloTransport } from "./fingerprint.ts";
import { HeadParser } from "./headparser.ts";
import { type ClientHello, ClientHelloError, type ClientHelloErrorKind } from "./hello.ts";
import { isSslv2Start, parseSslv2Hello } from "./sslv2.ts";
import { latin1String } from "../net/bytes.ts";

export { type ClientHello, ClientHelloError, type ClientHelloErrorKind } from "./hello.ts";

const RECORD_HEADER = 5;
/** TLSPlaintext.length must not exceed 2^14 (RFC 8446 5.1). */
const MAX_RECORD = 16384;
const CT_CHANGE_CIPHER_SPEC = 20;
const CT_ALERT = 21;
const CT_HANDSHAKE = 22;
const CT_APPLICATION_DATA = 23;
const CT_HEARTBEAT = 24;
const HANDSHAKE_CLIENT_HELLO = 1;
const HANDSHAKE_HEADER = 4;
const EXT_SERVER_NAME = 0;
const EXT_ALPN = 16;
const EXT_EARLY_DATA = 42;
const EXT_ECH = 0xfe0d;
const NAME_TYPE_HOST_NAME = 0;
/** First buffer size: most hellos fit (517 B from OpenSSL, ~1.9 KB post-quantum browsers). */
const INITIAL_BUFFER = 2048;

/** Parses one ClientHello from bytes as they arrive. */
export class ClientHelloParser extends HeadParser<ClientHello> {
  /** Offset in `buf` of the next record header not yet consumed. */
  #recordOff = 0;
  /** Handshake payload fragments as [start, end) offset pairs into `buf`, in order. */
  #fragments: number[] = [];
  /** Handshake bytes received so far (sum of the fragments). */
  #hsLen = 0;
  /** The handshake message's total length with its 4-byte header, once known. */
  #msgLen = -1;

  /** Compute the hello's fingerprints (see src/proto/fingerprint.ts). */
  readonly #fingerprint: boolean;

  /**
   * `maxBytes`: the most bytes (records with their headers) a hello may take; `fingerprint`:
   * also compute the hello's JA4 and JA3.
   */
  constructor(maxBytes = 16384, fingerprint = false) {
    super(maxBytes, INITIAL_BUFFER);
    this.#fingerprint = fingerprint;
  }

  protected truncated(): ClientHelloError {
    return new ClientHelloError(
      "truncated",
      `connection ended after ${this.len} bytes, before the ClientHello was complete`,
    );
  }

  protected isParseError(e: unknown): boolean {
    return e instanceof ClientHelloError;
  }

  /** Consumes every complete record; sets `result` when the hello is complete. */
  protected advance(): void {
    const b = this.buf;
    if (isSslv2Start(b, this.len)) {
      this.result = parseSslv2Hello(b, this.len, this.maxBytes, this.#fingerprint);
      return;
    }
    for (;;) {
      const off = this.#recordOff;
      const avail = this.len - off;
      if (avail <= 0) return;
      this.#checkRecordStart(b, off, avail);
      if (avail < RECORD_HEADER) return;
      const length = (b[off + 3] << 8) | b[off + 4];
      if (length === 0) throw new ClientHelloError("bad_length", "handshake record of length 0");
      if (length > MAX_RECORD) {
        throw new ClientHelloError("bad_length", `record length ${length} over 2^14`);
      }
      const end = off + RECORD_HEADER + length;
      if (end > this.maxBytes) {
        throw new ClientHelloError(
          "too_large",
          `ClientHello needs more than ${this.maxBytes} bytes (a record ends at byte ${end})`,
        );
      }
      // refuse a wrong handshake type as soon as its byte is in, not when the record is
      if (this.#hsLen === 0 && avail > RECORD_HEADER) checkHandshakeType(b[off + RECORD_HEADER]);
      if (this.len < end) return;
      this.#fragments.push(off + RECORD_HEADER, end);
      this.#hsLen += length;
      this.#recordOff = end;
      if (this.#msgLen < 0 && this.#hsLen >= HANDSHAKE_HEADER) {
        const h = this.#handshakeHeader();
        this.#msgLen = HANDSHAKE_HEADER + ((h[1] << 16) | (h[2] << 8) | h[3]);
      }
      if (this.#msgLen < 0) continue;
      const missing = this.#msgLen - this.#hsLen;
      if (missing <= 0) {
        this.result = parseBody(this.#message(), end, this.#fingerprint);
        return;
      }
      // the rest needs at least one more record: its header plus the missing bytes
      if (end + RECORD_HEADER + missing > this.maxBytes) {
        throw new ClientHelloError(
          "too_large",
          `ClientHello of ${this.#msgLen} bytes does not fit in ${this.maxBytes} bytes`,
        );
      }
    }
  }

  /** Checks the record header bytes that are there (1 to 5). */
  #checkRecordStart(b: Uint8Array, off: number, avail: number): void {
    const type = b[off];
    if (type === CT_HANDSHAKE) {
      if (avail >= 2 && b[off + 1] !== 3) {
        throw new ClientHelloError("not_tls", `record version major ${b[off + 1]}, not 3`);
      }
      if (avail >= 3 && b[off + 2] > 4) {
        throw new ClientHelloError("not_tls", `record version 3.${b[off + 2]} unknown`);
      }
      return;
    }
    const known = type === CT_ALERT || type === CT_APPLICATION_DATA ||
      type === CT_CHANGE_CIPHER_SPEC || type === CT_HEARTBEAT;
    if (!known) {
      throw new ClientHelloError(
        "not_tls",
        `not TLS (record type 0x${hex(type)} at byte ${off})`,
      );
    }
    // a real record type: tell "TLS, but not a hello" from garbage by its version
    if (avail >= 2 && b[off + 1] !== 3) {
      throw new ClientHelloError("not_tls", `not TLS (record type ${type}, version ${b[off + 1]})`);
    }
    if (avail < 2) return;
    throw new ClientHelloError(
      "not_handshake",
      `record of type ${type} (${recordTypeName(type)}) before the ClientHello was complete`,
    );
  }

  /** The first 4 handshake bytes, which may be spread over several fragments. */
  #handshakeHeader(): Uint8Array {
    const f = this.#fragments;
    if (f[1] - f[0] >= HANDSHAKE_HEADER) return this.buf.subarray(f[0], f[0] + HANDSHAKE_HEADER);
    const h = new Uint8Array(HANDSHAKE_HEADER);
    let n = 0;
    for (let i = 0; n < HANDSHAKE_HEADER; i += 2) {
      for (let j = f[i]; j < f[i + 1] && n < HANDSHAKE_HEADER; j++) h[n++] = this.buf[j];
    }
    return h;
  }

  /** The whole handshake message body (without its 4-byte header): in place, or joined once. */
  #message(): Uint8Array {
    const f = this.#fragments;
    const total = this.#msgLen;
    if (f[1] - f[0] >= total) return this.buf.subarray(f[0] + HANDSHAKE_HEADER, f[0] + total);
    const joined = new Uint8Array(total);
    let n = 0;
    for (let i = 0; i < f.length && n < total; i += 2) {
      const part = this.buf.subarray(f[i], Math.min(f[i + 1], f[i] + total - n));
      joined.set(part, n);
      n += part.length;
    }
    return joined.subarray(HANDSHAKE_HEADER);
  }
}

/**
 * The extension types seen in the hello being parsed (a repeat is an error), by type: the
 * parse's generation number where seen. One table for every parse (a parse runs to its end
 * synchronously), so a parse allocates nothing for it.
 */
const extensionSeen = new Uint8Array(65536);
let extensionGeneration = 0;

/** Notes extension `type` in the parse of generation `gen`; throws on a repeat. */
function noteExtension(type: number, gen: number): void {
  if (extensionSeen[type] === gen) {
    throw new ClientHelloError("bad_extension", `extension ${type} repeated`);
  }
  extensionSeen[type] = gen;
}

/** A generation number no entry of {@link extensionSeen} holds yet. */
function nextExtensionGeneration(): number {
  extensionGeneration = (extensionGeneration + 1) & 0xff;
  if (extensionGeneration === 0) {
    extensionSeen.fill(0);
    extensionGeneration = 1;
  }
  return extensionGeneration;
}

/**
 * Parses one whole ClientHello handshake message (4-byte header included, nothing after it),
 * as QUIC carries it in CRYPTO frames without TLS records; `recordBytes` of the result is the
 * message's length. Throws a {@link ClientHelloError} like the record parser does.
 */
export function parseClientHelloMessage(
  message: Uint8Array,
  options: { fingerprint?: boolean; transport?: HelloTransport } = {},
): ClientHello {
  if (message.length < HANDSHAKE_HEADER) {
    throw new ClientHelloError("truncated", `handshake message of ${message.length} bytes`);
  }
  checkHandshakeType(message[0]);
  const length = (message[1] << 16) | (message[2] << 8) | message[3];
  if (HANDSHAKE_HEADER + length !== message.length) {
    throw new ClientHelloError(
      "bad_length",
      `handshake length ${length} does not match the ${message.length - HANDSHAKE_HEADER} bytes`,
    );
  }
  const body = message.subarray(HANDSHAKE_HEADER);
  return parseBody(body, message.length, options.fingerprint ?? false, options.transport);
}

function checkHandshakeType(type: number): void {
  if (type !== HANDSHAKE_CLIENT_HELLO) {
    throw new ClientHelloError(
      "not_client_hello",
      `handshake message type ${type}, not client_hello (1)`,
    );
  }
}

function recordTypeName(type: number): string {
  switch (type) {
    case CT_ALERT:
      return "alert";
    case CT_APPLICATION_DATA:
      return "application_data";
    case CT_CHANGE_CIPHER_SPEC:
      return "change_cipher_spec";
    default:
      return "heartbeat";
  }
}

/** A bounds-checked reader over one length-delimited block [pos, end) of `b`. */
class Reader {
  pos: number;
  constructor(
    readonly b: Uint8Array,
    pos: number,
    readonly end: number,
    readonly kind: ClientHelloErrorKind = "bad_length",
  ) {
    this.pos = pos;
  }
  need(n: number, what: string): void {
    if (this.pos + n > this.end) {
      throw new ClientHelloError(this.kind, `${what} runs past its container`);
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
  /** Skips a vector with a 1- or 2-byte length; returns its content's start (end is `pos`). */
  vec(lenBytes: 1 | 2, what: string): number {
    const n = lenBytes === 1 ? this.u8(what) : this.u16(what);
    this.need(n, what);
    const start = this.pos;
    this.pos += n;
    return start;
  }
}

/**
 * Parses a ClientHello body (after the 4-byte handshake header); `body` is exactly the message.
 * With `fingerprint`, the hello gets its fingerprints, from the blocks checked here.
 */
function parseBody(
  body: Uint8Array,
  recordBytes: number,
  fingerprint: boolean,
  transport: HelloTransport = "tcp",
): ClientHello {
  const r = new Reader(body, 0, body.length);
  r.u16("legacy_version");
  r.need(32, "random");
  r.pos += 32;
  const sid = r.vec(1, "session_id");
  if (r.pos - sid > 32) throw new ClientHelloError("bad_length", "session_id over 32 bytes");
  const cs = r.vec(2, "cipher_suites");
  if (r.pos === cs || (r.pos - cs) % 2 !== 0) {
    throw new ClientHelloError("bad_length", `cipher_suites length ${r.pos - cs} is zero or odd`);
  }
  const cm = r.vec(1, "compression_methods");
  if (r.pos === cm) throw new ClientHelloError("bad_length", "no compression methods");
  const hello: ClientHello = {
    serverName: null,
    alpn: [],
    earlyData: false,
    encryptedClientHello: false,
    recordBytes,
  };
  if (r.pos === r.end) {
    // no extensions at all (allowed before TLS 1.3)
    if (fingerprint) {
      hello.fingerprints = fingerprints(body, cs, cm - 1, -1, -1, hello.alpn, transport);
    }
    return hello;
  }
  const extStart = r.vec(2, "extensions");
  if (r.pos !== r.end) {
    throw new ClientHelloError(
      "bad_length",
      `${r.end - r.pos} bytes after the extensions block, inside the ClientHello`,
    );
  }
  const gen = nextExtensionGeneration();
  const ext = new Reader(body, extStart, r.end);
  while (ext.pos < ext.end) {
    if (ext.end - ext.pos < 4) throw new ClientHelloError("bad_extension", "extension header cut");
    const type = ext.u16("extension type");
    const len = ext.u16("extension length");
    if (ext.pos + len > ext.end) {
      throw new ClientHelloError(
        "bad_extension",
        `extension ${type} length ${len} runs past the extensions block`,
      );
    }
    const start = ext.pos;
    ext.pos += len;
    noteExtension(type, gen);
    switch (type) {
      case EXT_SERVER_NAME:
        hello.serverName = parseServerName(body, start, ext.pos);
        break;
      case EXT_ALPN:
        hello.alpn = parseAlpn(body, start, ext.pos);
        break;
      case EXT_EARLY_DATA:
        if (len !== 0) {
          throw new ClientHelloError("bad_extension", `early_data with ${len} bytes, not empty`);
        }
        hello.earlyData = true;
        break;
      case EXT_ECH:
        if (len === 0) throw new ClientHelloError("bad_extension", "empty encrypted_client_hello");
        hello.encryptedClientHello = true;
        break;
    }
  }
  if (fingerprint) {
    hello.fingerprints = fingerprints(body, cs, cm - 1, extStart, ext.end, hello.alpn, transport);
  }
  return hello;
}

/** server_name extension (RFC 6066 3): a non-empty list with exactly one host_name. */
function parseServerName(b: Uint8Array, start: number, end: number): string {
  const r = new Reader(b, start, end, "bad_extension");
  if (end - start < 2) throw new ClientHelloError("bad_extension", "server_name list cut");
  const listStart = r.vec(2, "server_name list");
  if (r.pos !== end || r.pos === listStart) {
    throw new ClientHelloError(
      "bad_extension",
      `server_name list length ${r.pos - listStart} does not fill the extension (${
        end - start - 2
      })`,
    );
  }
  r.pos = listStart;
  let name: string | null = null;
  while (r.pos < end) {
    if (end - r.pos < 3) throw new ClientHelloError("bad_extension", "server_name entry cut");
    const nameType = r.u8("server_name type");
    const len = r.u16("server_name length");
    if (r.pos + len > end) {
      throw new ClientHelloError("bad_extension", `server_name length ${len} runs past its list`);
    }
    const s = r.pos;
    r.pos += len;
    if (nameType !== NAME_TYPE_HOST_NAME) continue; // no other type is defined; skip it
    if (name !== null) throw new ClientHelloError("bad_server_name", "two host_name entries");
    name = validateHostName(b, s, r.pos);
  }
  if (name === null) throw new ClientHelloError("bad_server_name", "no host_name in server_name");
  return name;
}

/** ALPN extension (RFC 7301 3.1): a non-empty list of non-empty names. */
function parseAlpn(b: Uint8Array, start: number, end: number): string[] {
  const r = new Reader(b, start, end, "bad_extension");
  if (end - start < 2) throw new ClientHelloError("bad_extension", "ALPN list cut");
  const listStart = r.vec(2, "ALPN list");
  if (r.pos !== end || r.pos === listStart) {
    throw new ClientHelloError("bad_extension", "ALPN list length does not fill the extension");
  }
  r.pos = listStart;
  const names: string[] = [];
  while (r.pos < end) {
    const len = r.u8("ALPN protocol length");
    if (len === 0) throw new ClientHelloError("bad_extension", "empty ALPN protocol name");
    if (r.pos + len > end) {
      throw new ClientHelloError("bad_extension", `ALPN name length ${len} runs past its list`);
    }
    names.push(latin1String(b, r.pos, r.pos + len));
    r.pos += len;
  }
  return names;
}

/** Checks a host_name's bytes (letters, digits, '-', '_', '.'), returns it normalized. */
function validateHostName(b: Uint8Array, s: number, e: number): string {
  if (s === e) throw new ClientHelloError("bad_server_name", "empty server name");
  if (e - s > 254) {
    throw new ClientHelloError("bad_server_name", `server name of ${e - s} bytes, over 253`);
  }
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
      throw new ClientHelloError(
        "bad_server_name",
        `byte 0x${hex(c)} at ${i - s} in server name is not a letter, digit, '-', '_' or '.'`,
      );
    }
    if (++labelLen > 63) throw new ClientHelloError("bad_server_name", "label over 63 bytes");
  }
  const trimmed = b[e - 1] === 0x2e ? e - 1 : e;
  if (trimmed - s > 253) {
    throw new ClientHelloError("bad_server_name", `server name of ${trimmed - s} bytes, over 253`);
  }
  return latin1String(b, s, trimmed, true);
}

function hex(n: number): string {
  return n.toString(16).padStart(2, "0");
}
