/**
 * The frames of a decrypted QUIC Initial packet (RFC 9000 12.4, 19) and the reassembly of the
 * CRYPTO stream they carry, across packets and datagrams, in any order, with duplicates and
 * overlaps, within a byte bound and a bound on the number of separate pieces.
 *
 * @module
 */
import { VarintCursor } from "./quic_header.ts";

const FRAME_PADDING = 0x00;
const FRAME_PING = 0x01;
const FRAME_ACK = 0x02;
const FRAME_ACK_ECN = 0x03;
const FRAME_CRYPTO = 0x06;
/** CONNECTION_CLOSE of the transport; the application's (0x1d) is not allowed in an Initial. */
const FRAME_CONNECTION_CLOSE = 0x1c;

/** A frame that is malformed or not allowed in an Initial packet. */
export class FrameError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FrameError";
  }
}

/** What an Initial packet's frames hold for the reader. */
export interface InitialFrames {
  /** CRYPTO frames as offset/data pairs; data are views into the decrypted payload. */
  crypto: { offset: number; data: Uint8Array }[];
  /** The client closed the connection: its error code and reason. */
  close: { code: number; reason: string } | null;
}

const latin1 = new TextDecoder("latin1");

/** Reads a varint that must be there; a FrameError naming `what` when it is not. */
function need(c: VarintCursor, what: string): number {
  const v = c.varint();
  if (v < 0) throw new FrameError(`${what} runs past the packet`);
  return v;
}

/** Parses the frames of a decrypted Initial payload; throws a FrameError on a bad one. */
export function parseInitialFrames(p: Uint8Array): InitialFrames {
  if (p.length === 0) throw new FrameError("packet without frames");
  const out: InitialFrames = { crypto: [], close: null };
  const c = new VarintCursor(p, 0, p.length);
  while (c.pos < p.length) {
    if (p[c.pos] === FRAME_PADDING) {
      c.pos++;
      continue;
    }
    const type = need(c, "frame type");
    switch (type) {
      case FRAME_PING:
        break;
      case FRAME_ACK:
      case FRAME_ACK_ECN:
        skipAck(c, type === FRAME_ACK_ECN);
        break;
      case FRAME_CRYPTO: {
        const offset = need(c, "CRYPTO offset");
        const length = need(c, "CRYPTO length");
        if (c.pos + length > p.length) {
          throw new FrameError(`CRYPTO data of ${length} bytes runs past the packet`);
        }
        out.crypto.push({ offset, data: p.subarray(c.pos, c.pos + length) });
        c.pos += length;
        break;
      }
      case FRAME_CONNECTION_CLOSE: {
        const code = need(c, "CONNECTION_CLOSE error code");
        need(c, "CONNECTION_CLOSE frame type");
        const len = need(c, "CONNECTION_CLOSE reason length");
        if (c.pos + len > p.length) throw new FrameError("CONNECTION_CLOSE reason runs past");
        out.close = { code, reason: latin1.decode(p.subarray(c.pos, c.pos + len)) };
        c.pos += len;
        break;
      }
      default:
        throw new FrameError(`frame type 0x${type.toString(16)} is not allowed in an Initial`);
    }
  }
  return out;
}

/** Skips an ACK frame's fields (RFC 9000 19.3); every field is a varint. */
function skipAck(c: VarintCursor, ecn: boolean): void {
  need(c, "ACK largest acknowledged");
  need(c, "ACK delay");
  const ranges = need(c, "ACK range count");
  need(c, "ACK first range");
  // each range takes at least 2 bytes, so a huge count ends at the packet's end, not in a hang
  for (let i = 0; i < ranges; i++) {
    need(c, "ACK gap");
    need(c, "ACK range length");
  }
  if (ecn) { for (let i = 0; i < 3; i++) need(c, "ACK ECN count"); }
}

/** Why the CRYPTO stream cannot be kept. */
export class CryptoLimitError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CryptoLimitError";
  }
}

const FIRST_BUFFER = 2048;

/**
 * The CRYPTO stream's bytes from offset 0 as they arrive: one buffer (doubling, never past
 * `maxBytes`) and the received ranges, kept sorted and merged. Data sent again at an offset
 * must be the same (RFC 9000 2.2); the first copy is kept.
 */
export class CryptoAssembler {
  #buf = new Uint8Array(0);
  /** Received ranges as sorted, disjoint, non-adjacent [start, end) pairs. */
  #ranges: number[] = [];

  constructor(readonly maxBytes: number, readonly maxRanges: number) {}

  /** Bytes received from offset 0 without a gap. */
  get contiguous(): number {
    return this.#ranges.length > 0 && this.#ranges[0] === 0 ? this.#ranges[1] : 0;
  }

  /** The first `n` bytes of the stream (n <= contiguous), a view valid until the next add. */
  prefix(n: number): Uint8Array {
    return this.#buf.subarray(0, n);
  }

  /**
   * Adds `data` at stream `offset`; throws a CryptoLimitError when it would end past `maxBytes`
   * or leave more than `maxRanges` separate pieces.
   */
  add(offset: number, data: Uint8Array): void {
    if (data.length === 0) return;
    const end = offset + data.length;
    if (end > this.maxBytes) {
      throw new CryptoLimitError(
        `CRYPTO data up to byte ${end}, over the ${this.maxBytes} allowed`,
      );
    }
    this.#grow(end);
    this.#copyGaps(offset, data);
    this.#merge(offset, end);
    if (this.#ranges.length / 2 > this.maxRanges) {
      throw new CryptoLimitError(`CRYPTO data in over ${this.maxRanges} separate pieces`);
    }
  }

  #grow(end: number): void {
    if (end <= this.#buf.length) return;
    let cap = Math.max(this.#buf.length * 2, FIRST_BUFFER);
    while (cap < end) cap *= 2;
    const next = new Uint8Array(Math.min(cap, this.maxBytes));
    next.set(this.#buf);
    this.#buf = next;
  }

  /** Copies the parts of [offset, offset + data.length) not received yet. */
  #copyGaps(offset: number, data: Uint8Array): void {
    const end = offset + data.length;
    const r = this.#ranges;
    let at = offset;
    for (let i = 0; i < r.length && at < end; i += 2) {
      if (r[i + 1] <= at) continue;
      if (r[i] >= end) break;
      if (r[i] > at) this.#buf.set(data.subarray(at - offset, r[i] - offset), at);
      at = r[i + 1];
    }
    if (at < end) this.#buf.set(data.subarray(at - offset), at);
  }

  /** Inserts [start, end) into the ranges, joining the ones it touches. */
  #merge(start: number, end: number): void {
    const r = this.#ranges;
    let i = 0;
    while (i < r.length && r[i + 1] < start) i += 2;
    let j = i;
    while (j < r.length && r[j] <= end) {
      start = Math.min(start, r[j]);
      end = Math.max(end, r[j + 1]);
      j += 2;
    }
    r.splice(i, j - i, start, end);
  }
}
