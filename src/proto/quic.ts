/**
 * Reads the TLS ClientHello out of a QUIC client's first datagrams, without terminating QUIC:
 * the proxy routes a QUIC flow by the hello's server name as it routes TLS over TCP.
 *
 * A {@link QuicInitialReader} takes one flow's datagrams as they arrive. From the first Initial
 * packet it takes the version (v1 or v2) and the Destination Connection ID the client chose,
 * derives that connection's Initial keys once, and then, for every Initial packet of every
 * datagram (several coalesced in one datagram too): removes header protection, decrypts into a
 * copy, reads the frames and puts the CRYPTO data together, in any order and with repeats. Once
 * the CRYPTO stream holds a whole ClientHello from offset 0, it is parsed by the TLS parser
 * (src/proto/clienthello.ts), with fingerprints whose JA4 starts with `q`.
 *
 * {@link classifyDatagram} (src/proto/quic_header.ts) tells, without crypto, which datagrams
 * are worth pushing: only a flow not routed yet needs any of this.
 *
 * The datagrams pushed are never modified (the proxy forwards them as they are), and nothing of
 * them is kept past push(): the caller may reuse its receive buffer. No exception escapes.
 *
 * Bounds: the CRYPTO stream may not reach past `maxBytes`, come in more than `maxPieces`
 * separate pieces, or take more than `maxPackets` Initial packets; past any, "too_large".
 *
 * @module
 */
import { type ClientHello, ClientHelloError, parseClientHelloMessage } from "./clienthello.ts";
import { InitialOpener } from "./quic_crypto.ts";
import {
  CryptoAssembler,
  CryptoLimitError,
  FrameError,
  type InitialFrames,
  parseInitialFrames,
} from "./quic_frames.ts";
import { type LongHeader, MIN_INITIAL_DATAGRAM, parseLongHeader } from "./quic_header.ts";

export {
  classifyDatagram,
  type DatagramKind,
  isKnownVersion,
  isQuicV1,
  type LongHeaderIds,
  longHeaderIds,
  MIN_INITIAL_DATAGRAM,
  QUIC_V1,
  QUIC_V2,
} from "./quic_header.ts";

/** Why the datagrams do not give a hello. */
export type QuicBadReason =
  /** A length in the first packet's header runs past the datagram. */
  | "truncated"
  /** The datagram does not start with a QUIC long-header Initial (short header, Retry, junk). */
  | "not_initial"
  /** A long header of a version other than QUIC v1 and v2. */
  | "wrong_version"
  /** An Initial in a datagram under 1200 bytes, which a server must drop (RFC 9000 14.1). */
  | "small_datagram"
  /** An Initial of another connection (another Destination Connection ID or version). */
  | "other_connection"
  /** No Initial packet of the datagram decrypts with the connection's Initial keys. */
  | "undecryptable"
  /** A decrypted Initial holds a malformed frame or one not allowed in an Initial. */
  | "bad_frame"
  /** The client closed the connection (CONNECTION_CLOSE) before its hello was whole. */
  | "closed"
  /** The hello would take more than maxBytes, maxPieces or maxPackets. */
  | "too_large"
  /** The CRYPTO stream is not a valid ClientHello (see src/proto/clienthello.ts). */
  | "bad_hello";

/** What one push() gives. */
export type QuicReadResult =
  /** The hello is not whole yet: wait for the flow's next datagram. */
  | { kind: "more" }
  | {
    kind: "hello";
    hello: ClientHello;
    version: number;
    /** The client's first Destination Connection ID (a copy). */
    dcid: Uint8Array;
    /** The client's Source Connection ID (a copy). */
    scid: Uint8Array;
  }
  | {
    kind: "bad";
    reason: QuicBadReason;
    message: string;
    /**
     * The reader is done: every later push() gives this result again. When false, the
     * datagram was left out and the reader is as before it (a stray or spoofed datagram does
     * not end a flow).
     */
    final: boolean;
  };

/** Options of a {@link QuicInitialReader}. */
export interface QuicReaderOptions {
  /** The most bytes the ClientHello may take (e.g. limits.max_client_hello_bytes). */
  maxBytes: number;
  /** The most Initial packets decrypted for one hello (default 16). */
  maxPackets?: number;
  /** The most separate pieces the CRYPTO data may be in at a time (default 32). */
  maxPieces?: number;
  /** Also compute the hello's JA4 (QUIC form, `q...`) and JA3. */
  fingerprint?: boolean;
}

const MORE: QuicReadResult = { kind: "more" };

/** Reads one flow's ClientHello from its first datagrams. */
export class QuicInitialReader {
  readonly #crypto: CryptoAssembler;
  readonly #maxPackets: number;
  readonly #fingerprint: boolean;
  /** The connection's keys, once one of its Initials has decrypted. */
  #opener: InitialOpener | null = null;
  #tried: InitialOpener | null = null;
  #scid: Uint8Array | null = null;
  #largestPn = -1;
  #packets = 0;
  #done: QuicReadResult | null = null;

  constructor(opts: QuicReaderOptions) {
    const maxBytes = Number.isFinite(opts.maxBytes) && opts.maxBytes > 0 ? opts.maxBytes : 0;
    this.#crypto = new CryptoAssembler(Math.floor(maxBytes), opts.maxPieces ?? 32);
    this.#maxPackets = opts.maxPackets ?? 16;
    this.#fingerprint = opts.fingerprint ?? false;
  }

  /** Initial packets decrypted so far. */
  get packets(): number {
    return this.#packets;
  }

  /** Takes the flow's next datagram (not modified, not kept). */
  push(datagram: Uint8Array): QuicReadResult {
    if (this.#done) return this.#done;
    const first = parseLongHeader(datagram, 0);
    if (typeof first === "string") return firstPacketFailure(datagram, first);
    if (first.type !== "initial") {
      return bad("not_initial", `a ${first.type} packet, not an Initial`);
    }
    const opener = this.#opener;
    if (opener && !sameConnection(opener, datagram, first)) {
      return bad("other_connection", "an Initial of another Destination Connection ID or version");
    }
    if (datagram.length < MIN_INITIAL_DATAGRAM) {
      return bad(
        "small_datagram",
        `an Initial in a datagram of ${datagram.length} bytes, under ${MIN_INITIAL_DATAGRAM}`,
      );
    }
    return this.#packetsOf(datagram, first, opener ?? this.#candidate(datagram, first));
  }

  /**
   * The keys for a flow whose Initials have not decrypted yet: those of the last datagram
   * tried when it had the same connection ID, so repeated bad datagrams cost no new derivation.
   */
  #candidate(b: Uint8Array, first: LongHeader): InitialOpener {
    const tried = this.#tried;
    if (tried && sameConnection(tried, b, first)) return tried;
    this.#tried = new InitialOpener(first.version, dcidOf(b, first));
    return this.#tried;
  }

  /** Decrypts and takes in every Initial of the datagram that belongs to the connection. */
  #packetsOf(b: Uint8Array, first: LongHeader, opener: InitialOpener): QuicReadResult {
    const frames: InitialFrames[] = [];
    let largest = this.#largestPn;
    for (let h: LongHeader | string = first; typeof h !== "string";) {
      if (h.type === "initial") {
        if (this.#packets + frames.length >= this.#maxPackets) {
          return this.#final(
            "too_large",
            `ClientHello not whole after ${this.#maxPackets} Initial packets`,
          );
        }
        const opened = opener.open(b, h.start, h.pnOffset, h.end, largest);
        // a coalesced packet that does not decrypt is dropped alone (RFC 9000 12.2)
        if (opened) {
          if (opened.firstByte & 0x0c) {
            return this.#final("bad_frame", "reserved header bits set in a decrypted Initial");
          }
          try {
            frames.push(parseInitialFrames(opened.payload));
          } catch (e) {
            if (!(e instanceof FrameError)) throw e;
            return this.#final("bad_frame", e.message);
          }
          largest = Math.max(largest, opened.pn);
        }
      }
      if (h.end >= b.length || h.type === "retry") break;
      h = parseLongHeader(b, h.end);
      // a later packet of another connection, or padding after the packets, is left out
      if (typeof h !== "string" && !sameConnection(opener, b, h)) break;
    }
    if (frames.length === 0) {
      return bad("undecryptable", "no Initial of the datagram decrypts with the Initial keys");
    }
    this.#opener = opener;
    this.#tried = null;
    this.#scid ??= b.slice(first.scidOff, first.scidOff + first.scidLen);
    this.#largestPn = largest;
    this.#packets += frames.length;
    return this.#take(frames);
  }

  /** Adds the CRYPTO data of decrypted packets; the hello once it is whole. */
  #take(packets: InitialFrames[]): QuicReadResult {
    try {
      for (const f of packets) {
        if (f.close) {
          return this.#final(
            "closed",
            `the client closed the connection (error 0x${
              f.close.code.toString(16)
            }: ${f.close.reason})`,
          );
        }
        for (const c of f.crypto) this.#crypto.add(c.offset, c.data);
      }
    } catch (e) {
      if (!(e instanceof CryptoLimitError)) throw e;
      return this.#final("too_large", e.message);
    }
    return this.#hello();
  }

  /** The hello when the CRYPTO stream holds it whole from offset 0. */
  #hello(): QuicReadResult {
    const have = this.#crypto.contiguous;
    if (have === 0) return MORE;
    const p = this.#crypto.prefix(have);
    if (p[0] !== 1) {
      return this.#final("bad_hello", `handshake message type ${p[0]}, not client_hello (1)`);
    }
    if (have < 4) return MORE;
    const total = 4 + ((p[1] << 16) | (p[2] << 8) | p[3]);
    if (total > this.#crypto.maxBytes) {
      return this.#final(
        "too_large",
        `ClientHello of ${total} bytes, over the ${this.#crypto.maxBytes} allowed`,
      );
    }
    if (have < total) return MORE;
    try {
      const hello = parseClientHelloMessage(p.subarray(0, total), {
        fingerprint: this.#fingerprint,
        transport: "quic",
      });
      const opener = this.#opener!;
      this.#done = {
        kind: "hello",
        hello,
        version: opener.version,
        dcid: opener.dcid.slice(),
        scid: this.#scid!.slice(),
      };
      return this.#done;
    } catch (e) {
      if (!(e instanceof ClientHelloError)) throw e;
      return this.#final("bad_hello", `${e.kind}: ${e.message}`);
    }
  }

  #final(reason: QuicBadReason, message: string): QuicReadResult {
    this.#done = { kind: "bad", reason, message, final: true };
    return this.#done;
  }
}

function bad(reason: QuicBadReason, message: string): QuicReadResult {
  return { kind: "bad", reason, message, final: false };
}

function dcidOf(b: Uint8Array, h: LongHeader): Uint8Array {
  return b.subarray(h.dcidOff, h.dcidOff + h.dcidLen);
}

/** Whether packet `h` of `b` has the connection's version and Destination Connection ID. */
function sameConnection(o: InitialOpener, b: Uint8Array, h: LongHeader): boolean {
  if (h.version !== o.version || h.dcidLen !== o.dcid.length) return false;
  for (let i = 0; i < h.dcidLen; i++) if (b[h.dcidOff + i] !== o.dcid[i]) return false;
  return true;
}

/** The result for a datagram whose first long header could not be read. */
function firstPacketFailure(b: Uint8Array, failure: string): QuicReadResult {
  if (failure === "truncated") {
    return bad("truncated", "the first packet's header runs past the datagram");
  }
  if (failure === "unknown_version" && b.length >= 5) {
    const v = ((b[1] << 24) | (b[2] << 16) | (b[3] << 8) | b[4]) >>> 0;
    if (v === 0) return bad("not_initial", "a Version Negotiation packet");
    return bad("wrong_version", `QUIC version 0x${v.toString(16).padStart(8, "0")}, not v1 or v2`);
  }
  if (b.length > 0 && (b[0] & 0x80) === 0) return bad("not_initial", "a short-header packet");
  return bad("not_initial", "not a QUIC long header");
}
