/**
 * Source-address access control: IPv4/IPv6 CIDR lists checked at accept time,
 * before a single byte of the client is read.
 *
 * @module
 */

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

function parseIpv4(text: string): number | null {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  let value = 0;
  for (const part of parts) {
    if (!/^[0-9]{1,3}$/.test(part)) return null;
    const n = Number(part);
    if (n > 255) return null;
    value = value * 256 + n;
  }
  return value >>> 0;
}

function parseIpv6(text: string): [number, number, number, number] | null {
  let head = text;
  let tailV4: number | null = null;
  const lastColon = text.lastIndexOf(":");
  if (text.includes(".")) {
    tailV4 = parseIpv4(text.slice(lastColon + 1));
    if (tailV4 === null) return null;
    head = text.slice(0, lastColon + 1) + "0:0";
  }
  const halves = head.split("::");
  if (halves.length > 2) return null;
  const toGroups = (s: string) => (s === "" ? [] : s.split(":"));
  const left = toGroups(halves[0]);
  const right = halves.length === 2 ? toGroups(halves[1]) : [];
  const missing = 8 - left.length - right.length;
  if (halves.length === 2 ? missing < 1 : missing !== 0) return null;
  const groups = [...left, ...Array(halves.length === 2 ? missing : 0).fill("0"), ...right];
  const words: [number, number, number, number] = [0, 0, 0, 0];
  for (let i = 0; i < 8; i++) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(groups[i])) return null;
    const g = parseInt(groups[i], 16);
    words[i >> 1] = i % 2 === 0 ? g << 16 : (words[i >> 1] | g) >>> 0;
  }
  words.forEach((w, i) => (words[i] = w >>> 0));
  if (tailV4 !== null) words[3] = tailV4;
  return words;
}

/**
 * Parses an IPv4 or IPv6 address. IPv4-mapped IPv6 (`::ffff:1.2.3.4`, as a dual-stack
 * listener reports IPv4 clients) is folded to IPv4 so one CIDR list serves both.
 */
export function parseIp(text: string): IpWords | null {
  const bare = text.startsWith("[") && text.endsWith("]") ? text.slice(1, -1) : text;
  const zoneless = bare.split("%")[0];
  const v4 = parseIpv4(zoneless);
  if (v4 !== null) return { v6: false, words: [0, 0, 0, v4] };
  const v6 = parseIpv6(zoneless);
  if (v6 === null) return null;
  if (v6[0] === 0 && v6[1] === 0 && v6[2] === 0xffff) {
    return { v6: false, words: [0, 0, 0, v6[3]] };
  }
  return { v6: true, words: v6 };
}

/** True when `text` is an IPv4 or IPv6 address literal (no brackets). */
export function isIpAddress(text: string): boolean {
  return parseIp(text) !== null;
}

/** Parses `addr/prefix` (or a bare address, meaning a single host). Throws with a reason. */
export function parseCidr(text: string): Cidr {
  const slash = text.indexOf("/");
  const addrText = slash < 0 ? text : text.slice(0, slash);
  const ip = parseIp(addrText);
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
    const ip = parseIp(address);
    if (!ip) return false;
    if (this.#deny.some((c) => cidrContains(c, ip))) return false;
    return this.#allow.length === 0 || this.#allow.some((c) => cidrContains(c, ip));
  }
}
