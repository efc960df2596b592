/**
 * The TypeScript mirror of bpf/sockmap.h, bpf/xdp.h, bpf/quic.h and bpf/quic_reuseport.h: map
 * names, key/value sizes and field offsets, the pin directory, and the encoders and decoders of
 * those bytes. Change it together with the headers; the loaders and the tests take every size
 * and offset from here.
 * Host-order fields are little endian: the fast path supports x86_64 and aarch64 only.
 * @module
 */

import type { Cidr } from "../route/acl.ts";
import type { SocketTuple } from "../conn/tcpinfo.ts";

// ---------------------------------------------------------------------------------------------
// bpf/sockmap.h

/**
 * Under this bpffs dir each kernel-mode proxy pins its sockmap maps in a dir of its own, named
 * by the pid of the process that loaded them ({@link instancePinDir}); its workers open them
 * there, `sni-proxy stats` and the tests read them there.
 */
export const PIN_ROOT = "/sys/fs/bpf/sni-proxy";

/** The pin dir of the instance whose loading process is `pid`. */
export function instancePinDir(pid: number = Deno.pid): string {
  return `${PIN_ROOT}/${pid}`;
}

/** The maps of bpf/sockmap.bpf.c, pinned under {@link instancePinDir}. */
export const SOCKMAP_MAPS = {
  sockhash: "sni_sockhash",
  pairs: "sni_pairs",
  stats: "sni_stats",
} as const;
export const PIN_MAPS = Object.values(SOCKMAP_MAPS);

/** struct sni_sock_key: family u32, local_port u32, remote_port u32, local_ip[16], remote_ip[16]. */
export const SOCK_KEY = {
  size: 44,
  family: 0,
  localPort: 4,
  remotePort: 8,
  localIp: 12,
  remoteIp: 28,
} as const;

/** struct sni_pair: peer key, upstream u32, bytes u64, packets u64. */
export const PAIR = { size: 64, peer: 0, upstream: 44, bytes: 48, packets: 56 } as const;

/**
 * A userspace lookup in the sockhash returns the socket cookie (u64); an update takes the
 * socket's fd (as a u64).
 */
export const SOCKHASH_VALUE_SIZE = 8;

/** struct sni_stats: u64 counters in this order (per-CPU array, key 0). */
export const SOCKMAP_STATS_FIELDS = [
  "bytes_spliced",
  "packets_spliced",
  "redirect_failures",
  "passed",
  "bytes_upstream",
  "packets_upstream",
  "empty_dropped",
] as const;
export const SOCKMAP_STATS_SIZE = SOCKMAP_STATS_FIELDS.length * 8;

/** Key 0 of a single-entry array (u32). */
export const KEY_ZERO = new Uint8Array(4);

/** The sockhash / pairing-map key of a socket's 4-tuple. */
export function encodeSockKey(t: SocketTuple, out = new Uint8Array(SOCK_KEY.size)): Uint8Array {
  const v = new DataView(out.buffer, out.byteOffset, out.byteLength);
  v.setUint32(SOCK_KEY.family, t.family, true);
  v.setUint32(SOCK_KEY.localPort, t.localPort, true);
  v.setUint32(SOCK_KEY.remotePort, t.remotePort, true);
  out.set(t.localIp.subarray(0, 16), SOCK_KEY.localIp);
  out.set(t.remoteIp.subarray(0, 16), SOCK_KEY.remoteIp);
  return out;
}

/** Fills `out` (PAIR.size bytes) with a pairing entry toward `peer`, counters zero. */
export function encodePair(out: Uint8Array, peer: Uint8Array, upstream: boolean): Uint8Array {
  out.fill(0);
  out.set(peer, PAIR.peer);
  new DataView(out.buffer, out.byteOffset, out.byteLength)
    .setUint32(PAIR.upstream, upstream ? 1 : 0, true);
  return out;
}

/** The redirected-bytes counter of a pairing entry. */
export function pairBytes(value: Uint8Array): number {
  return Number(
    new DataView(value.buffer, value.byteOffset, value.byteLength)
      .getBigUint64(PAIR.bytes, true),
  );
}

// ---------------------------------------------------------------------------------------------
// bpf/xdp.h

/** The maps of bpf/xdp.bpf.c. */
export const XDP_TRIES = ["deny_v4", "deny_v6", "allow_v4", "allow_v6"] as const;
export const XDP_MAPS = [...XDP_TRIES, "ports", "xdp_config"] as const;
export const XDP_STATS_MAP = "xdp_stats";
/** The temporary blocks of misbehaving sources (HASH: address bytes -> struct sni_xdp_block). */
export const XDP_BLOCK_MAPS = { v4: "blocked_v4", v6: "blocked_v6" } as const;
export const XDP_PROGRAM = "sni_xdp_filter";

/** struct sni_lpm_v4 / sni_lpm_v6: prefixlen u32 (host order), then addr in network order. */
export const LPM_V4 = { size: 8, prefixlen: 0, addr: 4 } as const;
export const LPM_V6 = { size: 20, prefixlen: 0, addr: 4 } as const;
/** Value of a trie entry (u32, unused by the program) and of a port entry (u8). */
export const TRIE_VALUE = new Uint8Array([1, 0, 0, 0]);
export const PORT_VALUE = new Uint8Array([1]);
/** The key of `ports`: a TCP port in network byte order, as in the TCP header (u16). */
export function portKey(port: number): Uint8Array {
  return new Uint8Array([port >> 8, port & 0xff]);
}
/** max_entries of `ports` in bpf/xdp.bpf.c. */
export const XDP_PORTS_MAX = 1024;

/** struct sni_xdp_config (single-entry array, key 0): allow_active u32, reserved u32. */
export const XDP_CONFIG = { size: 8, allowActive: 0 } as const;

/** struct sni_xdp_stats: u64 counters, one struct per stats index (SNI_XDP_STATS_*). */
export const XDP_STATS_FIELDS = [
  "passed",
  "dropped_deny",
  "dropped_not_allowed",
  "dropped_blocked",
] as const;
export const XDP_STATS_SIZE = 32;
export const XDP_STATS_INDEX = { ipv4: 0, ipv6: 1, other: 2 } as const;

/** The key bytes of a CIDR in its family's trie, host bits cleared (so equal blocks are equal). */
export function lpmKey(cidr: Cidr): Uint8Array {
  const layout = cidr.v6 ? LPM_V6 : LPM_V4;
  const key = new Uint8Array(layout.size);
  const v = new DataView(key.buffer);
  v.setUint32(layout.prefixlen, cidr.prefix, true);
  const first = cidr.v6 ? 0 : 3;
  for (let i = first; i < 4; i++) {
    const bits = Math.max(0, Math.min(32, cidr.prefix - 32 * (i - first)));
    const mask = bits === 0 ? 0 : bits === 32 ? 0xffffffff : ~(0xffffffff >>> bits) >>> 0;
    v.setUint32(layout.addr + 4 * (i - first), (cidr.words[i] & mask) >>> 0, false);
  }
  return key;
}

/** struct sni_xdp_block: expiry (u64, bpf_ktime_get_ns() units) and hits (u64). */
export const XDP_BLOCK = { size: 16, expiresNs: 0, hits: 8 } as const;

/** The value of a blocked_v4/blocked_v6 entry expiring at `expiresNs` (CLOCK_MONOTONIC). */
export function encodeXdpBlock(expiresNs: bigint): Uint8Array {
  const v = new Uint8Array(XDP_BLOCK.size);
  new DataView(v.buffer).setBigUint64(XDP_BLOCK.expiresNs, expiresNs, true);
  return v;
}

/** Expiry and hits of a blocked_v4/blocked_v6 value. */
export function decodeXdpBlock(v: Uint8Array): { expiresNs: bigint; hits: number } {
  const d = new DataView(v.buffer, v.byteOffset, v.byteLength);
  return {
    expiresNs: d.getBigUint64(XDP_BLOCK.expiresNs, true),
    hits: Number(d.getBigUint64(XDP_BLOCK.hits, true)),
  };
}

/** The value of xdp_config. */
export function encodeXdpConfig(allowActive: boolean): Uint8Array {
  const cfg = new Uint8Array(XDP_CONFIG.size);
  new DataView(cfg.buffer).setUint32(XDP_CONFIG.allowActive, allowActive ? 1 : 0, true);
  return cfg;
}

/** A u32 array key. */
export function u32Key(i: number): Uint8Array {
  return new Uint8Array(new Uint32Array([i]).buffer);
}

// ---------------------------------------------------------------------------------------------
// bpf/quic.h

/** The maps and the program of bpf/quic.bpf.c. */
export const QUIC_MAPS = { flows: "quic_flows", stats: "quic_stats" } as const;
export const QUIC_PROGRAM = "sni_quic_tc";

/**
 * struct sni_quic_key: family u32 (host order), sport, dport (network order), saddr[16],
 * daddr[16] (network order; IPv4 in the first 4 bytes).
 */
export const QUIC_KEY = { size: 40, family: 0, sport: 4, dport: 6, saddr: 8, daddr: 24 } as const;

/**
 * struct sni_quic_flow: the rewrite target (saddr[16], daddr[16], sport, dport), flags u32, then
 * what the program updates: last_seen_ns, packets, bytes (u64), and the way back to the key's
 * source it learns (path_ifindex u32, path_peer_mac[6], path_self_mac[6]).
 */
export const QUIC_FLOW = {
  size: 80,
  saddr: 0,
  daddr: 16,
  sport: 32,
  dport: 34,
  flags: 36,
  lastSeenNs: 40,
  packets: 48,
  bytes: 56,
  pathIfindex: 64,
  pathPeerMac: 68,
  pathSelfMac: 74,
} as const;

/** sni_quic_flow.flags: the entry of the client -> backend direction. */
export const QUIC_TO_BACKEND = 1;

/** struct sni_quic_stats: u64 counters in this order (per-CPU array, key 0). */
export const QUIC_STATS_FIELDS = [
  "to_backend_packets",
  "to_backend_bytes",
  "to_client_packets",
  "to_client_bytes",
  "delivered_local",
  "redirected",
  "redirected_learned",
  "passed_no_flow",
  "passed_fragment",
  "passed_ip_options",
  "passed_truncated",
  "passed_fib",
  "fib_fwd_disabled",
  "fib_frag_needed",
  "fib_no_route",
] as const;
export const QUIC_STATS_SIZE = QUIC_STATS_FIELDS.length * 8;

/** One end of a UDP datagram: address bytes (network order, 16; IPv4 in the first 4) and port. */
export interface QuicEndpoint {
  /** 2 (AF_INET) or 10 (AF_INET6). */
  family: number;
  ip: Uint8Array;
  port: number;
}

/** The flow-map key of a datagram from `src` to `dst` (same family). */
export function encodeQuicKey(src: QuicEndpoint, dst: QuicEndpoint): Uint8Array {
  const out = new Uint8Array(QUIC_KEY.size);
  const v = new DataView(out.buffer);
  v.setUint32(QUIC_KEY.family, src.family, true);
  v.setUint16(QUIC_KEY.sport, src.port, false);
  v.setUint16(QUIC_KEY.dport, dst.port, false);
  out.set(src.ip.subarray(0, 16), QUIC_KEY.saddr);
  out.set(dst.ip.subarray(0, 16), QUIC_KEY.daddr);
  return out;
}

/** A flow-map value rewriting to `src` -> `dst`, counters zero. */
export function encodeQuicFlow(src: QuicEndpoint, dst: QuicEndpoint, flags: number): Uint8Array {
  const out = new Uint8Array(QUIC_FLOW.size);
  const v = new DataView(out.buffer);
  out.set(src.ip.subarray(0, 16), QUIC_FLOW.saddr);
  out.set(dst.ip.subarray(0, 16), QUIC_FLOW.daddr);
  v.setUint16(QUIC_FLOW.sport, src.port, false);
  v.setUint16(QUIC_FLOW.dport, dst.port, false);
  v.setUint32(QUIC_FLOW.flags, flags, true);
  return out;
}

/** What the program recorded in a flow-map value. */
export function decodeQuicFlowCounters(
  value: Uint8Array,
): { lastSeenNs: bigint; packets: number; bytes: number } {
  const v = new DataView(value.buffer, value.byteOffset, value.byteLength);
  return {
    lastSeenNs: v.getBigUint64(QUIC_FLOW.lastSeenNs, true),
    packets: Number(v.getBigUint64(QUIC_FLOW.packets, true)),
    bytes: Number(v.getBigUint64(QUIC_FLOW.bytes, true)),
  };
}

// ---------------------------------------------------------------------------------------------
// bpf/quic_reuseport.h

/** The maps and the program of bpf/quic_reuseport.bpf.c, pinned under the instance's dir. */
export const STEER_MAPS = {
  cids: "quic_steer_cids",
  socks: "quic_steer_socks",
  lens: "quic_steer_lens",
  stats: "quic_steer_stats",
} as const;
export const STEER_PROGRAM = "sni_quic_steer";
/** The program's pin (beside its maps' pins), which the workers attach to their sockets. */
export const STEER_PROGRAM_PIN = "quic_steer_prog";

/** SNI_STEER_CID_MAX: the longest connection ID (RFC 9000). */
export const STEER_CID_MAX = 20;
/** struct sni_steer_cid: len u32 (host order), id[20] (zero past len). */
export const STEER_CID = { size: 24, len: 0, id: 4 } as const;
/** The cid map's value: a u32 socket-array index; the socket array's value: a u64 fd. */
export const STEER_SLOT_SIZE = 4;
export const STEER_SOCK_SIZE = 8;

/** struct sni_steer_stats: u64 counters in this order (per-CPU array, key 0). */
export const STEER_STATS_FIELDS = ["steered", "unknown_cid", "unparsable", "no_socket"] as const;
export const STEER_STATS_SIZE = STEER_STATS_FIELDS.length * 8;

/** The cid-map key of a connection ID given as a CID key string (one char per byte). */
export function encodeSteerCid(cid: string): Uint8Array {
  const out = new Uint8Array(STEER_CID.size);
  new DataView(out.buffer).setUint32(STEER_CID.len, cid.length, true);
  for (let i = 0; i < cid.length && i < STEER_CID_MAX; i++) {
    out[STEER_CID.id + i] = cid.charCodeAt(i);
  }
  return out;
}
