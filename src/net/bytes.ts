/**
 * Byte and stream helpers every module shares: joining byte arrays, short byte strings as text,
 * writing a buffer whole, splitting a byte stream into lines.
 * @module
 */

/** The bytes of `parts`, one after the other, in a new array. */
export function concat(...parts: Uint8Array[]): Uint8Array<ArrayBuffer> {
  let total = 0;
  for (const p of parts) total += p.length;
  const out = new Uint8Array(total);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Characters made at once from a byte string (a host name fits in one go). */
const TEXT_STEP = 256;
const textStep = new Uint16Array(TEXT_STEP);

/**
 * Bytes `start`..`end` of `b` as a string, one character per byte (ISO-8859-1); `lower`: ASCII
 * letters in lower case (a host name: DNS names compare case-insensitively). Made in JS, not by
 * a TextDecoder: for a name that costs less than the decoder's call.
 */
export function latin1String(b: Uint8Array, start: number, end: number, lower = false): string {
  let out = "";
  for (let at = start; at < end; at += TEXT_STEP) {
    const n = Math.min(TEXT_STEP, end - at);
    for (let i = 0; i < n; i++) {
      const c = b[at + i];
      textStep[i] = lower && c >= 0x41 && c <= 0x5a ? c | 0x20 : c;
    }
    out += String.fromCharCode.apply(null, textStep.subarray(0, n) as unknown as number[]);
  }
  return out;
}

/** Something write() takes some bytes of (a conn, a TLS conn). */
export interface ByteWriter {
  write(p: Uint8Array): Promise<number>;
}

/** Writes all of `data` to `w` (one write() may take fewer bytes than given). */
export async function writeAll(w: ByteWriter, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await w.write(data.subarray(off));
}

/** Splits text arriving in chunks into lines (without the `\n`). */
export class LineSplitter {
  readonly #decoder = new TextDecoder();
  #rest = "";

  /** Adds a chunk (bytes are decoded as UTF-8 across chunks). */
  push(chunk: Uint8Array | string): void {
    this.#rest += typeof chunk === "string" ? chunk : this.#decoder.decode(chunk, { stream: true });
  }

  /** The next complete line already pushed, or null. */
  shift(): string | null {
    const nl = this.#rest.indexOf("\n");
    if (nl < 0) return null;
    const line = this.#rest.slice(0, nl);
    this.#rest = this.#rest.slice(nl + 1);
    return line;
  }

  /** What follows the last `\n` (at the end of the stream: a last line without one). */
  get rest(): string {
    return this.#rest;
  }
}

/** Splits a byte stream into lines (without the newline); a last line may lack one. */
export async function* lines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  const splitter = new LineSplitter();
  for await (const chunk of stream) {
    splitter.push(chunk);
    for (let line; (line = splitter.shift()) !== null;) yield line;
  }
  if (splitter.rest) yield splitter.rest;
}
