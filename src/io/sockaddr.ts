/**
 * struct sockaddr_in / sockaddr_in6 from and to the `{ hostname, port }` shape of Deno.NetAddr,
 * which the rest of the proxy (ACL, logs, PROXY headers) speaks.
 *
 * @module
 */
import { formatIpv6, ipv4Value, parseIp } from "../net/ip.ts";
import { AF_INET, AF_INET6, sys } from "../../ffi/socket.ts";

/** sizeof(struct sockaddr_in6): room for either family. */
export const SOCKADDR_SIZE = 28;

/** An IP socket address as Deno.NetAddr has it (`hostname` without brackets). */
export type NetAddr = Deno.NetAddr;

/**
 * Writes `hostname:port` into `out` (at least {@link SOCKADDR_SIZE} bytes); returns its length,
 * or 0 when `hostname` is no IP literal. `v6`: an IPv4 address is written as IPv4-mapped IPv6
 * (for a socket of family AF_INET6).
 */
export function encodeSockaddr(
  hostname: string,
  port: number,
  out: Uint8Array,
  v6 = false,
): number {
  const v4 = ipv4Value(hostname);
  if (v4 >= 0) {
    // the common case, written without allocating (a backend connect)
    out.fill(0, 0, SOCKADDR_SIZE);
    out[2] = port >> 8;
    out[3] = port & 0xff;
    const at = v6 ? 20 : 4;
    if (v6) out[18] = out[19] = 0xff;
    out[0] = v6 ? AF_INET6 : AF_INET;
    out[at] = v4 >>> 24;
    out[at + 1] = (v4 >>> 16) & 0xff;
    out[at + 2] = (v4 >>> 8) & 0xff;
    out[at + 3] = v4 & 0xff;
    return v6 ? SOCKADDR_SIZE : 16;
  }
  const ip = parseIp(hostname);
  if (!ip) return 0;
  out.fill(0, 0, SOCKADDR_SIZE);
  out[2] = port >> 8;
  out[3] = port & 0xff;
  if (ip.family === 2 && !v6) {
    out[0] = AF_INET;
    out.set(ip.bytes.subarray(0, 4), 4);
    return 16;
  }
  out[0] = AF_INET6;
  if (ip.family === 2) {
    out[18] = 0xff;
    out[19] = 0xff;
    out.set(ip.bytes.subarray(0, 4), 20);
  } else out.set(ip.bytes, 8);
  return SOCKADDR_SIZE;
}

/** Whether `hostname` is an IPv6 literal (a socket for it must be AF_INET6). */
export function isV6(hostname: string): boolean {
  // every IPv6 literal has a colon, no IPv4 one has
  return hostname.includes(":");
}

/** The address in a sockaddr buffer as Deno.NetAddr, or null for another family. */
export function decodeSockaddr(b: Uint8Array, transport: "tcp" | "udp" = "tcp"): NetAddr | null {
  const family = b[0] | (b[1] << 8);
  const port = (b[2] << 8) | b[3];
  if (family === AF_INET) {
    return { transport, hostname: `${b[4]}.${b[5]}.${b[6]}.${b[7]}`, port };
  }
  if (family !== AF_INET6) return null;
  const a = b.subarray(8, 24);
  const mapped = a[10] === 0xff && a[11] === 0xff && a.subarray(0, 10).every((x) => x === 0);
  // a v4 client of a dual-stack listener, spelled as Deno spells it
  const hostname = mapped ? `::ffff:${a[12]}.${a[13]}.${a[14]}.${a[15]}` : formatIpv6(a);
  return { transport, hostname, port };
}

/**
 * A compact key of the address in a sockaddr buffer, for finding a peer's state per datagram
 * without decoding it: IPv4 (and IPv4-mapped IPv6) as one number (address * 65536 + port),
 * other IPv6 as a short string; null for another family.
 */
export function sockaddrKey(b: Uint8Array): number | string | null {
  const family = b[0] | (b[1] << 8);
  const port = (b[2] << 8) | b[3];
  if (family === AF_INET) {
    return ((b[4] << 24 >>> 0) + (b[5] << 16) + (b[6] << 8) + b[7]) * 65536 + port;
  }
  if (family !== AF_INET6) return null;
  let mapped = b[18] === 0xff && b[19] === 0xff;
  for (let i = 8; mapped && i < 18; i++) mapped = b[i] === 0;
  if (mapped) {
    return ((b[20] << 24 >>> 0) + (b[21] << 16) + (b[22] << 8) + b[23]) * 65536 + port;
  }
  let s = "";
  for (let i = 8; i < 24; i += 2) s += String.fromCharCode((b[i] << 8) | b[i + 1]);
  return s + String.fromCharCode(port);
}

const localBuf = new Uint8Array(SOCKADDR_SIZE);
const localLen = new Uint8Array(4);
const localLenView = new DataView(localLen.buffer);

/** The local address of socket `fd` (getsockname(2)), or null. */
export function localAddrOf(fd: number, transport: "tcp" | "udp" = "tcp"): NetAddr | null {
  localLenView.setUint32(0, SOCKADDR_SIZE, true);
  if (sys().getsockname(fd, localBuf, localLen) !== 0) return null;
  return decodeSockaddr(localBuf, transport);
}
