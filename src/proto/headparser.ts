/**
 * What the ClientHello and HTTP request-head parsers share: the bytes of one message head,
 * collected as they arrive, and the push/end protocol around an incremental parse.
 *
 * @module
 */

/** Collects a message head's bytes and drives a subclass's incremental parse over them. */
export abstract class HeadParser<T> {
  /** The most bytes the head may take. */
  protected readonly maxBytes: number;
  /** The bytes pushed so far are `buf[0, len)`. */
  protected buf: Uint8Array = new Uint8Array(0);
  protected len = 0;
  /** Set by advance() once the head is complete. */
  protected result: T | null = null;
  #error: Error | null = null;
  readonly #initialBuffer: number;

  /**
   * `maxBytes`: the most bytes the head may take; `initialBuffer`: the buffer's size once the
   * head needs more than its first read.
   */
  constructor(maxBytes: number, initialBuffer: number) {
    this.maxBytes = Number.isFinite(maxBytes) && maxBytes > 0 ? Math.floor(maxBytes) : 0;
    this.#initialBuffer = initialBuffer;
  }

  /** Every byte pushed so far, unchanged, in order (a view, valid until the next push). */
  get data(): Uint8Array {
    return this.buf.subarray(0, this.len);
  }

  /**
   * Feeds the next bytes (any split). Returns the head once complete, else null; after
   * completion the bytes are still appended to {@link data} and the same head is returned.
   * Throws the parser's error (again on every later call once it has thrown).
   */
  push(chunk: Uint8Array): T | null {
    this.#append(chunk);
    if (this.result) return this.result;
    if (this.#error) throw this.#error;
    try {
      this.advance();
    } catch (e) {
      if (this.isParseError(e)) this.#error = e as Error;
      throw e;
    }
    return this.result;
  }

  /** The peer ended its side: returns the head if complete, else throws `truncated()`. */
  end(): T {
    if (this.result) return this.result;
    if (this.#error) throw this.#error;
    throw this.truncated();
  }

  /** Parses what `buf[0, len)` holds now; sets `result` once the head is complete. */
  protected abstract advance(): void;

  /** The error for a peer that ended its side before the head was complete. */
  protected abstract truncated(): Error;

  /** Whether `e` is this parser's own error (kept, and thrown again on later calls). */
  protected abstract isParseError(e: unknown): boolean;

  #append(chunk: Uint8Array): void {
    const need = this.len + chunk.length;
    if (need > this.buf.length) {
      // the first read takes a buffer of its own size: a head that comes in one read (most do)
      // is then held at its length for as long as its bytes are (until forwarded, or longer);
      // one that comes in pieces grows by doubling from there
      let cap = this.len === 0 ? need : Math.max(this.buf.length * 2, this.#initialBuffer);
      while (cap < need) cap *= 2;
      const next = new Uint8Array(cap);
      next.set(this.buf.subarray(0, this.len));
      this.buf = next;
    }
    this.buf.set(chunk, this.len);
    this.len = need;
  }
}
