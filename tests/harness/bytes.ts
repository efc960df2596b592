/**
 * Byte streams in tests: reading to the end (with a hash), exact reads, deterministic and random
 * payloads, and streams whose bytes say where they came from.
 *
 * @module
 */
import { createHash } from "node:crypto";
import { concat, LineSplitter, writeAll } from "../../src/net/bytes.ts";

/** Writes all of `data` to `conn`. */
export { writeAll };

/** Reads until EOF; returns the byte count and sha256 (hex). Read errors propagate. */
export async function drainHash(conn: Deno.Conn): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash("sha256");
  const buf = new Uint8Array(256 * 1024);
  let bytes = 0;
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    hash.update(buf.subarray(0, n));
    bytes += n;
  }
  return { bytes, sha256: hash.digest("hex") };
}

/** Reads until EOF and returns everything. Read errors propagate. */
export async function readToEnd(conn: Deno.Conn): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  const buf = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    parts.push(buf.slice(0, n));
  }
  return concat(...parts);
}

/**
 * What a read on a connection ends with: `"eof"`, `"reset"`/`"error"` (with the error name), or
 * `"data"` when bytes arrive first. Used to assert how the proxy closed a connection.
 */
export async function readOutcome(
  conn: Deno.Conn,
): Promise<{ kind: "eof" | "data" | "error"; error?: string; bytes?: Uint8Array }> {
  const buf = new Uint8Array(16 * 1024);
  try {
    const n = await conn.read(buf);
    if (n === null) return { kind: "eof" };
    return { kind: "data", bytes: buf.slice(0, n) };
  } catch (e) {
    return { kind: "error", error: `${(e as Error).name}: ${(e as Error).message}` };
  }
}

/** sha256 (hex) of `data`. */
export function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Fast deterministic pseudo-random bytes (xorshift32) from `seed`. */
export function pseudoRandomBytes(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  const words = new Uint32Array(out.buffer, 0, n >>> 2);
  let x = (seed >>> 0) || 0x9e3779b9;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  for (let i = words.length * 4; i < n; i++) out[i] = (x >>> (8 * (i & 3))) & 0xff;
  return out;
}

/** Buffered line reader over a connection (for the line protocol of the identity backends). */
export class LineReader {
  readonly #lines = new LineSplitter();
  readonly #chunk = new Uint8Array(4096);
  constructor(readonly conn: Deno.Conn) {}

  /** The next `\n`-terminated line (without `\n`), or null at EOF. */
  async line(): Promise<string | null> {
    for (;;) {
      const line = this.#lines.shift();
      if (line !== null) return line;
      const n = await this.conn.read(this.#chunk);
      if (n === null) return null;
      this.#lines.push(this.#chunk.subarray(0, n));
    }
  }
}

/** Formats host and port as the proxy does: `127.0.0.1:80`, `[::1]:80`. */
export function hostPort(hostname: string, port: number): string {
  return hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`;
}

/** Reads exactly `n` bytes (throws at an early EOF). */
export async function readExact(conn: Deno.Conn, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let have = 0;
  while (have < n) {
    const got = await conn.read(out.subarray(have));
    if (got === null) throw new Error(`EOF after ${have} of ${n} bytes`);
    have += got;
  }
  return out;
}

/** A pool of random bytes to write slices of. */
export function randomPool(bytes: number): Uint8Array {
  const pool = new Uint8Array(bytes);
  for (let off = 0; off < bytes; off += 65536) {
    crypto.getRandomValues(pool.subarray(off, Math.min(off + 65536, bytes)));
  }
  return pool;
}

/**
 * Writes `total` bytes taken from random places of `pool` in random sizes (1 to `maxWrite`);
 * returns their sha256. Closes the write side afterwards when `closeWrite`.
 */
export async function sendRandom(
  conn: Deno.Conn,
  pool: Uint8Array,
  total: number,
  opts: { maxWrite?: number; closeWrite?: boolean } = {},
): Promise<string> {
  const maxWrite = opts.maxWrite ?? 256 * 1024;
  const hash = createHash("sha256");
  let left = total;
  while (left > 0) {
    const len = Math.min(left, 1 + Math.floor(Math.random() * maxWrite));
    const off = Math.floor(Math.random() * (pool.length - len + 1));
    const chunk = pool.subarray(off, off + len);
    hash.update(chunk);
    await writeAll(conn, chunk);
    left -= len;
  }
  if (opts.closeWrite) await (conn as Deno.TcpConn).closeWrite();
  return hash.digest("hex");
}

/**
 * A stream whose every 4-byte word tells its own position: word i is `seed + i` (little
 * endian). A received stream can then say where each of its bytes came from.
 */
export function positionStream(total: number, seed: number): Uint8Array {
  const out = new Uint8Array(total);
  const v = new DataView(out.buffer);
  for (let i = 0; i + 4 <= total; i += 4) v.setUint32(i, (seed + i / 4) >>> 0, true);
  return out;
}

/**
 * Where `got` first differs from a {@linkcode positionStream} `expected` (made with `seed`),
 * and where the bytes found there came from: tells lost, reordered and foreign bytes apart.
 */
export function describeMismatch(
  expected: Uint8Array,
  got: Uint8Array,
  seed: number,
  otherSeeds: number[] = [],
): string {
  const n = Math.min(expected.length, got.length);
  let off = 0;
  while (off < n && expected[off] === got[off]) off++;
  if (off === n && expected.length === got.length) return "identical";
  const head = `${got.length} of ${expected.length} bytes; first difference at ${off}`;
  if (off === got.length) return `${head}: truncated, the last ${expected.length - off} never came`;
  const word = off & ~3;
  if (word + 4 > got.length) return `${head}: a partial word at the end`;
  const value = new DataView(got.buffer, got.byteOffset).getUint32(word, true);
  const from = ((value - seed) >>> 0) * 4;
  if (from < expected.length) {
    return `${head}: the bytes there were sent at ${from} (${
      from > word ? "skipped" : "repeated"
    } ${Math.abs(from - word)} bytes)`;
  }
  for (const [k, other] of otherSeeds.entries()) {
    const at = ((value - other) >>> 0) * 4;
    if (at < expected.length) {
      return `${head}: the bytes there are from another connection's stream (#${k}, offset ${at})`;
    }
  }
  return `${head}: the bytes there were never sent (word 0x${value.toString(16)})`;
}

/**
 * Writes `data` in random sizes (1 to `maxWrite`), then closes the write side when
 * `closeWrite`.
 */
export async function writeRandomSizes(
  conn: Deno.Conn,
  data: Uint8Array,
  opts: { maxWrite?: number; closeWrite?: boolean } = {},
): Promise<void> {
  const maxWrite = opts.maxWrite ?? 256 * 1024;
  for (let off = 0; off < data.length;) {
    const len = Math.min(data.length - off, 1 + Math.floor(Math.random() * maxWrite));
    await writeAll(conn, data.subarray(off, off + len));
    off += len;
  }
  if (opts.closeWrite) await (conn as Deno.TcpConn).closeWrite();
}
