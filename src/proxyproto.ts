/**
 * PROXY protocol (HAProxy's spec, versions 1 and 2): the header the proxy writes to a backend
 * before the client's bytes, so the backend sees the real client address.
 *
 * @module
 */
import { isIpAddress } from "./acl.ts";

/** Which PROXY protocol version a route sends. */
export type ProxyProtocolVersion = "v1" | "v2";

/** The v2 signature: `\r\n\r\n\0\r\nQUIT\n`. */
const V2_SIGNATURE = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
const encoder = new TextEncoder();

/** An address as a family and its bytes (IPv4-mapped IPv6 folded to IPv4). */
function addressBytes(ip: string): { v6: boolean; bytes: number[]; text: string } {
  const bare = ip.startsWith("[") ? ip.slice(1, -1) : ip;
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(bare);
  const v4 = mapped ? mapped[1] : bare.includes(":") ? null : bare;
  if (v4 !== null) {
    return { v6: false, bytes: v4.split(".").map(Number), text: v4 };
  }
  if (!isIpAddress(bare)) throw new Error(`not an IP address: ${ip}`);
  // expand "::" to eight groups
  const [head, tail = ""] = bare.split("::");
  const h = head ? head.split(":") : [];
  const t = bare.includes("::") ? (tail ? tail.split(":") : []) : [];
  const groups = [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
  const bytes = groups.flatMap((g) => {
    const n = parseInt(g, 16);
    return [n >> 8, n & 0xff];
  });
  return { v6: true, bytes, text: bare };
}

/** IPv4 bytes as IPv4-mapped IPv6, for a header whose other address is IPv6. */
function asV6(a: { v6: boolean; bytes: number[]; text: string }) {
  if (a.v6) return a;
  return {
    v6: true,
    bytes: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ...a.bytes],
    text: `::ffff:${a.text}`,
  };
}

/**
 * The header announcing a TCP connection from `client` to `server` (the address the client
 * connected to). Mixed families are sent as IPv6 with the IPv4 side IPv4-mapped.
 */
export function proxyHeader(
  version: ProxyProtocolVersion,
  client: Deno.NetAddr,
  server: Deno.NetAddr,
): Uint8Array {
  let src = addressBytes(client.hostname);
  let dst = addressBytes(server.hostname);
  if (src.v6 !== dst.v6) {
    src = asV6(src);
    dst = asV6(dst);
  }
  if (version === "v1") {
    return encoder.encode(
      `PROXY ${src.v6 ? "TCP6" : "TCP4"} ${src.text} ${dst.text} ${client.port} ${server.port}\r\n`,
    );
  }
  const addrLen = src.v6 ? 36 : 12;
  return new Uint8Array([
    ...V2_SIGNATURE,
    0x21, // version 2, command PROXY
    src.v6 ? 0x21 : 0x11, // AF_INET6 / AF_INET, STREAM
    addrLen >> 8,
    addrLen & 0xff,
    ...src.bytes,
    ...dst.bytes,
    client.port >> 8,
    client.port & 0xff,
    server.port >> 8,
    server.port & 0xff,
  ]);
}
