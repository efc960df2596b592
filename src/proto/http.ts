/**
 * Incremental HTTP/1.x request-head parser for plain-HTTP listeners: finds the `Host` header to
 * route by. Bytes arrive in any split; anything that is not an HTTP/1.x request head ends in an
 * {@link HttpRequestError}, and no other exception escapes.
 *
 * Cost: bytes are copied once into one growing buffer (doubling); the search for the blank line
 * resumes where it stopped, so feeding one byte at a time is linear; the head is decoded once.
 *
 * @module
 */
import { HeadParser } from "./headparser.ts";

/** What was wrong with the bytes. */
export type HttpRequestErrorKind =
  /** Not an HTTP/1.x request head (TLS bytes, binary, bad request line or header line). */
  | "not_http"
  /** Host header malformed, repeated, or missing from an HTTP/1.1 request. */
  | "bad_host"
  /** The head is larger than maxBytes. */
  | "too_large"
  /** end() (peer EOF) before the head was complete. */
  | "truncated";

/** A request head the proxy cannot route; `kind` says why, the message names the cause. */
export class HttpRequestError extends Error {
  readonly kind: HttpRequestErrorKind;
  constructor(kind: HttpRequestErrorKind, message: string) {
    super(message);
    this.name = "HttpRequestError";
    this.kind = kind;
  }
}

/** What the proxy needs from a request head. */
export interface HttpRequestHead {
  /**
   * Host without port, lower-cased, no trailing dot, no IPv6 brackets; null when there is no
   * Host header (HTTP/1.0). For an absolute-form target (`GET http://h/ HTTP/1.1`) the target's
   * host, which RFC 9112 3.2.2 says wins over the Host header.
   */
  serverName: string | null;
  /** Bytes of the request head including the blank line. */
  headBytes: number;
}

const LF = 0x0a;
const CR = 0x0d;
const SP = 0x20;
/** Longer methods than this are not worth waiting for: real ones are short. */
const MAX_METHOD = 32;
const INITIAL_BUFFER = 1024;

const latin1 = new TextDecoder("latin1");
const requestLine = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([\x21-\x7e]+) HTTP\/1\.([01])$/;
const headerLine = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*$/;
/** Same rule as the TLS server name: letters, digits, '-', '_'; labels of 1-63; one trailing dot. */
const hostName = /^[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*\.?$/;
const ipv6 = /^[0-9a-f:.]+$/;
const port = /^[0-9]{1,5}$/;
const absoluteTarget = /^https?:\/\/([^/?#]*)/i;

/** Parses one HTTP/1.x request head from bytes as they arrive. */
export class HttpHostParser extends HeadParser<HttpRequestHead> {
  /** The method has been checked (a space followed a valid token). */
  #methodOk = false;
  /** Where the method check resumes. */
  #methodScan = 0;
  /** Where the search for the blank line resumes. */
  #scan = 0;

  /** `maxBytes`: the most bytes the request head may take. */
  constructor(maxBytes = 16384) {
    super(maxBytes, INITIAL_BUFFER);
  }

  protected truncated(): HttpRequestError {
    return new HttpRequestError(
      "truncated",
      `connection ended after ${this.len} bytes, before the request head was complete`,
    );
  }

  protected isParseError(e: unknown): boolean {
    return e instanceof HttpRequestError;
  }

  protected advance(): void {
    if (!this.#methodOk) this.#checkMethod();
    const end = this.#findHeadEnd();
    if (end < 0) {
      if (this.len >= this.maxBytes) {
        throw new HttpRequestError(
          "too_large",
          `request head larger than ${this.maxBytes} bytes (no blank line yet)`,
        );
      }
      return;
    }
    this.result = parseHead(latin1.decode(this.buf.subarray(0, end)), end);
  }

  /** Refuses early what cannot be HTTP (a TLS hello, binary) instead of waiting for a timeout. */
  #checkMethod(): void {
    const b = this.buf;
    const n = Math.min(this.len, MAX_METHOD + 1);
    for (let i = this.#methodScan; i < n; i++) {
      const c = b[i];
      if (c === SP && i > 0) {
        this.#methodOk = true;
        return;
      }
      if (!isTokenByte(c)) {
        throw new HttpRequestError(
          "not_http",
          `not an HTTP/1.x request (byte 0x${c.toString(16).padStart(2, "0")} at ${i})`,
        );
      }
    }
    if (this.len > MAX_METHOD) {
      throw new HttpRequestError("not_http", `HTTP method longer than ${MAX_METHOD} bytes`);
    }
    this.#methodScan = n;
  }

  /** Offset just past the blank line (CRLFCRLF or bare LFs), or -1; looks at each byte once. */
  #findHeadEnd(): number {
    const b = this.buf;
    const limit = Math.min(this.len, this.maxBytes);
    for (let i = Math.max(this.#scan, 1); i < limit; i++) {
      if (b[i] !== LF) continue;
      if (b[i - 1] === LF) return i + 1;
      if (b[i - 1] === CR && i >= 2 && b[i - 2] === LF) return i + 1;
    }
    this.#scan = limit;
    return -1;
  }
}

/** RFC 9110 tchar. */
function isTokenByte(c: number): boolean {
  return (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) ||
    (c > 0x20 && c < 0x7f && "!#$%&'*+-.^_`|~".includes(String.fromCharCode(c)));
}

function parseHead(text: string, headBytes: number): HttpRequestHead {
  const lines = text.split("\n");
  const first = stripCR(lines[0]);
  const req = requestLine.exec(first);
  if (!req) {
    throw new HttpRequestError("not_http", `bad request line "${printable(first)}"`);
  }
  let host: string | null = null;
  // the head ends with two line ends, so the last two entries are empty
  for (let i = 1; i < lines.length - 2; i++) {
    const line = stripCR(lines[i]);
    const h = headerLine.exec(line);
    if (!h) {
      // also refuses obs-fold (a line starting with a space) and space before the colon
      throw new HttpRequestError("not_http", `bad header line ${i}: "${printable(line)}"`);
    }
    if (h[1].length !== 4 || h[1].toLowerCase() !== "host") continue;
    if (host !== null) throw new HttpRequestError("bad_host", "more than one Host header");
    host = h[2];
  }
  const absolute = absoluteTarget.exec(req[2]);
  if (absolute) return { serverName: normalizeHost(absolute[1]), headBytes };
  if (host === null) {
    if (req[3] === "1") throw new HttpRequestError("bad_host", "HTTP/1.1 request without Host");
    return { serverName: null, headBytes };
  }
  return { serverName: normalizeHost(host), headBytes };
}

function stripCR(line: string): string {
  return line.endsWith("\r") ? line.slice(0, -1) : line;
}

function printable(s: string): string {
  const cut = s.length > 80 ? s.slice(0, 80) + "..." : s;
  return cut.replace(/[^\x20-\x7e]/g, "?");
}

/** `host[:port]` or `[v6][:port]` -> the host, lower-cased, without trailing dot or brackets. */
function normalizeHost(value: string): string {
  const bad = (why: string) =>
    new HttpRequestError("bad_host", `bad Host "${printable(value)}": ${why}`);
  let host = value.toLowerCase();
  if (host.startsWith("[")) {
    const close = host.indexOf("]");
    if (close < 0) throw bad("no closing ']'");
    const rest = host.slice(close + 1);
    if (rest !== "" && !(rest.startsWith(":") && port.test(rest.slice(1)))) {
      throw bad("bad port");
    }
    const v6 = host.slice(1, close);
    if (v6 === "" || !ipv6.test(v6) || !v6.includes(":")) throw bad("not an IPv6 address");
    return v6;
  }
  const colon = host.indexOf(":");
  if (colon >= 0) {
    if (!port.test(host.slice(colon + 1))) throw bad("bad port");
    host = host.slice(0, colon);
  }
  if (host === "") throw bad("empty");
  if (!hostName.test(host)) throw bad("not a host name");
  if (host.endsWith(".")) host = host.slice(0, -1);
  if (host.length > 253) throw bad("longer than 253 bytes");
  return host;
}
