/**
 * Sizes the eBPF fast path accepts: the one source of each bound, read by the config schema (so
 * a bad value is an error with its JSON path) and by the loaders (which check their options).
 *
 * @module
 */

/** Inclusive bounds of a whole number. */
export interface Range {
  min: number;
  max: number;
}

/** Capacity of each sockmap map (`ebpf.maps.pairs`, `ebpf.maps.sockets`). */
export const SOCKMAP_ENTRIES: Readonly<Range> = { min: 64, max: 16_777_216 };

/**
 * SO_SNDBUF / SO_RCVBUF of a kernel-mode socket (`ebpf.sndbuf`, `ebpf.rcvbuf`); 0 keeps the
 * kernel's autotuning. The kernel doubles the value in an int, so half of INT_MAX at most.
 */
export const SOCKET_BUFFER_BYTES: Readonly<Range> = { min: 0, max: 0x3fffffff };

/** Capacity of each XDP trie and of each block set (`ebpf.xdp.max_entries`, `....block.max_entries`). */
export const XDP_ENTRIES: Readonly<Range> = { min: 1, max: 1_048_576 };

/** Default capacity of each XDP trie (deny/allow x IPv4/IPv6). */
export const XDP_DEFAULT_ENTRIES = 16_384;

/** Default capacity of each XDP block set (IPv4, IPv6). */
export const XDP_DEFAULT_BLOCK_ENTRIES = 4096;

/** Capacity of the DNS cache (`dns.cache_entries`): a pinned BPF LRU map, or one in memory. */
export const DNS_CACHE_ENTRIES: Readonly<Range> = { min: 16, max: 16_777_216 };

/** Flows the QUIC fast path holds in the kernel (two map entries each). */
export const QUIC_FLOWS: Readonly<Range> = { min: 1, max: 1_048_576 };

/** Default of {@link QUIC_FLOWS}. */
export const QUIC_DEFAULT_FLOWS = 65_536;

/**
 * Server connection IDs the QUIC worker steering holds (one entry per ID a flow is followed
 * by, up to 4 per flow: `quic.max_flows` x 4, within these bounds).
 */
export const STEER_CIDS: Readonly<Range> = { min: 16, max: 4_194_304 };

/** Whether `n` is a whole number within `range`. */
export function inRange(n: number, range: Range): boolean {
  return Number.isInteger(n) && n >= range.min && n <= range.max;
}
