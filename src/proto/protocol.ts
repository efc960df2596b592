/**
 * Listener protocols as values: what a session needs to know of TLS or plain HTTP (how the first
 * bytes are parsed, what the head is called in logs, what a refused client is sent) is one
 * {@link Protocol}, so the session has no branch per protocol. The config names a listener's
 * protocol; {@link PROTOCOLS} maps that name to its value once.
 *
 * @module
 */
import { type ClientHello, ClientHelloError, ClientHelloParser } from "./clienthello.ts";
import { HttpHostParser, HttpRequestError } from "./http.ts";

/** A message head as sessions route by it. */
export interface Head {
  /** The name to route by (SNI, or the `Host`); null when the client sent none. */
  serverName: string | null;
}

/** An incremental parser of a connection's head (see src/proto/headparser.ts). */
export interface HeadReader {
  /** Feeds the next bytes; returns the head once complete, else null. Throws a head error. */
  push(chunk: Uint8Array): Head | null;
  /** The peer ended its side: returns the head if complete, else throws a head error. */
  end(): Head;
  /** Every byte pushed so far, unchanged, in order (a view, valid until the next push). */
  readonly data: Uint8Array;
}

/** A head the proxy cannot route: the parser's error, with its kind for the metrics. */
export type HeadError = ClientHelloError | HttpRequestError;

/**
 * Why a client is refused, in protocol-neutral words; each protocol says it its own way:
 * `misdirected`: no route takes the name (or the backend's address is refused);
 * `unavailable`: no backend of the route is up or free; `forbidden`: refused by the client's
 * fingerprint; `timed_out`: the backend connected but did not take the client's first bytes in
 * time.
 */
export type Refusal = "misdirected" | "unavailable" | "forbidden" | "timed_out";

/** One listener protocol. */
export interface Protocol {
  /** As the config names it. */
  readonly name: "tls" | "http";
  /** What its head is called in log lines. */
  readonly headName: string;
  /**
   * A parser for one connection's head, of at most `maxBytes`; `fingerprint`: also compute the
   * client's fingerprints (where the protocol has them).
   */
  parser(options: { maxBytes: number; fingerprint: boolean }): HeadReader;
  /** The ClientHello behind a head this protocol parsed; null when it has none. */
  hello(head: Head): ClientHello | null;
  /** Whether `e` is this protocol's head error (a head the proxy cannot route). */
  isHeadError(e: unknown): e is HeadError;
  /** The bytes a refused client is sent, before its connection is closed. */
  readonly refusals: Readonly<Record<Refusal, Uint8Array>>;
}

/** A TLS fatal alert record with `description`. */
function tlsAlert(description: number): Uint8Array {
  return new Uint8Array([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]);
}

/** An HTTP/1.1 response without a body that closes the connection. */
function httpStatus(status: string): Uint8Array {
  return new TextEncoder().encode(
    `HTTP/1.1 ${status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n`,
  );
}

/** TLS: routed by the ClientHello's SNI; refusals are fatal alerts. */
export const TLS: Protocol = {
  name: "tls",
  headName: "ClientHello",
  parser: ({ maxBytes, fingerprint }) => new ClientHelloParser(maxBytes, fingerprint),
  hello: (head) => head as ClientHello,
  isHeadError: (e): e is HeadError => e instanceof ClientHelloError,
  refusals: {
    misdirected: tlsAlert(112), // unrecognized_name
    unavailable: tlsAlert(80), // internal_error
    forbidden: tlsAlert(40), // handshake_failure
    timed_out: tlsAlert(80), // internal_error: TLS has no alert for a server that timed out
  },
};

/** Plain HTTP/1.x: routed by the request head's `Host`; refusals are HTTP responses. */
export const HTTP: Protocol = {
  name: "http",
  headName: "HTTP request",
  parser: ({ maxBytes }) => new HttpHostParser(maxBytes),
  hello: () => null,
  isHeadError: (e): e is HeadError => e instanceof HttpRequestError,
  refusals: {
    misdirected: httpStatus("421 Misdirected Request"),
    unavailable: httpStatus("503 Service Unavailable"),
    // a request head has no fingerprint, so no HTTP client is refused by one
    forbidden: httpStatus("403 Forbidden"),
    timed_out: httpStatus("504 Gateway Timeout"),
  },
};

/** The protocol of each name the config uses. */
export const PROTOCOLS: Readonly<Record<Protocol["name"], Protocol>> = { tls: TLS, http: HTTP };
