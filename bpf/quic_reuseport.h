/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map key/value layouts shared by the QUIC worker-steering program (quic_reuseport.bpf.c) and
 * userspace. The TypeScript mirror lives in src/ebpf/layout.ts: change both together.
 * Every field is a fixed-size integer and every struct is padding-free.
 */
#ifndef SNI_PROXY_QUIC_REUSEPORT_H
#define SNI_PROXY_QUIC_REUSEPORT_H

#include <linux/types.h>

/* QUIC v1/v2 connection IDs are at most 20 bytes (RFC 9000 17.2). */
#define SNI_STEER_CID_MAX 20

/*
 * A server-chosen connection ID: the cid map's key (its value: the __u32 index, in the socket
 * array, of the listening socket of the worker that holds the flow). The bytes past `len` are
 * zero. 24 bytes.
 */
struct sni_steer_cid {
	__u32 len; /* 1..SNI_STEER_CID_MAX */
	__u8 id[SNI_STEER_CID_MAX];
};

/* Per-CPU counters (single-entry PERCPU_ARRAY, key 0). 32 bytes. */
struct sni_steer_stats {
	__u64 steered;     /* sent to the socket of the worker that holds the flow */
	__u64 unknown_cid; /* a QUIC header whose DCID is in no flow: the kernel's hash */
	__u64 unparsable;  /* too short for a QUIC header, a Version Negotiation, a DCID length
			    * over 20, or a short header while no length is known: the hash */
	__u64 no_socket;   /* the flow's worker has no socket in the array (it died, or the
			    * socket is of another reuseport group): the hash */
};

#endif /* SNI_PROXY_QUIC_REUSEPORT_H */
