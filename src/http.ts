/**
 * Incremental HTTP/1.x request-head parser for plain-HTTP listeners: finds the `Host` header
 * to route by. Bytes arrive in any split; anything that is not an HTTP/1.x request ends in an
 * {@link HttpRequestError}.
 *
 * @module
 */

/** What was wrong with the bytes. */
export type HttpRequestErrorKind = "not_http" | "bad_host" | "too_large" | "truncated";

/** A request head the proxy cannot route; `kind` says why. */
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
  /** Host without port, lower-cased, no trailing dot, no IPv6 brackets; null without Host. */
  serverName: string | null;
  /** Bytes of the request head including the blank line. */
  headBytes: number;
}

const latin1 = new TextDecoder("latin1");
const requestLine = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^\s]+ HTTP\/1\.[01]$/;
const hostName = /^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$/;

/** Parses one HTTP/1.x request head from bytes as they arrive. */
export class HttpHostParser {
  readonly #max: number;
  #buf = new Uint8Array(1024);
  #len = 0;
  /** Where the search for the blank line resumes. */
  #scan = 0;
  #result: HttpRequestHead | null = null;

  /** `maxBytes`: the most bytes the request head may take. */
  constructor(maxBytes = 16384) {
    this.#max = maxBytes;
  }

  /** Every byte pushed so far, unchanged (a view, valid until the next push). */
  get data(): Uint8Array {
    return this.#buf.subarray(0, this.#len);
  }

  /** Feeds the next bytes; returns the head once complete, else null. Throws HttpRequestError. */
  push(chunk: Uint8Array): HttpRequestHead | null {
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
    if (this.#result) return this.#result;
    this.#checkMethod();
    const end = this.#findHeadEnd();
    if (end < 0) {
      if (this.#len > this.#max) {
        throw new HttpRequestError("too_large", `request head larger than ${this.#max} bytes`);
      }
      return null;
    }
    if (end > this.#max) {
      throw new HttpRequestError("too_large", `request head larger than ${this.#max} bytes`);
    }
    this.#result = parseHead(latin1.decode(this.#buf.subarray(0, end)), end);
    return this.#result;
  }

  /** The peer ended its side: returns the head if complete, else throws `truncated`. */
  end(): HttpRequestHead {
    if (this.#result) return this.#result;
    throw new HttpRequestError(
      "truncated",
      `connection ended after ${this.#len} bytes, before the request head was complete`,
    );
  }

  /** Refuses early what cannot be HTTP (a TLS hello, binary) instead of waiting for a timeout. */
  #checkMethod(): void {
    const b = this.#buf;
    for (let i = 0; i < this.#len && i < 32; i++) {
      const c = b[i];
      if (c === 0x20 && i > 0) return;
      const token = c > 0x20 && c < 0x7f && c !== 0x22 && c !== 0x28 && c !== 0x29 &&
        c !== 0x2c && c !== 0x2f && c !== 0x3a && c !== 0x3b && c !== 0x3c && c !== 0x3d &&
        c !== 0x3e && c !== 0x3f && c !== 0x40 && c !== 0x5b && c !== 0x5c && c !== 0x5d &&
        c !== 0x7b && c !== 0x7d;
      if (!token) throw new HttpRequestError("not_http", "not an HTTP/1.x request");
    }
    if (this.#len >= 32) throw new HttpRequestError("not_http", "HTTP method too long");
  }

  /** Offset just past the blank line (CRLFCRLF or LFLF), or -1. */
  #findHeadEnd(): number {
    const b = this.#buf;
    for (let i = Math.max(this.#scan, 1); i < this.#len; i++) {
      if (b[i] !== 0x0a) continue;
      if (b[i - 1] === 0x0a) return i + 1;
      if (b[i - 1] === 0x0d && i >= 3 && b[i - 2] === 0x0a) return i + 1;
    }
    this.#scan = this.#len;
    return -1;
  }
}

function parseHead(text: string, headBytes: number): HttpRequestHead {
  const lines = text.split(/\r?\n/);
  if (!requestLine.test(lines[0])) {
    throw new HttpRequestError("not_http", "bad request line");
  }
  let host: string | null = null;
  for (let i = 1; i < lines.length; i++) {
    const line = lines[i];
    if (line === "") continue;
    const colon = line.indexOf(":");
    if (colon <= 0) throw new HttpRequestError("not_http", `bad header line ${i}`);
    if (line.slice(0, colon).toLowerCase() !== "host") continue;
    if (host !== null) throw new HttpRequestError("bad_host", "more than one Host header");
    host = line.slice(colon + 1).trim();
  }
  return { serverName: host === null ? null : normalizeHost(host), headBytes };
}

function normalizeHost(value: string): string {
  let host = value.toLowerCase();
  if (host.startsWith("[")) {
    const close = host.indexOf("]");
    const rest = host.slice(close + 1);
    if (close < 0 || (rest !== "" && !/^:[0-9]{1,5}$/.test(rest))) {
      throw new HttpRequestError("bad_host", `bad Host "${value}"`);
    }
    const v6 = host.slice(1, close);
    if (!/^[0-9a-f:.]+$/.test(v6)) throw new HttpRequestError("bad_host", `bad Host "${value}"`);
    return v6;
  }
  const colon = host.lastIndexOf(":");
  if (colon >= 0) {
    if (!/^[0-9]{1,5}$/.test(host.slice(colon + 1))) {
      throw new HttpRequestError("bad_host", `bad port in Host "${value}"`);
    }
    host = host.slice(0, colon);
  }
  if (host === "" || host.length > 254 || !hostName.test(host)) {
    throw new HttpRequestError("bad_host", `bad Host "${value}"`);
  }
  return host.endsWith(".") ? host.slice(0, -1) : host;
}
