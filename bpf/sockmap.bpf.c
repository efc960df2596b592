// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sni-proxy kernel fast path: splice routed client/backend socket pairs inside the kernel.
 *
 * - Userspace inserts the two sockets of a routed session into sni_sockhash by fd (keyed by each
 *   socket's 4-tuple), after writing their sni_pairs entries; a socket that closes leaves the
 *   sockhash by itself. No cgroup program: only the sockets userspace hands over are seen, so
 *   two proxy instances on one host never see each other's sockets.
 * - sni_verdict (sk_skb verdict, attached to sni_sockhash) redirects what a paired socket receives
 *   to the peer socket's egress and counts it; unpaired traffic is passed to userspace.
 * - No backpressure: a redirect takes the bytes out of the receiving socket at once, so TCP never
 *   holds a fast sender back for a slow reader, and on 6.18 neither handing the bytes to
 *   userspace (SK_PASS: under memory pressure the socket's reader got bytes that were never sent)
 *   nor taking a busy socket out of the map (its queues are purged) is safe. This mode is opt-in
 *   (ebpf.splice_mode "sockmap"); the default relays with splice(2), which has flow control.
 * - No stream parser: under one, this kernel loses wakeups and recv() returns EAGAIN with bytes
 *   queued for the reader.
 *
 * Plain uapi headers only (no CO-RE, no vmlinux.h): the object loads on kernels without BTF.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sockmap.h"

/* Default sizes; userspace sets the real ones from config before load. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sni_sock_key);
	__type(value, __u64); /* 8 bytes: a userspace lookup returns the socket cookie */
} sni_sockhash SEC(".maps");

/* A plain hash, not an LRU: a full map refuses a new pair (that connection runs in userspace
 * mode) and never evicts a live one. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sni_sock_key);
	__type(value, struct sni_pair);
} sni_pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sni_stats);
} sni_stats SEC(".maps");

static __always_inline struct sni_stats *stats(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&sni_stats, &zero);
}

static __always_inline int is_v4_mapped(__u32 a0, __u32 a1, __u32 a2)
{
	return a0 == 0 && a1 == 0 && a2 == bpf_htonl(0x0000ffff);
}

/*
 * __sk_buff exposes remote_port as a 16-bit network-order port shifted into the upper half of
 * the u32 on little endian (i.e. the u32 is the port in network byte order); bpf_ntohl() gives
 * the host-order port on either endianness. local_port is host order already.
 */
#define FILL_KEY(key, ctx)                                                                     \
	({                                                                                     \
		int ok_ = 1;                                                                   \
		__builtin_memset(key, 0, sizeof(*(key)));                                      \
		(key)->local_port = (ctx)->local_port;                                         \
		(key)->remote_port = bpf_ntohl((ctx)->remote_port) & 0xffff;                   \
		if ((ctx)->family == SNI_AF_INET) {                                            \
			(key)->family = SNI_AF_INET;                                           \
			(key)->local_ip[0] = (ctx)->local_ip4;                                 \
			(key)->remote_ip[0] = (ctx)->remote_ip4;                               \
		} else if ((ctx)->family == SNI_AF_INET6) {                                    \
			__u32 l0 = (ctx)->local_ip6[0], l1 = (ctx)->local_ip6[1];              \
			__u32 l2 = (ctx)->local_ip6[2], l3 = (ctx)->local_ip6[3];              \
			__u32 r0 = (ctx)->remote_ip6[0], r1 = (ctx)->remote_ip6[1];            \
			__u32 r2 = (ctx)->remote_ip6[2], r3 = (ctx)->remote_ip6[3];            \
			if (is_v4_mapped(l0, l1, l2) && is_v4_mapped(r0, r1, r2)) {            \
				(key)->family = SNI_AF_INET;                                   \
				(key)->local_ip[0] = l3;                                       \
				(key)->remote_ip[0] = r3;                                      \
			} else {                                                               \
				(key)->family = SNI_AF_INET6;                                  \
				(key)->local_ip[0] = l0;                                       \
				(key)->local_ip[1] = l1;                                       \
				(key)->local_ip[2] = l2;                                       \
				(key)->local_ip[3] = l3;                                       \
				(key)->remote_ip[0] = r0;                                      \
				(key)->remote_ip[1] = r1;                                      \
				(key)->remote_ip[2] = r2;                                      \
				(key)->remote_ip[3] = r3;                                      \
			}                                                                      \
		} else {                                                                       \
			ok_ = 0;                                                               \
		}                                                                              \
		ok_;                                                                           \
	})

/* Redirect what a paired socket received to its peer in `sockets`; pass everything else. */
static __always_inline int splice_verdict(struct __sk_buff *skb, void *sockets)
{
	struct sni_sock_key key, peer;
	struct sni_pair *pair;
	struct sni_stats *st;
	__u32 len = skb->len;

	st = stats();
	/*
	 * A FIN arrives as an skb without payload. TCP has already taken note of it (userspace reads
	 * EOF from the socket state), so the empty skb is dropped. Either other verdict breaks a
	 * stream: redirected, the peer's redirect worker sends 0 bytes, takes that for a broken pipe
	 * and stops (EPIPE on the peer, anything queued after it dropped); passed, it is queued
	 * behind the bytes being redirected to this socket, and the same worker stalls on it.
	 */
	if (!len) {
		if (st)
			st->empty_dropped++;
		return SK_DROP;
	}
	if (!FILL_KEY(&key, skb))
		return SK_PASS;
	pair = bpf_map_lookup_elem(&sni_pairs, &key);
	if (!pair) {
		if (st)
			st->passed++;
		return SK_PASS;
	}
	__builtin_memcpy(&peer, &pair->peer, sizeof(peer));
	if (bpf_sk_redirect_hash(skb, sockets, &peer, 0) != SK_PASS) {
		/* Peer gone (closed, not yet inserted): hand the bytes to userspace, never drop them. */
		if (st)
			st->redirect_failures++;
		return SK_PASS;
	}
	__sync_fetch_and_add(&pair->bytes, len);
	__sync_fetch_and_add(&pair->packets, 1);
	if (st) {
		st->bytes_spliced += len;
		st->packets_spliced++;
		if (pair->upstream) {
			st->bytes_upstream += len;
			st->packets_upstream++;
		}
	}
	return SK_PASS;
}

SEC("sk_skb/stream_verdict")
int sni_verdict(struct __sk_buff *skb)
{
	return splice_verdict(skb, &sni_sockhash);
}

char _license[] SEC("license") = "Dual BSD/GPL";
