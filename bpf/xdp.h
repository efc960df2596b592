/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map key/value layouts shared by the XDP source filter (xdp.bpf.c) and userspace.
 * The TypeScript mirror lives in src/ebpf/layout.ts: change both together.
 * Every field is a fixed-size integer and every struct is padding-free.
 */
#ifndef SNI_PROXY_XDP_H
#define SNI_PROXY_XDP_H

#include <linux/types.h>

/* LPM_TRIE keys: prefix length in bits (host order), then the address in network order. */
struct sni_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
}; /* 8 bytes */

struct sni_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
}; /* 20 bytes */

/* Single-entry array (key 0), written by userspace. */
struct sni_xdp_config {
	__u32 allow_active; /* 1: TCP to a port in `ports` from a source outside allow_v4/v6 drops */
	__u32 _reserved;
};

/* Stats index (PERCPU_ARRAY key): counters are kept per address family. */
#define SNI_XDP_STATS_V4 0
#define SNI_XDP_STATS_V6 1
#define SNI_XDP_STATS_OTHER 2 /* not IPv4/IPv6 (ARP, ...), or too short to parse: passed */
#define SNI_XDP_STATS_N 3

/* Per-CPU counters, one struct per stats index. 32 bytes. */
struct sni_xdp_stats {
	__u64 passed;
	__u64 dropped_deny;        /* source in deny_v4/deny_v6 */
	__u64 dropped_not_allowed; /* TCP to a listening port from a source outside the allow list */
	__u64 dropped_blocked;     /* TCP to a listening port from a source in blocked_v4/blocked_v6 */
};

/*
 * Value of blocked_v4 (key: the 4 address bytes) and blocked_v6 (key: the 16 address bytes),
 * written by userspace for a source that kept misbehaving. 16 bytes.
 */
struct sni_xdp_block {
	__u64 expires_ns; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) after which the entry is ignored */
	__u64 hits;       /* packets dropped for this entry */
};

#endif /* SNI_PROXY_XDP_H */
