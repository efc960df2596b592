/**
 * Source-address access control: IPv4/IPv6 CIDR lists checked at accept time,
 * before a single byte of the client is read.
 *
 * @module
 */

import { ipv4Value, parseIp } from "../net/ip.ts";

/** An IP address as four 32-bit words (IPv4 uses only the last one). */
export interface IpWords {
  v6: boolean;
  words: [number, number, number, number];
}

/** A parsed CIDR block. */
export interface Cidr {
  /** The text it was parsed from, for logs. */
  text: string;
  v6: boolean;
  words: [number, number, number, number];
  prefix: number;
}

/**
 * Parses an IPv4 or IPv6 address into words. IPv4-mapped IPv6 (`::ffff:1.2.3.4`, as a
 * dual-stack listener reports IPv4 clients) is folded to IPv4 so one CIDR list serves both.
 */
export function parseIpWords(text: string): IpWords | null {
  const v4 = ipv4Value(text);
  if (v4 >= 0) return { v6: false, words: [0, 0, 0, v4] };
  const ip = parseIp(text);
  if (!ip) return null;
  const v = new DataView(ip.bytes.buffer, ip.bytes.byteOffset, 16);
  if (ip.family === 2) return { v6: false, words: [0, 0, 0, v.getUint32(0)] };
  return { v6: true, words: [v.getUint32(0), v.getUint32(4), v.getUint32(8), v.getUint32(12)] };
}

/** Parses `addr/prefix` (or a bare address, meaning a single host). Throws with a reason. */
export function parseCidr(text: string): Cidr {
  const slash = text.indexOf("/");
  const addrText = slash < 0 ? text : text.slice(0, slash);
  const ip = parseIpWords(addrText);
  if (!ip || addrText.startsWith("[")) throw new Error(`not an IP address: "${addrText}"`);
  // an IPv4-mapped block written in IPv6 form (::ffff:a.b.c.d/N) is folded to IPv4; its
  // prefix counts the 96 mapping bits, so only /96../128 keep their meaning
  const mapped = !ip.v6 && addrText.includes(":");
  const [min, max] = mapped ? [96, 128] : [0, ip.v6 ? 128 : 32];
  let prefix = ip.v6 ? 128 : 32;
  if (slash >= 0) {
    const p = text.slice(slash + 1);
    if (!/^[0-9]{1,3}$/.test(p) || Number(p) < min || Number(p) > max) {
      throw new Error(`prefix length must be ${min}-${max}, got "${p}"`);
    }
    prefix = mapped ? Number(p) - 96 : Number(p);
  }
  return { text, v6: ip.v6, words: ip.words, prefix };
}

/** Whether `ip` lies in `cidr` (an IPv4 address never lies in an IPv6 block). */
export function cidrContains(cidr: Cidr, ip: IpWords): boolean {
  if (cidr.v6 !== ip.v6) return false;
  const first = cidr.v6 ? 0 : 3;
  let bits = cidr.prefix;
  for (let i = first; i < 4 && bits > 0; i++) {
    const take = Math.min(32, bits);
    const mask = take === 32 ? 0xffffffff : ~(0xffffffff >>> take) >>> 0;
    if (((cidr.words[i] ^ ip.words[i]) & mask) !== 0) return false;
    bits -= take;
  }
  return true;
}

/** An allow/deny decision over source addresses. */
export class Acl {
  readonly #allow: Cidr[];
  readonly #deny: Cidr[];

  /** `allow` empty means everyone not denied is served. */
  constructor(allow: Cidr[], deny: Cidr[]) {
    this.#allow = allow;
    this.#deny = deny;
  }

  /** True when the lists are both empty, so callers can skip parsing the address. */
  get empty(): boolean {
    return this.#allow.length === 0 && this.#deny.length === 0;
  }

  /** Whether a client at `address` may be served. Unparseable addresses are refused. */
  permits(address: string): boolean {
    if (this.empty) return true;
    const ip = parseIpWords(address);
    if (!ip) return false;
    if (this.#deny.some((c) => cidrContains(c, ip))) return false;
    return this.#allow.length === 0 || this.#allow.some((c) => cidrContains(c, ip));
  }
}
