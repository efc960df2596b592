/**
 * What parsing a ClientHello gives: the hello the proxy routes by, or the error saying why the
 * bytes are not one (shared by the TLS record parser and the SSLv2-format one).
 *
 * @module
 */
import type { Fingerprints } from "./fingerprint.ts";

/** What was wrong with the bytes. */
export type ClientHelloErrorKind =
  /**
   * First byte not a TLS record type we accept / garbage; an SSLv2-format message that is not a
   * CLIENT-HELLO, or one of an unknown version.
   */
  | "not_tls"
  /** A record that is not a handshake record (alert, application data...) before the hello is done. */
  | "not_handshake"
  /** The handshake message is not a client_hello. */
  | "not_client_hello"
  /**
   * A length field is inconsistent with its container, or a record length is 0 or over 2^14; in
   * an SSLv2-format hello, a length RFC 6101 E.1 does not allow.
   */
  | "bad_length"
  /** Malformed extension block, SNI or ALPN list structure. */
  | "bad_extension"
  /** Empty or illegal server name, or no host_name entry in the SNI list. */
  | "bad_server_name"
  /** More than maxBytes would be needed to complete the hello. */
  | "too_large"
  /** end() (peer EOF) before the hello was complete. */
  | "truncated";

/** A hello the proxy cannot route; `kind` says why, the message names the cause. */
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
  /**
   * SNI host_name, lower-cased, trailing dot removed; null when absent (always in an SSLv2-format
   * hello, which has no extensions). With ECH, the outer name.
   */
  serverName: string | null;
  /** ALPN protocol names in client order ([] when absent). */
  alpn: string[];
  /** The early_data (42) extension is present: the client may send 0-RTT data next. */
  earlyData: boolean;
  /** The encrypted_client_hello (0xfe0d) extension is present. */
  encryptedClientHello: boolean;
  /**
   * Bytes of the TLS records that carried the hello, record headers included (an SSLv2-format
   * hello: its 2-byte header and message). Bytes pushed beyond this are application data the
   * client sent early.
   */
  recordBytes: number;
  /**
   * JA4 and JA3, when the parser was asked for them (an SSLv2-format hello's: see
   * src/proto/fingerprint.ts).
   */
  fingerprints?: Fingerprints;
}
