// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sni-proxy kernel fast path: splice routed client/backend socket pairs inside the kernel.
 *
 * - sni_sockops (sock_ops, attached to the proxy's cgroup v2 dir) inserts every established TCP
 *   socket of the proxy (passive and active) into sni_sockhash, keyed by its 4-tuple.
 * - sni_verdict (sk_skb verdict, attached to sni_sockhash) redirects what a paired socket receives
 *   to the peer socket's egress and counts it; unpaired traffic is passed to userspace.
 * - No stream parser: under one, this kernel (6.18) lets bytes passed to userspace sit where
 *   recv() does not see them (it returns EAGAIN with the receive buffer full), which stalls a
 *   throttled direction for good. The plain verdict mode wakes the reader after each redirect
 *   instead; userspace pays one empty read for it.
 *
 * - Backpressure: a redirect empties the receiving socket at once, so TCP would never hold a fast
 *   sender back for a slow reader (one client that stops reading could pin gigabytes). The
 *   verdict keeps each direction's bytes held for the peer under sni_config.max_buffered and
 *   otherwise passes them to userspace, which relays them with flow control (see sni_pair in
 *   sockmap.h for the hand-over rules).
 *
 * Plain uapi headers (no vmlinux.h); the peer socket's bytes_acked is read through CO-RE
 * (bpf_skc_to_tcp_sock, Linux >= 5.9 with BTF).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#include "sockmap.h"

#define SOL_SOCKET 1
#define SO_SNDBUF 7
#define SO_RCVBUF 8
#define TCP_CLOSE 7

/* The one field of the kernel's struct tcp_sock the verdict reads, relocated by CO-RE. */
struct tcp_sock {
	__u64 bytes_acked;
} __attribute__((preserve_access_index));

/* Default sizes; userspace sets the real ones from config before load. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sni_sock_key);
	__type(value, __u64); /* 8 bytes: a userspace lookup returns the socket cookie */
} sni_sockhash SEC(".maps");

/* A plain hash, not an LRU: a full map refuses a new pair (userspace mode) and never evicts a
 * live one. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sni_sock_key);
	__type(value, struct sni_pair);
} sni_pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sni_sock_key);
	__type(value, struct sni_resume);
} sni_resume SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sni_stats);
} sni_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sni_config);
} sni_config SEC(".maps");

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
 * Both contexts expose remote_port as a 16-bit network-order port shifted into the upper half
 * of the u32 on little endian (i.e. the u32 is the port in network byte order); bpf_ntohl()
 * gives the host-order port on either endianness. local_port is host order already.
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

SEC("sockops")
int sni_sockops(struct bpf_sock_ops *skops)
{
	struct sni_sock_key key;
	struct sni_config *cfg;
	struct sni_stats *st;
	__u32 zero = 0;
	int val;

	if (skops->op == BPF_SOCK_OPS_STATE_CB) {
		/* a tracked socket leaving the maps: live sockets = inserted - closed */
		if (skops->args[1] == TCP_CLOSE && skops->args[0] != TCP_CLOSE) {
			st = stats();
			if (st)
				st->sockets_closed++;
		}
		return 1;
	}
	if (skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (!FILL_KEY(&key, skops))
		return 1;

	st = stats();
	/* Bound the kernel memory a spliced connection can hold (0 = kernel default/autotune). */
	cfg = bpf_map_lookup_elem(&sni_config, &zero);
	if (cfg) {
		if (cfg->sndbuf) {
			val = cfg->sndbuf;
			if (bpf_setsockopt(skops, SOL_SOCKET, SO_SNDBUF, &val, sizeof(val)) && st)
				st->setsockopt_failures++;
		}
		if (cfg->rcvbuf) {
			val = cfg->rcvbuf;
			if (bpf_setsockopt(skops, SOL_SOCKET, SO_RCVBUF, &val, sizeof(val)) && st)
				st->setsockopt_failures++;
		}
	}

	if (bpf_sock_hash_update(skops, &sni_sockhash, &key, BPF_ANY) == 0) {
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		if (st)
			st->sockets_inserted++;
	} else if (st) {
		st->insert_failures++;
	}
	return 1;
}

/*
 * Bytes held for the peer of a direction: redirected plus written by userspace, less what the
 * peer's remote end has acknowledged. Includes the redirect queue, which no socket accounts for.
 */
static __always_inline __u64 held_for_peer(struct sni_pair *pair, struct sni_resume *resume,
					   void *sockets)
{
	struct bpf_sock *peer_sk;
	struct tcp_sock *tp;
	__u64 acked = 0, sent;

	peer_sk = bpf_map_lookup_elem(sockets, &pair->peer);
	if (!peer_sk)
		return (__u64)-1;
	tp = bpf_skc_to_tcp_sock(peer_sk);
	if (tp)
		acked = BPF_CORE_READ(tp, bytes_acked);
	bpf_sk_release(peer_sk);
	sent = pair->bytes + (resume ? resume->written : 0);
	acked -= pair->acked_base;
	return sent > acked ? sent - acked : 0;
}

/* Hands the bytes to the receiving socket's reader (userspace relays them with flow control). */
static __always_inline int pass_to_userspace(struct sni_pair *pair, struct sni_stats *st, __u32 len)
{
	pair->passed += len;
	if (st)
		st->bytes_passed += len;
	return SK_PASS;
}

/* Redirect what a paired socket received to its peer in `sockets`; pass everything else. */
static __always_inline int splice_verdict(struct __sk_buff *skb, void *sockets)
{
	struct sni_sock_key key, peer;
	struct sni_resume *resume;
	struct sni_config *cfg;
	struct sni_pair *pair;
	struct sni_stats *st;
	__u32 len = skb->len, zero = 0;
	__u64 held, limit = 0;

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
	cfg = bpf_map_lookup_elem(&sni_config, &zero);
	if (cfg)
		limit = cfg->max_buffered;
	resume = bpf_map_lookup_elem(&sni_resume, &key);
	held = held_for_peer(pair, resume, sockets);
	if (held == (__u64)-1) {
		/* Peer gone (closed, not inserted): hand the bytes to userspace, never drop them. */
		if (st)
			st->redirect_failures++;
		pair->throttled = 1;
		return pass_to_userspace(pair, st, len);
	}
	if (held > pair->max_held)
		pair->max_held = held;
	if (pair->throttled) {
		/* Stay in userspace until it wrote every passed byte (order) and the peer caught up. */
		if (!resume || resume->consumed != pair->passed || (limit && held > limit / 2))
			return pass_to_userspace(pair, st, len);
		pair->throttled = 0;
	} else if (limit && held + len > limit) {
		pair->throttled = 1;
		pair->throttles++;
		if (st)
			st->throttles++;
		return pass_to_userspace(pair, st, len);
	}
	__builtin_memcpy(&peer, &pair->peer, sizeof(peer));
	if (bpf_sk_redirect_hash(skb, sockets, &peer, 0) != SK_PASS) {
		if (st)
			st->redirect_failures++;
		pair->throttled = 1;
		return pass_to_userspace(pair, st, len);
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
