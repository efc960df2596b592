/**
 * A test-side QUIC client Initial builder: protects packets the way a client does (RFC 9001
 * 5.3-5.4: AES-128-GCM over the payload, then header protection), so tests can make hellos
 * spread over several Initials, coalesced, reordered, repeated or broken. It takes the key
 * schedule from src/proto/quic_crypto.ts; tests check both against the RFC vectors.
 *
 * @module
 */
import { createCipheriv } from "node:crypto";
import { initialKeys } from "../../src/proto/quic_crypto.ts";
import { QUIC_V1, QUIC_V2 } from "../../src/proto/quic_header.ts";

/** One long-header packet to build. */
export interface PacketSpec {
  version?: number;
  type?: "initial" | "zero_rtt" | "handshake";
  dcid: Uint8Array;
  scid?: Uint8Array;
  token?: Uint8Array;
  pn: number;
  pnLen?: 1 | 2 | 3 | 4;
  /** The plaintext frames. */
  frames: Uint8Array;
  /** Pad the plaintext with PADDING frames so the whole packet has this many bytes. */
  size?: number;
  /** Set the two reserved bits of the first byte (a protocol violation once decrypted). */
  reservedBits?: number;
}

const TYPE_BITS: Record<string, Record<string, number>> = {
  [QUIC_V1]: { initial: 0, zero_rtt: 1, handshake: 2 },
  [QUIC_V2]: { initial: 1, zero_rtt: 2, handshake: 3 },
};

/** A QUIC varint in its shortest form (values under 2^30). */
export function varint(v: number): Uint8Array {
  if (v < 64) return Uint8Array.of(v);
  if (v < 16384) return Uint8Array.of(0x40 | (v >> 8), v & 0xff);
  return Uint8Array.of(0x80 | (v >>> 24), (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff);
}

export function concatBytes(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A CRYPTO frame. */
export function cryptoFrame(offset: number, data: Uint8Array): Uint8Array {
  return concatBytes(Uint8Array.of(0x06), varint(offset), varint(data.length), data);
}

/** The packet's header up to the packet number, unprotected, with a 2-byte Length field. */
function header(s: PacketSpec, version: number, pnLen: number, payloadLen: number): Uint8Array {
  const type = s.type ?? "initial";
  const first = 0xc0 | (TYPE_BITS[version][type] << 4) | ((s.reservedBits ?? 0) << 2) |
    (pnLen - 1);
  const scid = s.scid ?? new Uint8Array(0);
  const v = Uint8Array.of(version >>> 24, (version >> 16) & 0xff, (version >> 8) & 0xff, version);
  const token = type === "initial"
    ? concatBytes(varint(s.token?.length ?? 0), s.token ?? new Uint8Array(0))
    : new Uint8Array(0);
  const length = pnLen + payloadLen + 16;
  const pn = new Uint8Array(pnLen);
  for (let i = 0, x = s.pn; i < pnLen; i++, x = Math.floor(x / 256)) {
    pn[pnLen - 1 - i] = x & 0xff;
  }
  return concatBytes(
    Uint8Array.of(first),
    v,
    Uint8Array.of(s.dcid.length),
    s.dcid,
    Uint8Array.of(scid.length),
    scid,
    token,
    Uint8Array.of(0x40 | (length >> 8), length & 0xff),
    pn,
  );
}

/** Builds one protected packet. */
export function protectPacket(s: PacketSpec): Uint8Array {
  const version = s.version ?? QUIC_V1;
  const pnLen = s.pnLen ?? 2;
  let frames = s.frames;
  if (s.size !== undefined) {
    const bare = header(s, version, pnLen, frames.length).length + frames.length + 16;
    if (s.size > bare) frames = concatBytes(frames, new Uint8Array(s.size - bare));
  }
  const hdr = header(s, version, pnLen, frames.length);
  const keys = initialKeys(version, s.dcid, "client");
  const nonce = keys.iv.slice();
  for (let i = 11, x = s.pn; i >= 4 && x > 0; i--, x = Math.floor(x / 256)) nonce[i] ^= x % 256;
  const aead = createCipheriv("aes-128-gcm", keys.key, nonce);
  aead.setAAD(hdr);
  const sealed = concatBytes(aead.update(frames), aead.final(), aead.getAuthTag());
  const packet = concatBytes(hdr, sealed);
  const pnOffset = hdr.length - pnLen;
  const hp = createCipheriv("aes-128-ecb", keys.hp, null);
  hp.setAutoPadding(false);
  const mask = hp.update(packet.subarray(pnOffset + 4, pnOffset + 20));
  packet[0] ^= mask[0] & 0x0f;
  for (let i = 0; i < pnLen; i++) packet[pnOffset + i] ^= mask[1 + i];
  return packet;
}

/** The handshake bytes of TLS records (a captured hello), record headers taken out. */
export function handshakeOfRecords(records: Uint8Array): Uint8Array {
  const parts: Uint8Array[] = [];
  for (let at = 0; at + 5 <= records.length;) {
    const len = (records[at + 3] << 8) | records[at + 4];
    parts.push(records.subarray(at + 5, at + 5 + len));
    at += 5 + len;
  }
  return concatBytes(...parts);
}

/** `hello` cut into CRYPTO frames of at most `piece` bytes: [offset, data] pairs in order. */
export function cryptoPieces(hello: Uint8Array, piece: number): [number, Uint8Array][] {
  const out: [number, Uint8Array][] = [];
  for (let at = 0; at < hello.length; at += piece) {
    out.push([at, hello.subarray(at, Math.min(hello.length, at + piece))]);
  }
  return out;
}

/** Reads a fixture of framed datagrams (2-byte length, bytes). */
export function readDatagrams(file: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (let at = 0; at + 2 <= file.length;) {
    const n = (file[at] << 8) | file[at + 1];
    out.push(file.slice(at + 2, at + 2 + n));
    at += 2 + n;
  }
  return out;
}

/** Hex to bytes. */
export function fromHex(hex: string): Uint8Array {
  return Uint8Array.from(hex.match(/../g) ?? [], (x) => parseInt(x, 16));
}

/** Bytes to hex. */
export function toHex(b: Uint8Array): string {
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}
