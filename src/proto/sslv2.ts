/**
 * The SSLv2-compatible ClientHello (RFC 6101 Appendix E.1, RFC 5246 Appendix E.2): the v2-format
 * CLIENT-HELLO old clients send to find out whether the server speaks SSL 3.0 / TLS. It cannot
 * carry extensions, so it has no server name and no ALPN: the proxy routes it like any hello
 * without a name (`default_backend`, else no route) and forwards its bytes unchanged, as nginx
 * `stream` does.
 *
 * Layout: a 2-byte length with the high bit set (so at most 2^15-1 bytes follow), msg_type 1,
 * version (2 bytes), cipher_spec_length, session_id_length and challenge_length (2 bytes each),
 * then the cipher specs (3 bytes each), the session id and the challenge.
 *
 * @module
 */
import { sslv2Fingerprints } from "./fingerprint.ts";
import { type ClientHello, ClientHelloError } from "./hello.ts";

/** The 2-byte length and the fixed fields up to challenge_length. */
const HEADER = 11;
const MSG_CLIENT_HELLO = 1;

/** Whether `b[0, len)` starts as a v2-format record: the length's high bit is set. */
export function isSslv2Start(b: Uint8Array, len: number): boolean {
  return len > 0 && (b[0] & 0x80) !== 0;
}

/**
 * The v2-format hello in `b[0, len)` (which {@link isSslv2Start}), or null until all its bytes
 * are there. Each field is checked as soon as it is in: a message other than CLIENT-HELLO or an
 * unknown version is `not_tls`, lengths RFC 6101 does not allow are `bad_length`, a message that
 * would need more than `maxBytes` is `too_large`.
 * @throws {ClientHelloError}
 */
export function parseSslv2Hello(
  b: Uint8Array,
  len: number,
  maxBytes: number,
  fingerprint: boolean,
): ClientHello | null {
  if (len < 3) return null;
  if (b[2] !== MSG_CLIENT_HELLO) {
    throw new ClientHelloError("not_tls", `not TLS (first byte 0x${b[0].toString(16)})`);
  }
  const total = 2 + (((b[0] & 0x7f) << 8) | b[1]);
  if (total > maxBytes) {
    throw new ClientHelloError(
      "too_large",
      `SSLv2-format ClientHello of ${total} bytes does not fit in ${maxBytes} bytes`,
    );
  }
  if (len < 5) return null;
  const version = (b[3] << 8) | b[4];
  // SSL 2.0 itself, or SSL 3.0 to TLS 1.3 announced in the v2 format
  if (version !== 0x0002 && (b[3] !== 3 || b[4] > 4)) {
    throw new ClientHelloError(
      "not_tls",
      `SSLv2-format hello of unknown version 0x${hex4(version)}`,
    );
  }
  if (len < HEADER) return null;
  const specs = (b[5] << 8) | b[6];
  const sessionId = (b[7] << 8) | b[8];
  const challenge = (b[9] << 8) | b[10];
  if (specs === 0 || specs % 3 !== 0) {
    throw new ClientHelloError("bad_length", `cipher_spec_length ${specs} is zero or not 3n`);
  }
  if (sessionId !== 0 && sessionId !== 16) {
    throw new ClientHelloError("bad_length", `session_id_length ${sessionId}, not 0 or 16`);
  }
  if (challenge < 16 || challenge > 32) {
    throw new ClientHelloError("bad_length", `challenge_length ${challenge}, not 16 to 32`);
  }
  if (HEADER + specs + sessionId + challenge !== total) {
    throw new ClientHelloError(
      "bad_length",
      `SSLv2-format hello of ${total} bytes holds ${HEADER + specs + sessionId + challenge}`,
    );
  }
  if (len < total) return null;
  const hello: ClientHello = {
    serverName: null,
    alpn: [],
    earlyData: false,
    encryptedClientHello: false,
    recordBytes: total,
  };
  if (fingerprint) {
    hello.fingerprints = sslv2Fingerprints(version, b.subarray(HEADER, HEADER + specs));
  }
  return hello;
}

function hex4(n: number): string {
  return n.toString(16).padStart(4, "0");
}
