/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map key/value layouts shared by the QUIC forwarding program (quic.bpf.c) and userspace.
 * The TypeScript mirror lives in src/ebpf/layout.ts: change both together.
 * Every field is a fixed-size integer and every struct is padding-free. Addresses and ports are
 * in network byte order (as in the packet); an IPv4 address fills the first 4 of its 16 bytes,
 * the rest zero.
 */
#ifndef SNI_PROXY_QUIC_H
#define SNI_PROXY_QUIC_H

#include <linux/types.h>

#define SNI_QUIC_AF_INET 2
#define SNI_QUIC_AF_INET6 10

/* A UDP datagram's addresses as it arrives: the flow map's key. 40 bytes. */
struct sni_quic_key {
	__u32 family; /* SNI_QUIC_AF_INET or SNI_QUIC_AF_INET6 */
	__be16 sport;
	__be16 dport;
	__u8 saddr[16];
	__u8 daddr[16];
};

/* sni_quic_flow.flags */
#define SNI_QUIC_TO_BACKEND 1 /* client -> listener, rewritten to local socket -> backend */

/*
 * What a datagram of the key's flow becomes (the other leg), and what the program saw of it.
 * Userspace writes the first fields (the rest zero), the program updates the others. 80 bytes.
 */
struct sni_quic_flow {
	__u8 saddr[16]; /* new source address (same family as the key) */
	__u8 daddr[16]; /* new destination address */
	__be16 sport;
	__be16 dport;
	__u32 flags;        /* SNI_QUIC_* */
	__u64 last_seen_ns; /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last datagram forwarded */
	__u64 packets;      /* datagrams forwarded */
	__u64 bytes;        /* UDP payload bytes forwarded */
	/* The way back to this key's source, learned from its datagrams: the interface they arrive
	 * on, the MAC of the last hop (their Ethernet source) and ours there. The other direction
	 * sends through it when the FIB lookup is refused (forwarding off on its interface). */
	__u32 path_ifindex; /* 0: nothing learned yet */
	__u8 path_peer_mac[6];
	__u8 path_self_mac[6];
};

/* Per-CPU counters (single-entry PERCPU_ARRAY, key 0). 120 bytes. */
struct sni_quic_stats {
	__u64 to_backend_packets; /* forwarded client -> backend */
	__u64 to_backend_bytes;   /* their UDP payload bytes */
	__u64 to_client_packets;  /* forwarded backend -> client */
	__u64 to_client_bytes;
	__u64 delivered_local;    /* of the forwarded: to a local address (the stack delivers them) */
	__u64 redirected;         /* of the forwarded: to another host (bpf_redirect_neigh) */
	__u64 redirected_learned; /* of the redirected: the learned way back (FIB refused) */
	/* passed to the stack unchanged (userspace gets them), by reason */
	__u64 passed_no_flow;     /* UDP without a flow entry: a flow's first datagrams, other UDP
				   * traffic, and datagrams this program sent into lo already */
	__u64 passed_fragment;    /* IP fragments */
	__u64 passed_ip_options;  /* IPv4 options (UDP), IPv6 extension headers (any protocol) */
	__u64 passed_truncated;   /* headers shorter than they claim */
	__u64 passed_fib;         /* route lookup failed (below); the datagram goes to userspace */
	/* route lookup failures (bpf_fib_lookup), passed unchanged */
	__u64 fib_fwd_disabled;   /* forwarding off on the ingress interface, no way back learned */
	__u64 fib_frag_needed;    /* the datagram is larger than the egress MTU (either way) */
	__u64 fib_no_route;       /* blackhole, unreachable, prohibit, no neighbour, other */
};

#endif /* SNI_PROXY_QUIC_H */
