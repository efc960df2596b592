/**
 * IP address literals: the one parser every module uses (socket tuples, the ACL's CIDRs, the DNS
 * cache's records) and the RFC 5952 text of an IPv6 address.
 * @module
 */

/** An IP address as 16 network-order bytes; IPv4 (and IPv4-mapped IPv6) in the first 4. */
export interface IpAddress {
  /** 2 (AF_INET) or 10 (AF_INET6). */
  family: 2 | 10;
  bytes: Uint8Array;
}

/**
 * Parse an IP address string (as in Deno.NetAddr.hostname) into 16 network-order bytes.
 * IPv4 and IPv4-mapped IPv6 (`::ffff:1.2.3.4`) give family 2 with the address in the first 4.
 * Brackets (`[::1]`) and a zone (`fe80::1%eth0`) are allowed. Returns null for anything that
 * is not an IP literal.
 */
export function parseIp(text: string): IpAddress | null {
  let s = text;
  if (s.startsWith("[") && s.endsWith("]")) s = s.slice(1, -1);
  const zone = s.indexOf("%");
  if (zone >= 0) s = s.slice(0, zone);
  const v4 = ipv4Value(s);
  if (v4 >= 0) {
    const bytes = new Uint8Array(16);
    bytes[0] = v4 >>> 24;
    bytes[1] = (v4 >>> 16) & 0xff;
    bytes[2] = (v4 >>> 8) & 0xff;
    bytes[3] = v4 & 0xff;
    return { family: 2, bytes };
  }
  const v6 = parseIpv6(s);
  if (!v6) return null;
  const mapped = v6.subarray(0, 10).every((b) => b === 0) && v6[10] === 0xff && v6[11] === 0xff;
  if (mapped) {
    const bytes = new Uint8Array(16);
    bytes.set(v6.subarray(12, 16));
    return { family: 2, bytes };
  }
  return { family: 10, bytes: v6 };
}

/** True when `text` is an IPv4 or IPv6 address literal (no brackets). */
export function isIpAddress(text: string): boolean {
  return ipv4Value(text) >= 0 || parseIp(text) !== null;
}

/** Four network-order bytes of a dotted-quad IPv4 address, or null. */
export function parseIpv4(s: string): Uint8Array | null {
  const v = ipv4Value(s);
  if (v < 0) return null;
  return new Uint8Array([v >>> 24, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff]);
}

/**
 * A dotted-quad IPv4 address as an unsigned 32-bit number, or -1 when `s` is not one (four
 * decimal parts of 1-3 digits, each <= 255). Scans the text without allocating: it runs for
 * every connection (ACL, dial guard, socket addresses).
 */
export function ipv4Value(s: string): number {
  const len = s.length;
  if (len < 7 || len > 15) return -1;
  let value = 0;
  let part = 0;
  let digits = 0;
  let dots = 0;
  for (let i = 0; i < len; i++) {
    const c = s.charCodeAt(i);
    if (c === 46) { // "."
      if (digits === 0 || ++dots > 3) return -1;
      value = value * 256 + part;
      part = 0;
      digits = 0;
    } else if (c >= 48 && c <= 57) {
      if (++digits > 3) return -1;
      part = part * 10 + (c - 48);
      if (part > 255) return -1;
    } else return -1;
  }
  if (dots !== 3 || digits === 0) return -1;
  return value * 256 + part;
}

/**
 * Sixteen network-order bytes of an IPv6 address (`::` compression and a dotted IPv4 tail
 * allowed; no brackets or zone), or null.
 */
export function parseIpv6(s: string): Uint8Array | null {
  if (!s.includes(":")) return null;
  let tail4: Uint8Array | null = null;
  const lastColon = s.lastIndexOf(":");
  if (s.slice(lastColon + 1).includes(".")) {
    tail4 = parseIpv4(s.slice(lastColon + 1));
    if (!tail4) return null;
    s = s.slice(0, lastColon + 1) + "0:0"; // placeholder groups, replaced below
  }
  const halves = s.split("::");
  if (halves.length > 2) return null;
  const groups = (h: string) => (h === "" ? [] : h.split(":"));
  const head = groups(halves[0]);
  const tail = halves.length === 2 ? groups(halves[1]) : [];
  const missing = 8 - head.length - tail.length;
  if (halves.length === 1 ? missing !== 0 : missing < 1) return null;
  const all = [...head, ...Array(halves.length === 2 ? missing : 0).fill("0"), ...tail];
  const out = new Uint8Array(16);
  for (let i = 0; i < 8; i++) {
    if (!/^[0-9a-fA-F]{1,4}$/.test(all[i])) return null;
    const n = parseInt(all[i], 16);
    out[i * 2] = n >> 8;
    out[i * 2 + 1] = n & 0xff;
  }
  if (tail4) out.set(tail4, 12);
  return out;
}

/** RFC 5952 text of a 16-byte IPv6 address. */
export function formatIpv6(b: Uint8Array): string {
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push((b[i] << 8) | b[i + 1]);
  // RFC 5952: compress the longest run (>= 2) of zero groups.
  let bestAt = -1, bestLen = 0;
  for (let i = 0; i < 8;) {
    if (groups[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > bestLen && j - i >= 2) [bestAt, bestLen] = [i, j - i];
    i = j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (bestAt < 0) return hex.join(":");
  return `${hex.slice(0, bestAt).join(":")}::${hex.slice(bestAt + bestLen).join(":")}`;
}
