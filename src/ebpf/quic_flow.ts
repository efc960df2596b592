/**
 * A QUIC flow of the kernel fast path as the proxy names it (client, listener, the proxy's
 * per-flow socket, backend) and as the flow map keys it: the two entries, one per direction,
 * each keyed by the datagram as it arrives and valued with what it becomes.
 * @module
 */

import { parseIp } from "../net/ip.ts";
import { encodeQuicFlow, encodeQuicKey, QUIC_TO_BACKEND, type QuicEndpoint } from "./layout.ts";

/** A UDP address as Deno names it (`Deno.NetAddr` fits): an IP literal and a port. */
export interface QuicAddr {
  hostname: string;
  port: number;
}

/**
 * A routed QUIC flow, all four addresses concrete (no 0.0.0.0 or ::, no port 0):
 * client C's datagrams to listener L become datagrams from the proxy's socket S (`local`,
 * connected to B) to backend B; B's datagrams to S become datagrams from L to C.
 */
export interface QuicFlow {
  /** C: where the client's datagrams come from. */
  client: QuicAddr;
  /** L: the address the client sent to (the listener's concrete local address, e.g. from IP_PKTINFO). */
  listener: QuicAddr;
  /** S: the local address of the proxy's per-flow socket toward the backend (Sa:Sp). */
  local: QuicAddr;
  /** B: the backend. */
  backend: QuicAddr;
}

/** Why a flow cannot be forwarded in the kernel (it stays in userspace). */
export type QuicFlowRefusal = "mixed_families" | "unsupported_address";

/** The two map entries of a flow: keys (the datagram as it arrives) and values (what it becomes). */
export interface QuicFlowEntries {
  toBackendKey: Uint8Array;
  toBackendValue: Uint8Array;
  toClientKey: Uint8Array;
  toClientValue: Uint8Array;
}

/**
 * The endpoint of `a`; IPv4-mapped IPv6 (a dual-stack socket's view of an IPv4 peer) becomes
 * IPv4, as on the wire. Throws a TypeError for a name or a port out of 1..65535.
 */
export function endpoint(a: QuicAddr, what: string): QuicEndpoint {
  const ip = parseIp(a.hostname);
  if (!ip) throw new TypeError(`${what}: "${a.hostname}" is not an IP address`);
  if (!Number.isInteger(a.port) || a.port < 1 || a.port > 65535) {
    throw new TypeError(`${what}: port ${a.port} is not in 1..65535`);
  }
  return { family: ip.family, ip: ip.bytes, port: a.port };
}

/**
 * Unspecified, multicast, broadcast and IPv6 link-local addresses: the program cannot forward
 * to or from them (a link-local route needs an interface the address does not name).
 */
function unsupported(e: QuicEndpoint): boolean {
  const b = e.ip;
  if (e.family === 2) {
    const v4 = b.subarray(0, 4);
    return v4.every((x) => x === 0) || v4[0] >= 224;
  }
  return b.every((x) => x === 0) || b[0] === 0xff || (b[0] === 0xfe && (b[1] & 0xc0) === 0x80);
}

/**
 * The flow's two map entries, or the reason it stays in userspace.
 * @throws {TypeError} for an address that is not an IP literal or a bad port.
 */
export function flowEntries(flow: QuicFlow): QuicFlowEntries | QuicFlowRefusal {
  const c = endpoint(flow.client, "client");
  const l = endpoint(flow.listener, "listener");
  const s = endpoint(flow.local, "local");
  const b = endpoint(flow.backend, "backend");
  if (c.family !== l.family || s.family !== b.family || c.family !== s.family) {
    return "mixed_families";
  }
  if ([c, l, s, b].some(unsupported)) return "unsupported_address";
  return {
    toBackendKey: encodeQuicKey(c, l),
    toBackendValue: encodeQuicFlow(s, b, QUIC_TO_BACKEND),
    toClientKey: encodeQuicKey(b, s),
    toClientValue: encodeQuicFlow(l, c, 0),
  };
}

/** The two keys of a flow (to look it up or remove it), or null when it has none. */
export function flowKeys(flow: QuicFlow): [Uint8Array, Uint8Array] | null {
  const e = flowEntries(flow);
  return typeof e === "string" ? null : [e.toBackendKey, e.toClientKey];
}

/** `a:port` / `[a]:port` of an address, for messages. */
export function addrText(a: QuicAddr): string {
  return a.hostname.includes(":") ? `[${a.hostname}]:${a.port}` : `${a.hostname}:${a.port}`;
}
