/**
 * QUIC Initial packet protection (RFC 9001 5, RFC 9369 3.3): the Initial keys derived from the
 * client's first Destination Connection ID, header-protection removal and AES-128-GCM payload
 * decryption, all synchronous with node:crypto.
 *
 * Initial keys are public (anyone who sees the Destination Connection ID can derive them): this
 * reads a client's first flight, it proves nothing about who sent it. The datagram is never
 * modified: the unprotected header is rebuilt in a small copy and the payload decrypted into a
 * new buffer.
 *
 * @module
 */
import { type Cipheriv, createCipheriv, createDecipheriv, createHmac } from "node:crypto";
import { QUIC_V2 } from "./quic_header.ts";

/** RFC 9001 5.2. */
const V1_SALT = hexBytes("38762cf7f55934b34d179ae6a4c80cadccbb7f0a");
/** RFC 9369 3.3.1. */
const V2_SALT = hexBytes("0dede3def700a6db819381be6e269dcbf9bd2ed9");
const AEAD_TAG = 16;
const SAMPLE = 16;
const ascii = new TextEncoder();

function hexBytes(hex: string): Uint8Array {
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function hmacSha256(key: Uint8Array, data: Uint8Array): Uint8Array {
  return new Uint8Array(createHmac("sha256", key).update(data).digest());
}

/** HKDF-Expand-Label (RFC 8446 7.1) with an empty context, for lengths up to 32 bytes. */
export function hkdfExpandLabel(secret: Uint8Array, label: string, length: number): Uint8Array {
  const full = ascii.encode(`tls13 ${label}`);
  const info = new Uint8Array(2 + 1 + full.length + 1 + 1);
  info[0] = length >> 8;
  info[1] = length & 0xff;
  info[2] = full.length;
  info.set(full, 3);
  info[3 + full.length] = 0; // empty context
  info[4 + full.length] = 1; // HKDF-Expand's block counter: one SHA-256 block is enough
  return hmacSha256(secret, info).slice(0, length);
}

/** One side's Initial keys: AEAD key, IV and header-protection key. */
export interface InitialKeys {
  /** The side's initial secret ("client in" / "server in"). */
  secret: Uint8Array;
  key: Uint8Array;
  iv: Uint8Array;
  hp: Uint8Array;
}

/** The Initial keys of `side` for a connection whose client chose Destination Connection ID `dcid`. */
export function initialKeys(
  version: number,
  dcid: Uint8Array,
  side: "client" | "server" = "client",
): InitialKeys {
  const v2 = version === QUIC_V2;
  const initialSecret = hmacSha256(v2 ? V2_SALT : V1_SALT, dcid); // HKDF-Extract
  const secret = hkdfExpandLabel(initialSecret, side === "client" ? "client in" : "server in", 32);
  const prefix = v2 ? "quicv2" : "quic";
  return {
    secret,
    key: hkdfExpandLabel(secret, `${prefix} key`, 16),
    iv: hkdfExpandLabel(secret, `${prefix} iv`, 12),
    hp: hkdfExpandLabel(secret, `${prefix} hp`, 16),
  };
}

/** A decrypted packet. */
export interface OpenedPacket {
  /** The full packet number. */
  pn: number;
  /** The first byte with header protection removed. */
  firstByte: number;
  /** The plaintext payload (frames), a new buffer. */
  payload: Uint8Array;
}

/**
 * The full packet number from its `bits`-bit truncation, given the largest one received
 * (-1 for none): RFC 9000 A.3.
 */
export function decodePacketNumber(largest: number, truncated: number, bits: number): number {
  const expected = largest + 1;
  const win = 2 ** bits;
  const hwin = win / 2;
  const candidate = expected - (expected % win) + truncated;
  if (candidate <= expected - hwin && candidate < 2 ** 62 - win) return candidate + win;
  if (candidate > expected + hwin && candidate >= win) return candidate - win;
  return candidate;
}

/**
 * Opens a client's Initial packets of one connection: keys derived once from its Destination
 * Connection ID, the header-protection cipher kept for every packet.
 */
export class InitialOpener {
  readonly version: number;
  /** The Destination Connection ID the keys come from (a copy). */
  readonly dcid: Uint8Array;
  readonly #key: Uint8Array;
  readonly #iv: Uint8Array;
  /** AES-128-ECB without padding: each 16-byte update is one independent block. */
  readonly #hp: Cipheriv;

  constructor(version: number, dcid: Uint8Array) {
    this.version = version;
    this.dcid = dcid.slice();
    const keys = initialKeys(version, this.dcid, "client");
    this.#key = keys.key;
    this.#iv = keys.iv;
    this.#hp = createCipheriv("aes-128-ecb", keys.hp, null);
    this.#hp.setAutoPadding(false);
  }

  /** Header-protection mask of a 16-byte sample (RFC 9001 5.4.3). */
  mask(sample: Uint8Array): Uint8Array {
    return this.#hp.update(sample);
  }

  /**
   * Removes header protection from and decrypts the long-header packet `b[start, end)` whose
   * packet number starts at `pnOffset`; null when it is too short or fails authentication.
   * `b` is not modified.
   */
  open(
    b: Uint8Array,
    start: number,
    pnOffset: number,
    end: number,
    largestPn: number,
  ): OpenedPacket | null {
    const sampleOff = pnOffset + 4;
    if (sampleOff + SAMPLE > end) return null;
    const mask = this.mask(b.subarray(sampleOff, sampleOff + SAMPLE));
    const firstByte = b[start] ^ (mask[0] & 0x0f);
    const pnLen = (firstByte & 3) + 1;
    const payloadOff = pnOffset + pnLen;
    if (payloadOff + AEAD_TAG > end) return null;
    const header = b.slice(start, payloadOff);
    header[0] = firstByte;
    let truncated = 0;
    for (let i = 0; i < pnLen; i++) {
      const at = pnOffset - start + i;
      header[at] ^= mask[1 + i];
      truncated = truncated * 256 + header[at];
    }
    const pn = decodePacketNumber(largestPn, truncated, pnLen * 8);
    const nonce = this.#iv.slice();
    for (let i = 11, v = pn; i >= 4 && v > 0; i--, v = Math.floor(v / 256)) nonce[i] ^= v % 256;
    try {
      const d = createDecipheriv("aes-128-gcm", this.#key, nonce);
      d.setAAD(header);
      d.setAuthTag(b.subarray(end - AEAD_TAG, end));
      const payload = d.update(b.subarray(payloadOff, end - AEAD_TAG));
      d.final();
      return {
        pn,
        firstByte,
        payload: new Uint8Array(payload.buffer, payload.byteOffset, payload.length),
      };
    } catch {
      // the tag does not match: another connection's keys, or bytes changed on the way
      return null;
    }
  }
}
