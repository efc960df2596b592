/**
 * PROXY protocol (HAProxy's spec, versions 1 and 2): the header the proxy writes to a backend
 * before the client's bytes, so the backend sees the real client address.
 *
 * @module
 */
import { isIpAddress } from "../net/ip.ts";

/** Which PROXY protocol version a route sends. */
export type ProxyProtocolVersion = "v1" | "v2";

/** A v2 TLV a route may add: PP2_TYPE_AUTHORITY, PP2_TYPE_ALPN, PP2_TYPE_UNIQUE_ID. */
export type ProxyTlv = "authority" | "alpn" | "unique_id";

/** The values of a v2 header's TLVs; an absent or null one is left out. */
export interface ProxyTlvValues {
  /** The name the client asked for (SNI, or the HTTP Host). */
  authority?: string | null;
  /** The application protocol (see README: the one the route matched, else the client's first). */
  alpn?: string | null;
  /** An opaque id of the connection, at most 128 bytes. */
  uniqueId?: string | null;
}

const PP2_TYPE_ALPN = 0x01;
const PP2_TYPE_AUTHORITY = 0x02;
const PP2_TYPE_UNIQUE_ID = 0x05;

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

/** The TLV bytes (type, 2-byte length, value) of `values`, in type order. */
function tlvBytes(values: ProxyTlvValues): number[] {
  const out: number[] = [];
  const add = (type: number, bytes: Uint8Array | null) => {
    if (bytes?.length) out.push(type, bytes.length >> 8, bytes.length & 0xff, ...bytes);
  };
  const text = (value: string | null | undefined) => value ? encoder.encode(value) : null;
  // an ALPN name was read one character per byte (src/net/bytes.ts): its bytes go back as they came
  const alpn = values.alpn;
  add(PP2_TYPE_ALPN, alpn ? Uint8Array.from(alpn, (c) => c.charCodeAt(0) & 0xff) : null);
  add(PP2_TYPE_AUTHORITY, text(values.authority));
  add(PP2_TYPE_UNIQUE_ID, text(values.uniqueId));
  return out;
}

/**
 * The header announcing a TCP connection from `client` to `server` (the address the client
 * connected to). Mixed families are sent as IPv6 with the IPv4 side IPv4-mapped. `tlvs`: values
 * to add as v2 TLVs (v1 has none).
 */
export function proxyHeader(
  version: ProxyProtocolVersion,
  client: Deno.NetAddr,
  server: Deno.NetAddr,
  tlvs?: ProxyTlvValues,
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
  const extra = tlvs ? tlvBytes(tlvs) : [];
  const addrLen = (src.v6 ? 36 : 12) + extra.length;
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
    ...extra,
  ]);
}

/** A PROXY header a trusted load balancer sent that cannot be used. */
export class ProxyHeaderError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProxyHeaderError";
  }
}

/** What a received PROXY header says. */
export interface ReceivedProxyHeader {
  /** The real client and the address it connected to; null for LOCAL / UNKNOWN (health checks). */
  source: Deno.NetAddr | null;
  destination: Deno.NetAddr | null;
  /** Bytes of the header; what follows belongs to the client. */
  headerBytes: number;
}

const V1_MAX = 107;
const decoder = new TextDecoder("latin1");

/**
 * Parses a PROXY protocol v1 or v2 header at the start of `bytes`. Returns null while more
 * bytes are needed; throws ProxyHeaderError when it is not a valid header.
 */
export function parseProxyHeader(bytes: Uint8Array): ReceivedProxyHeader | null {
  const n = Math.min(bytes.length, V2_SIGNATURE.length);
  const v2 = V2_SIGNATURE.slice(0, n).every((b, i) => bytes[i] === b);
  if (v2 && n === V2_SIGNATURE.length) return parseV2(bytes);
  const v1Prefix = "PROXY ";
  const m = Math.min(bytes.length, v1Prefix.length);
  const v1 = [...v1Prefix.slice(0, m)].every((c, i) => bytes[i] === c.charCodeAt(0));
  if (!v1 && !v2) throw new ProxyHeaderError("a trusted source sent no PROXY protocol header");
  if (v2) return null;
  const end = bytes.indexOf(0x0a);
  if (end < 0) {
    if (bytes.length >= V1_MAX) throw new ProxyHeaderError("PROXY v1 line longer than 107 bytes");
    return null;
  }
  if (end + 1 > V1_MAX || bytes[end - 1] !== 0x0d) {
    throw new ProxyHeaderError("PROXY v1 line not ended by CRLF within 107 bytes");
  }
  const parts = decoder.decode(bytes.subarray(0, end - 1)).split(" ");
  if (parts[1] === "UNKNOWN") return { source: null, destination: null, headerBytes: end + 1 };
  if (parts.length !== 6 || (parts[1] !== "TCP4" && parts[1] !== "TCP6")) {
    throw new ProxyHeaderError(`bad PROXY v1 line: ${parts.join(" ")}`);
  }
  const [, family, src, dst, sport, dport] = parts;
  const ports = [sport, dport].map((p) => (/^\d{1,5}$/.test(p) ? Number(p) : -1));
  const v6 = family === "TCP6";
  for (const ip of [src, dst]) {
    if (!isIpAddress(ip) || ip.includes(":") !== v6) {
      throw new ProxyHeaderError(`bad ${family} address "${ip}" in PROXY v1 line`);
    }
  }
  if (ports.some((p) => p < 0 || p > 65535)) {
    throw new ProxyHeaderError("bad port in PROXY v1 line");
  }
  return {
    source: { transport: "tcp", hostname: src, port: ports[0] },
    destination: { transport: "tcp", hostname: dst, port: ports[1] },
    headerBytes: end + 1,
  };
}

function parseV2(bytes: Uint8Array): ReceivedProxyHeader | null {
  if (bytes.length < 16) return null;
  const verCmd = bytes[12];
  const fam = bytes[13];
  const len = (bytes[14] << 8) | bytes[15];
  if (verCmd >> 4 !== 2) throw new ProxyHeaderError(`PROXY v2 header with version ${verCmd >> 4}`);
  if (bytes.length < 16 + len) return null;
  const cmd = verCmd & 0x0f;
  const headerBytes = 16 + len;
  if (cmd === 0) return { source: null, destination: null, headerBytes }; // LOCAL
  if (cmd !== 1) throw new ProxyHeaderError(`PROXY v2 command ${cmd}`);
  const body = bytes.subarray(16, 16 + len);
  const view = new DataView(body.buffer, body.byteOffset, body.length);
  if (fam === 0x11 && len >= 12) {
    const ip = (o: number) => [...body.subarray(o, o + 4)].join(".");
    return {
      source: { transport: "tcp", hostname: ip(0), port: view.getUint16(8) },
      destination: { transport: "tcp", hostname: ip(4), port: view.getUint16(10) },
      headerBytes,
    };
  }
  if (fam === 0x21 && len >= 36) {
    const ip = (o: number) =>
      Array.from({ length: 8 }, (_, i) => view.getUint16(o + 2 * i).toString(16)).join(":");
    return {
      source: { transport: "tcp", hostname: ip(0), port: view.getUint16(32) },
      destination: { transport: "tcp", hostname: ip(16), port: view.getUint16(34) },
      headerBytes,
    };
  }
  if ((fam & 0xf0) === 0) return { source: null, destination: null, headerBytes }; // UNSPEC
  throw new ProxyHeaderError(`PROXY v2 family 0x${fam.toString(16)} with ${len} address bytes`);
}
