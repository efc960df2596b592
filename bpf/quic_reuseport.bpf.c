// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sni-proxy QUIC worker steering: which worker's listening socket a QUIC datagram goes to.
 *
 * With `workers` > 1 every worker binds a QUIC listener's UDP port with SO_REUSEPORT, and the
 * kernel picks one socket of the group per datagram by a hash of its addresses. A client that
 * rebinds (a NAT gives it a new port) keeps its connection IDs but may hash to another worker,
 * which has no flow for it. This BPF_PROG_TYPE_SK_REUSEPORT program, attached to the group
 * (SO_ATTACH_REUSEPORT_EBPF), reads the Destination Connection ID of the datagram's QUIC
 * header and, when it is one a worker learned from a backend (the Source Connection ID of its
 * long headers), selects that worker's socket from the socket array (bpf_sk_select_reuseport).
 *
 * - Long header: the DCID length is in the header (byte 5), the DCID follows.
 * - Short header: the DCID length is not on the wire; every length in use (quic_steer_lens,
 *   set by the workers as they learn IDs) is tried, shortest first.
 * Anything else (no such ID, unparsable, the worker's socket gone) returns SK_PASS without a
 * selection: the kernel's hash picks the socket, as without the program. Nothing is dropped.
 *
 * Userspace: src/ebpf/quic_reuseport.ts. Plain uapi headers only (no CO-RE, no vmlinux.h).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "quic_reuseport.h"

#define UDP_HLEN 8
/* The most of a QUIC header read: flags, version, DCID length, a DCID of 20 bytes. */
#define HEAD_MAX (1 + 4 + 1 + SNI_STEER_CID_MAX) /* 26: fits head[32] */

/* Default sizes; userspace sets the real ones before load (bpf_map__set_max_entries). Plain
 * HASH, not LRU: an entry is never evicted behind the workers' backs; a full map refuses the
 * insert (counted by the worker) and that flow is hashed as without the program. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sni_steer_cid);
	__type(value, __u32);
} quic_steer_cids SEC(".maps");

/* Index: listener index * workers + worker index - 1; value: the socket (fd from userspace). */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} quic_steer_socks SEC(".maps");

/* Index: a connection ID length; value non-zero: some flow's server ID has that length. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SNI_STEER_CID_MAX + 1);
	__type(key, __u32);
	__type(value, __u32);
} quic_steer_lens SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sni_steer_stats);
} quic_steer_stats SEC(".maps");

#define COUNT(field)                                                                          \
	({                                                                                    \
		__u32 zero_ = 0;                                                              \
		struct sni_steer_stats *st_ = bpf_map_lookup_elem(&quic_steer_stats, &zero_); \
		if (st_)                                                                      \
			st_->field++;                                                         \
		SK_PASS;                                                                      \
	})

/* The socket-array index of the flow whose server ID is head[at, at + len), or NULL. */
static __always_inline __u32 *lookup(const __u8 *head, __u32 at, __u32 len)
{
	struct sni_steer_cid key = { .len = len };

	/* unrolled, every byte: a loop up to `len` would be turned into memcpy, which BPF lacks;
	 * at + i < HEAD_MAX <= 32, the mask is for the verifier */
#pragma unroll
	for (__u32 i = 0; i < SNI_STEER_CID_MAX; i++)
		key.id[i] = i < len ? head[(at + i) & 31] : 0;
	return bpf_map_lookup_elem(&quic_steer_cids, &key);
}

SEC("sk_reuseport")
int sni_quic_steer(struct sk_reuseport_md *ctx)
{
	__u8 head[32] = {};
	__u32 *slot = 0;
	__u32 n;

	if (ctx->ip_protocol != IPPROTO_UDP || ctx->len < UDP_HLEN + 2)
		return COUNT(unparsable);
	n = ctx->len - UDP_HLEN;
	if (n >= HEAD_MAX) {
		n = HEAD_MAX;
		if (bpf_skb_load_bytes(ctx, UDP_HLEN, head, HEAD_MAX) < 0)
			return COUNT(unparsable);
	} else {
		/* shorter than the longest header (rare): byte by byte, every size constant */
		for (__u32 i = 0; i < HEAD_MAX; i++) {
			if (i >= n)
				break;
			if (bpf_skb_load_bytes(ctx, UDP_HLEN + i, &head[i & 31], 1) < 0)
				return COUNT(unparsable);
		}
	}
	if (head[0] & 0x80) {
		__u32 len = head[5];

		/* a Version Negotiation (version 0) comes from servers, never to them */
		if (n < 6 || (head[1] | head[2] | head[3] | head[4]) == 0 || len == 0 ||
		    len > SNI_STEER_CID_MAX || 6 + len > n)
			return COUNT(unparsable);
		slot = lookup(head, 6, len);
	} else {
		int known = 0;

		for (__u32 len = 1; len <= SNI_STEER_CID_MAX; len++) {
			__u32 index = len; /* the loop counter's address is not taken: it stays bounded */
			__u32 *used = bpf_map_lookup_elem(&quic_steer_lens, &index);

			if (!used || !*used)
				continue;
			known = 1;
			if (1 + len > n)
				break;
			slot = lookup(head, 1, len);
			if (slot)
				break;
		}
		if (!known)
			return COUNT(unparsable);
	}
	if (!slot)
		return COUNT(unknown_cid);
	if (bpf_sk_select_reuseport(ctx, &quic_steer_socks, slot, 0) < 0)
		return COUNT(no_socket);
	return COUNT(steered);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
