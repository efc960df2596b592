/**
 * QUIC packet headers without crypto (RFC 8999, RFC 9000 17, RFC 9369 3.2): the variable-length
 * integer, the long header's fields as offsets into the datagram, the packet type under QUIC v1
 * and v2 numbering, and a cheap classification of a datagram by its first packet, so the hot
 * path can tell a new client's Initial from traffic of a routed flow without decrypting.
 *
 * Nothing here copies or modifies the datagram except {@link longHeaderIds}, which copies the
 * two connection IDs out.
 *
 * @module
 */

/** QUIC version 1 (RFC 9000). */
export const QUIC_V1 = 0x00000001;
/** QUIC version 2 (RFC 9369). */
export const QUIC_V2 = 0x6b3343cf;
/** A client's datagram carrying an Initial is at least this long (RFC 9000 14.1). */
export const MIN_INITIAL_DATAGRAM = 1200;
/** QUIC v1 and v2 connection IDs are at most 20 bytes (RFC 9000 17.2). */
export const MAX_CID = 20;

/** Whether `version` is QUIC v1. */
export function isQuicV1(version: number): boolean {
  return version === QUIC_V1;
}

/** Whether this module can read Initials of `version` (QUIC v1 or v2). */
export function isKnownVersion(version: number): boolean {
  return version === QUIC_V1 || version === QUIC_V2;
}

/** A long-header packet's type, named as in QUIC v1 whatever the version's bits. */
export type LongPacketType = "initial" | "zero_rtt" | "handshake" | "retry";

/** The two type bits of the first byte, by version: v2 rotated them (RFC 9369 3.2). */
const V1_TYPES: readonly LongPacketType[] = ["initial", "zero_rtt", "handshake", "retry"];
const V2_TYPES: readonly LongPacketType[] = ["retry", "initial", "zero_rtt", "handshake"];

/** What a datagram's first packet is. */
export type DatagramKind =
  /** A v1 or v2 Initial: a new client, or one not routed yet. */
  | "initial"
  /** A v1 or v2 0-RTT or Handshake packet. */
  | "other_long"
  /** A Retry (only a server sends one). */
  | "retry"
  /** Version 0: a Version Negotiation packet (only a server sends one). */
  | "version_negotiation"
  /** A long header of a version other than v1 and v2. */
  | "unknown_version"
  /** A short header: 1-RTT data of an established connection. */
  | "short"
  /** Empty, cut inside the long header's fixed part, or not a valid v1/v2 long header. */
  | "garbage";

/** Reads QUIC variable-length integers (RFC 9000 16) from `b[pos, end)`. */
export class VarintCursor {
  pos: number;
  constructor(readonly b: Uint8Array, pos: number, readonly end: number) {
    this.pos = pos;
  }

  /** The next varint, or -1 when it runs past `end` (values over 2^53 lose precision). */
  varint(): number {
    const p = this.pos;
    if (p >= this.end) return -1;
    const b = this.b;
    const first = b[p];
    const len = 1 << (first >> 6);
    if (p + len > this.end) return -1;
    let v = first & 0x3f;
    for (let i = 1; i < len; i++) v = v * 256 + b[p + i];
    this.pos = p + len;
    return v;
  }
}

/** A long-header packet of QUIC v1 or v2, as offsets into the datagram it was read from. */
export interface LongHeader {
  version: number;
  type: LongPacketType;
  /** Offset of the packet's first byte. */
  start: number;
  dcidOff: number;
  dcidLen: number;
  scidOff: number;
  scidLen: number;
  /** Initial only: the token's offset and length (0 and 0 otherwise). */
  tokenOff: number;
  tokenLen: number;
  /** Offset of the (protected) packet number; for a Retry, of the retry token. */
  pnOffset: number;
  /** Offset just past the packet (the datagram's end for a Retry). */
  end: number;
}

/** Why a long header could not be read. */
export type LongHeaderFailure =
  /** A length field runs past the datagram. */
  | "truncated"
  /** Not a long header, fixed bit clear, a connection ID over 20 bytes, or a malformed field. */
  | "malformed"
  /** A long header of a version other than v1 and v2 (including Version Negotiation). */
  | "unknown_version";

function u32(b: Uint8Array, p: number): number {
  return ((b[p] << 24) | (b[p + 1] << 16) | (b[p + 2] << 8) | b[p + 3]) >>> 0;
}

/** Reads the v1/v2 long header of the packet at `b[start]`. */
export function parseLongHeader(b: Uint8Array, start: number): LongHeader | LongHeaderFailure {
  const end = b.length;
  if (start >= end || (b[start] & 0x80) === 0) return "malformed";
  if (start + 6 > end) return "truncated";
  const version = u32(b, start + 1);
  if (!isKnownVersion(version)) return "unknown_version";
  const first = b[start];
  if ((first & 0x40) === 0) return "malformed";
  const dcidOff = start + 6;
  const dcidLen = b[start + 5];
  if (dcidLen > MAX_CID) return "malformed";
  if (dcidOff + dcidLen + 1 > end) return "truncated";
  const scidLen = b[dcidOff + dcidLen];
  const scidOff = dcidOff + dcidLen + 1;
  if (scidLen > MAX_CID) return "malformed";
  if (scidOff + scidLen > end) return "truncated";
  const type = (version === QUIC_V2 ? V2_TYPES : V1_TYPES)[(first >> 4) & 3];
  const h: LongHeader = {
    version,
    type,
    start,
    dcidOff,
    dcidLen,
    scidOff,
    scidLen,
    tokenOff: 0,
    tokenLen: 0,
    pnOffset: scidOff + scidLen,
    end,
  };
  if (type === "retry") return h;
  const c = new VarintCursor(b, h.pnOffset, end);
  if (type === "initial") {
    const tokenLen = c.varint();
    if (tokenLen < 0 || c.pos + tokenLen > end) return "truncated";
    h.tokenOff = c.pos;
    h.tokenLen = tokenLen;
    c.pos += tokenLen;
  }
  const length = c.varint();
  if (length < 0 || c.pos + length > end) return "truncated";
  // at least a 1-byte packet number: a Length of 0 cannot hold a packet
  if (length === 0) return "malformed";
  h.pnOffset = c.pos;
  h.end = c.pos + length;
  return h;
}

/**
 * What the datagram's first packet is, from its first bytes only (no crypto, no allocation).
 * An "initial" here may still be cut short or fail to decrypt.
 */
export function classifyDatagram(b: Uint8Array): DatagramKind {
  if (b.length === 0) return "garbage";
  const first = b[0];
  if ((first & 0x80) === 0) return "short";
  if (b.length < 7) return "garbage";
  const version = u32(b, 1);
  const dcidLen = b[5];
  const scidAt = 6 + dcidLen;
  if (scidAt >= b.length || scidAt + 1 + b[scidAt] > b.length) return "garbage";
  if (version === 0) return "version_negotiation";
  if (!isKnownVersion(version)) return "unknown_version";
  if ((first & 0x40) === 0 || dcidLen > MAX_CID || b[scidAt] > MAX_CID) return "garbage";
  const type = (version === QUIC_V2 ? V2_TYPES : V1_TYPES)[(first >> 4) & 3];
  return type === "initial" ? "initial" : type === "retry" ? "retry" : "other_long";
}

/** A long header's version and connection IDs (copies). */
export interface LongHeaderIds {
  version: number;
  dcid: Uint8Array;
  scid: Uint8Array;
}

/**
 * The version and connection IDs of the long-header packet the datagram starts with, any
 * version (RFC 8999: IDs up to 255 bytes), Version Negotiation included; null for a short
 * header or when the IDs run past the datagram. A server's reply carries the server's chosen
 * ID as its Source Connection ID: what a flow follows a rebinding client by.
 */
export function longHeaderIds(b: Uint8Array): LongHeaderIds | null {
  if (b.length < 7 || (b[0] & 0x80) === 0) return null;
  const dcidLen = b[5];
  const scidAt = 6 + dcidLen;
  if (scidAt >= b.length || scidAt + 1 + b[scidAt] > b.length) return null;
  return {
    version: u32(b, 1),
    dcid: b.slice(6, scidAt),
    scid: b.slice(scidAt + 1, scidAt + 1 + b[scidAt]),
  };
}
