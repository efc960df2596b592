// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sni-proxy XDP source filter: the first line of the source ACL, before the kernel builds an skb.
 *
 * - Every IPv4/IPv6 packet whose source is in deny_v4/deny_v6 (LPM tries) is dropped, whatever
 *   its protocol.
 * - A TCP or UDP (QUIC) packet to one of the proxy's listening ports (`ports`) from a source in
 *   blocked_v4/blocked_v6 (temporary blocks userspace sets for misbehaving sources) is dropped
 *   while bpf_ktime_get_ns() is before the entry's expiry; an expired entry is ignored (and
 *   deleted by userspace's sweep).
 * - When the allow list is active (xdp_config.allow_active), a TCP or UDP packet to one of the
 *   proxy's listening ports (`ports`) from a source outside allow_v4/allow_v6 is dropped. Other
 *   traffic (backend replies to ephemeral ports, DNS, ...) is not subject to the allow list.
 * - Everything else passes: non-IP frames, truncated headers, non-first fragments.
 * Up to two VLAN tags (802.1Q/802.1ad) that are still in the frame are skipped; up to four IPv6
 * extension headers (hop-by-hop, routing, destination options, fragment) are walked.
 * Counters are per CPU and per address family (struct sni_xdp_stats).
 *
 * Userspace (src/ebpf/xdp.ts) updates the maps in place on reload; at a restart the new
 * instance swaps its own program (with its own maps) into the old one's BPF link
 * (src/ebpf/xdp_handover.ts).
 * Plain uapi headers only (no CO-RE, no vmlinux.h).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xdp.h"

#define IP_FRAG_OFFSET 0x1fff /* fragment offset bits of iphdr.frag_off (host order) */
#define IP6_FRAG_OFFSET 0xfff8
#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT_HDRS 4

struct vlan_tag {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/* Default sizes; userspace sets the real ones before load (bpf_map__set_max_entries). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct sni_lpm_v4);
	__type(value, __u32);
} deny_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct sni_lpm_v6);
	__type(value, __u32);
} deny_v6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct sni_lpm_v4);
	__type(value, __u32);
} allow_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 1024);
	__type(key, struct sni_lpm_v6);
	__type(value, __u32);
} allow_v6 SEC(".maps");

/* Temporary blocks: address bytes -> expiry and hit count. Plain HASH, not LRU: userspace keeps
 * it below max_entries and never has an entry evicted behind its back. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, struct sni_xdp_block);
} blocked_v4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct in6_addr);
	__type(value, struct sni_xdp_block);
} blocked_v6 SEC(".maps");

/* The proxy's listening TCP ports, key in network byte order (as in the TCP header). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u16);
	__type(value, __u8);
} ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sni_xdp_config);
} xdp_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SNI_XDP_STATS_N);
	__type(key, __u32);
	__type(value, struct sni_xdp_stats);
} xdp_stats SEC(".maps");

enum outcome { PASSED, DROPPED_DENY, DROPPED_NOT_ALLOWED, DROPPED_BLOCKED };

/* Count the outcome under stats index `family` and return the XDP action for it. */
static __always_inline int account(__u32 family, enum outcome outcome)
{
	struct sni_xdp_stats *st = bpf_map_lookup_elem(&xdp_stats, &family);

	if (st) {
		if (outcome == PASSED)
			st->passed++;
		else if (outcome == DROPPED_DENY)
			st->dropped_deny++;
		else if (outcome == DROPPED_BLOCKED)
			st->dropped_blocked++;
		else
			st->dropped_not_allowed++;
	}
	return outcome == PASSED ? XDP_PASS : XDP_DROP;
}

static __always_inline int allow_list_active(void)
{
	__u32 zero = 0;
	struct sni_xdp_config *cfg = bpf_map_lookup_elem(&xdp_config, &zero);

	return cfg && cfg->allow_active;
}

/* True when `entry` (a blocked_v4/blocked_v6 lookup) blocks now; counts the hit. */
static __always_inline int blocks(struct sni_xdp_block *entry)
{
	if (!entry || bpf_ktime_get_ns() >= entry->expires_ns)
		return 0;
	__sync_fetch_and_add(&entry->hits, 1);
	return 1;
}

/*
 * True when the TCP or UDP header at `l4` (bounds-checked here) is addressed to one of the
 * listening ports (TLS and HTTP over TCP, QUIC over UDP). Both headers start with the source
 * and destination ports.
 */
static __always_inline int to_listening_port(void *l4, void *data_end)
{
	struct udphdr *ports_of = l4;
	__u16 dest;

	if ((void *)(ports_of + 1) > data_end)
		return 0;
	dest = ports_of->dest;
	return bpf_map_lookup_elem(&ports, &dest) != 0;
}

static __always_inline int tcp_or_udp(__u8 protocol)
{
	return protocol == IPPROTO_TCP || protocol == IPPROTO_UDP;
}

static __always_inline int filter_v4(void *cur, void *data_end)
{
	struct iphdr *ip = cur;
	struct sni_lpm_v4 key;
	__u32 saddr;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return account(SNI_XDP_STATS_V4, PASSED);
	key.prefixlen = 32;
	__builtin_memcpy(key.addr, &ip->saddr, sizeof(key.addr));
	if (bpf_map_lookup_elem(&deny_v4, &key))
		return account(SNI_XDP_STATS_V4, DROPPED_DENY);
	if (!tcp_or_udp(ip->protocol))
		return account(SNI_XDP_STATS_V4, PASSED);
	/* a non-first fragment carries no L4 header; the first one (with the SYN) is filtered */
	if (ip->frag_off & bpf_htons(IP_FRAG_OFFSET))
		return account(SNI_XDP_STATS_V4, PASSED);
	ihl = ip->ihl;
	if (ihl < 5)
		return account(SNI_XDP_STATS_V4, PASSED);
	if (!to_listening_port(cur + ihl * 4, data_end))
		return account(SNI_XDP_STATS_V4, PASSED);
	saddr = ip->saddr;
	if (blocks(bpf_map_lookup_elem(&blocked_v4, &saddr)))
		return account(SNI_XDP_STATS_V4, DROPPED_BLOCKED);
	if (!allow_list_active() || bpf_map_lookup_elem(&allow_v4, &key))
		return account(SNI_XDP_STATS_V4, PASSED);
	return account(SNI_XDP_STATS_V4, DROPPED_NOT_ALLOWED);
}

static __always_inline int filter_v6(void *cur, void *data_end)
{
	struct ipv6hdr *ip6 = cur;
	struct sni_lpm_v6 key;
	struct in6_addr saddr;
	__u8 nexthdr;

	if ((void *)(ip6 + 1) > data_end)
		return account(SNI_XDP_STATS_V6, PASSED);
	key.prefixlen = 128;
	__builtin_memcpy(key.addr, &ip6->saddr, sizeof(key.addr));
	if (bpf_map_lookup_elem(&deny_v6, &key))
		return account(SNI_XDP_STATS_V6, DROPPED_DENY);

	nexthdr = ip6->nexthdr;
	cur = ip6 + 1;
#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HDRS; i++) {
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		    nexthdr == IPPROTO_DSTOPTS) {
			struct ipv6_opt_hdr *opt = cur;

			if ((void *)(opt + 1) > data_end)
				return account(SNI_XDP_STATS_V6, PASSED);
			nexthdr = opt->nexthdr;
			cur += (opt->hdrlen + 1) * 8;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag *frag = cur;

			if ((void *)(frag + 1) > data_end)
				return account(SNI_XDP_STATS_V6, PASSED);
			if (frag->frag_off & bpf_htons(IP6_FRAG_OFFSET))
				return account(SNI_XDP_STATS_V6, PASSED);
			nexthdr = frag->nexthdr;
			cur = frag + 1;
		} else {
			break;
		}
	}
	if (!tcp_or_udp(nexthdr) || !to_listening_port(cur, data_end))
		return account(SNI_XDP_STATS_V6, PASSED);
	saddr = ip6->saddr;
	if (blocks(bpf_map_lookup_elem(&blocked_v6, &saddr)))
		return account(SNI_XDP_STATS_V6, DROPPED_BLOCKED);
	if (!allow_list_active() || bpf_map_lookup_elem(&allow_v6, &key))
		return account(SNI_XDP_STATS_V6, PASSED);
	return account(SNI_XDP_STATS_V6, DROPPED_NOT_ALLOWED);
}

SEC("xdp")
int sni_xdp_filter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	void *cur;
	__be16 proto;

	if ((void *)(eth + 1) > data_end)
		return account(SNI_XDP_STATS_OTHER, PASSED);
	proto = eth->h_proto;
	cur = eth + 1;
	/* tags the NIC did not strip (no rx VLAN offload, or generic mode on some devices) */
#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		struct vlan_tag *tag = cur;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(tag + 1) > data_end)
			return account(SNI_XDP_STATS_OTHER, PASSED);
		proto = tag->encapsulated_proto;
		cur = tag + 1;
	}
	if (proto == bpf_htons(ETH_P_IP))
		return filter_v4(cur, data_end);
	if (proto == bpf_htons(ETH_P_IPV6))
		return filter_v6(cur, data_end);
	return account(SNI_XDP_STATS_OTHER, PASSED);
}

char _license[] SEC("license") = "Dual BSD/GPL";
