/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map key/value layouts shared by the kernel programs (sockmap.bpf.c) and userspace.
 * The TypeScript mirror lives in src/ebpf/layout.ts: change both together.
 * Every field is a fixed-size integer and every struct is padding-free, so the same bytes mean
 * the same thing on both sides.
 */
#ifndef SNI_PROXY_SOCKMAP_H
#define SNI_PROXY_SOCKMAP_H

#include <linux/types.h>

#define SNI_AF_INET 2
#define SNI_AF_INET6 10

/*
 * A TCP socket's 4-tuple as seen from that socket. An IPv4-mapped IPv6 socket (a dual-stack
 * listener accepting an IPv4 client) is stored as SNI_AF_INET, so userspace never has to know
 * which kind of listener accepted it. 44 bytes.
 */
struct sni_sock_key {
	__u32 family;      /* SNI_AF_INET or SNI_AF_INET6 */
	__u32 local_port;  /* host byte order */
	__u32 remote_port; /* host byte order */
	__u32 local_ip[4]; /* network byte order; IPv4 in [0], [1..3] zero */
	__u32 remote_ip[4];
};

/*
 * Pairing entry, keyed by the receiving socket: what arrives on it goes to `peer`. Written by
 * userspace once a session is routed (before it inserts the sockets into the sockhash); the
 * counters are written by the verdict program. 64 bytes.
 */
struct sni_pair {
	struct sni_sock_key peer;
	__u32 upstream; /* 1: this is the client's socket (its bytes go to the backend); also aligns */
	__u64 bytes;   /* payload bytes received on this socket and redirected to peer */
	__u64 packets; /* skbs redirected */
};

/*
 * Per-CPU counters of the verdict program (single-entry per-CPU array, key 0). 56 bytes.
 * Sockets are inserted and removed by userspace, which counts them itself.
 */
struct sni_stats {
	__u64 bytes_spliced;     /* payload bytes redirected socket to socket */
	__u64 packets_spliced;   /* skbs redirected */
	__u64 redirect_failures; /* pair found but peer not in the sockhash: passed to userspace */
	__u64 passed;            /* skbs without a pair, passed to userspace */
	__u64 bytes_upstream;    /* the part of bytes_spliced that went client -> backend */
	__u64 packets_upstream;  /* the part of packets_spliced that went client -> backend */
	__u64 empty_dropped;     /* skbs without payload (a FIN) dropped: TCP already saw the FIN */
};

#endif /* SNI_PROXY_SOCKMAP_H */
