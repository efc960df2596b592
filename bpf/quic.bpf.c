// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sni-proxy QUIC fast path: forwards the UDP datagrams of routed QUIC flows in the kernel.
 *
 * A tc program (tcx ingress) on the interfaces the proxy's traffic arrives on. A UDP datagram
 * whose (family, saddr, sport, daddr, dport) is a key of quic_flows is rewritten to the flow's
 * other leg (client -> listener becomes proxy socket -> backend; backend -> proxy socket becomes
 * listener -> client), its IPv4 header and UDP checksums fixed incrementally, then:
 * - a local socket would receive the new datagram (bpf_sk_lookup_udp): arrived on lo, the stack
 *   delivers it (TC_ACT_OK; the local route is already attached there); arrived elsewhere, it is
 *   sent out of lo with an output route (bpf_redirect_neigh), like a datagram a local socket sent
 *   (input routing would take its local source for a martian);
 * - otherwise sent out of the egress interface the FIB names (bpf_redirect_neigh, which also
 *   resolves the neighbour); when the FIB lookup is refused because forwarding is off on the
 *   interface the datagram arrived on, sent the way the other direction's datagrams came in
 *   (their interface, to the MAC of their last hop), which the program learns from them.
 * Anything else goes on unchanged (TCX_NEXT: the next program, then the stack, then userspace):
 * other traffic, flows not in the map, fragments, IPv4 options, IPv6 extension headers,
 * truncated headers, and datagrams whose route lookup fails (counted by reason). Returning
 * TCX_NEXT rather than TC_ACT_OK lets another proxy's program on the same interface see them.
 * Only Ethernet-framed interfaces (and lo) are supported: the loader refuses others.
 *
 * Userspace (src/ebpf/quic.ts) adds and removes flows and reads last_seen_ns to expire idle ones.
 * Plain uapi headers only (no CO-RE, no vmlinux.h).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "quic.h"

#define LOOPBACK_IFINDEX 1 /* lo is ifindex 1 in every network namespace */
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define IPV4_HLEN 20
#define IPV6_HLEN 40
#define UDP_HLEN 8
#define TCX_NEXT (-1)
#define AF_INET 2
#define AF_INET6 10

/* Default size; userspace sets the real one before load (bpf_map__set_max_entries). Plain HASH,
 * not LRU: a flow is never evicted behind userspace's back; a full map refuses the insert. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct sni_quic_key);
	__type(value, struct sni_quic_flow);
} quic_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sni_quic_stats);
} quic_stats SEC(".maps");

#define COUNT(field)                                                                     \
	({                                                                               \
		__u32 zero_ = 0;                                                         \
		struct sni_quic_stats *st_ = bpf_map_lookup_elem(&quic_stats, &zero_); \
		if (st_)                                                                 \
			st_->field++;                                                    \
		TCX_NEXT;                                                                \
	})

/* Where the headers of the datagram are, and what the flow lookup needs. */
struct parsed {
	struct sni_quic_key key;
	__u32 l4;      /* offset of the UDP header */
	__u32 payload; /* UDP payload bytes (of every segment, for a GSO packet) */
};

/* Makes the first `len` bytes linear; false when the packet is shorter. */
static __always_inline int pull(struct __sk_buff *skb, __u32 len)
{
	if ((void *)(long)skb->data + len <= (void *)(long)skb->data_end)
		return 1;
	return bpf_skb_pull_data(skb, len) == 0 &&
	       (void *)(long)skb->data + len <= (void *)(long)skb->data_end;
}

/* UDP payload bytes; 0 with `bad` set when the UDP length does not fit the packet. */
static __always_inline __u32 payload_len(struct __sk_buff *skb, struct udphdr *udp, __u32 l4,
					 int *bad)
{
	__u32 ulen = bpf_ntohs(udp->len);

	if (skb->gso_segs > 1) /* one header for all segments; udp->len is the first one's */
		return skb->len - l4 - UDP_HLEN;
	if (ulen < UDP_HLEN || ulen > skb->len - l4) {
		*bad = 1;
		return 0;
	}
	return ulen - UDP_HLEN;
}

/* Parses an IPv4/UDP datagram into `p`; returns 0, or the TCX verdict to pass it with. */
static __always_inline int parse_v4(struct __sk_buff *skb, struct parsed *p)
{
	__u32 l4 = ETH_HLEN + IPV4_HLEN;
	struct iphdr *ip;
	struct udphdr *udp;
	int bad = 0;

	if (!pull(skb, l4 + UDP_HLEN)) {
		if (!pull(skb, ETH_HLEN + IPV4_HLEN))
			return TCX_NEXT;
		ip = (void *)(long)skb->data + ETH_HLEN;
		if ((void *)(ip + 1) > (void *)(long)skb->data_end || ip->protocol != IPPROTO_UDP)
			return TCX_NEXT;
		return COUNT(passed_truncated);
	}
	ip = (void *)(long)skb->data + ETH_HLEN;
	udp = (void *)(long)skb->data + l4;
	if ((void *)(udp + 1) > (void *)(long)skb->data_end || ip->protocol != IPPROTO_UDP)
		return TCX_NEXT;
	if (ip->ihl != 5)
		return COUNT(passed_ip_options);
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return COUNT(passed_fragment);
	p->key.family = SNI_QUIC_AF_INET;
	p->key.sport = udp->source;
	p->key.dport = udp->dest;
	__builtin_memcpy(p->key.saddr, &ip->saddr, 4);
	__builtin_memcpy(p->key.daddr, &ip->daddr, 4);
	p->l4 = l4;
	p->payload = payload_len(skb, udp, l4, &bad);
	if (bad)
		return COUNT(passed_truncated);
	return 0;
}

/* Parses an IPv6/UDP datagram (UDP right after the fixed header) into `p`. */
static __always_inline int parse_v6(struct __sk_buff *skb, struct parsed *p)
{
	__u32 l4 = ETH_HLEN + IPV6_HLEN;
	struct ipv6hdr *ip;
	struct udphdr *udp;
	int bad = 0;
	__u8 next;

	if (!pull(skb, ETH_HLEN + IPV6_HLEN))
		return TCX_NEXT;
	ip = (void *)(long)skb->data + ETH_HLEN;
	if ((void *)(ip + 1) > (void *)(long)skb->data_end)
		return TCX_NEXT;
	next = ip->nexthdr;
	if (next == IPPROTO_FRAGMENT)
		return COUNT(passed_fragment);
	if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS)
		return COUNT(passed_ip_options);
	if (next != IPPROTO_UDP)
		return TCX_NEXT;
	if (!pull(skb, l4 + UDP_HLEN))
		return COUNT(passed_truncated);
	ip = (void *)(long)skb->data + ETH_HLEN;
	udp = (void *)(long)skb->data + l4;
	if ((void *)(udp + 1) > (void *)(long)skb->data_end)
		return COUNT(passed_truncated);
	p->key.family = SNI_QUIC_AF_INET6;
	p->key.sport = udp->source;
	p->key.dport = udp->dest;
	__builtin_memcpy(p->key.saddr, &ip->saddr, 16);
	__builtin_memcpy(p->key.daddr, &ip->daddr, 16);
	p->l4 = l4;
	p->payload = payload_len(skb, udp, l4, &bad);
	if (bad)
		return COUNT(passed_truncated);
	return 0;
}

/*
 * Writes the flow's addresses and ports into the packet and fixes the checksums incrementally:
 * the IPv4 header checksum for the addresses; the UDP checksum for the addresses (pseudo
 * header) and the ports. BPF_F_MARK_MANGLED_0 keeps an IPv4 "no checksum" zero as it is.
 * The helpers handle CHECKSUM_PARTIAL (locally sent, only the pseudo header is in the field)
 * and CHECKSUM_COMPLETE (skb->csum is adjusted).
 */
static __always_inline int rewrite(struct __sk_buff *skb, struct parsed *p,
				   struct sni_quic_flow *f)
{
	int v6 = p->key.family == SNI_QUIC_AF_INET6;
	__u32 addrs_off = v6 ? ETH_HLEN + 8 : ETH_HLEN + 12;
	__u32 check_off = p->l4 + 6;
	__u8 old_addrs[32] = {};
	__u8 new_addrs[32] = {};
	__be16 old_ports[2] = { p->key.sport, p->key.dport };
	__be16 new_ports[2] = { f->sport, f->dport };
	__s64 diff;

	if (v6) {
		__builtin_memcpy(old_addrs, p->key.saddr, 16);
		__builtin_memcpy(old_addrs + 16, p->key.daddr, 16);
		__builtin_memcpy(new_addrs, f->saddr, 16);
		__builtin_memcpy(new_addrs + 16, f->daddr, 16);
	} else {
		__builtin_memcpy(old_addrs, p->key.saddr, 4);
		__builtin_memcpy(old_addrs + 4, p->key.daddr, 4);
		__builtin_memcpy(new_addrs, f->saddr, 4);
		__builtin_memcpy(new_addrs + 4, f->daddr, 4);
	}
	diff = bpf_csum_diff((__be32 *)old_addrs, v6 ? 32 : 8, (__be32 *)new_addrs, v6 ? 32 : 8, 0);
	if (diff < 0)
		return -1;
	if (!v6 && bpf_l3_csum_replace(skb, ETH_HLEN + 10, 0, diff, 0))
		return -1;
	if (bpf_l4_csum_replace(skb, check_off, 0, diff, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0))
		return -1;
	if (bpf_l4_csum_replace(skb, check_off, *(__u32 *)old_ports, *(__u32 *)new_ports,
				BPF_F_MARK_MANGLED_0 | sizeof(__u32)))
		return -1;
	if (bpf_skb_store_bytes(skb, addrs_off, new_addrs, v6 ? 32 : 8, 0))
		return -1;
	if (bpf_skb_store_bytes(skb, p->l4, new_ports, sizeof(new_ports), 0))
		return -1;
	return 0;
}

/* Counts a forwarded datagram in the flow and the per-CPU stats. */
static __always_inline void account(struct sni_quic_flow *f, struct parsed *p,
				    struct __sk_buff *skb, int local)
{
	__u32 zero = 0;
	struct sni_quic_stats *st = bpf_map_lookup_elem(&quic_stats, &zero);
	__u64 packets = skb->gso_segs > 1 ? skb->gso_segs : 1;

	f->last_seen_ns = bpf_ktime_get_ns();
	__sync_fetch_and_add(&f->packets, packets);
	__sync_fetch_and_add(&f->bytes, p->payload);
	if (!st)
		return;
	if (f->flags & SNI_QUIC_TO_BACKEND) {
		st->to_backend_packets += packets;
		st->to_backend_bytes += p->payload;
	} else {
		st->to_client_packets += packets;
		st->to_client_bytes += p->payload;
	}
	if (local)
		st->delivered_local++;
	else
		st->redirected++;
}

/* The route to the flow's new destination; fills `fib` (egress ifindex, next hop). */
static __always_inline int route(struct __sk_buff *skb, struct parsed *p,
				 struct sni_quic_flow *f, struct bpf_fib_lookup *fib)
{
	fib->l4_protocol = IPPROTO_UDP;
	fib->sport = f->sport;
	fib->dport = f->dport;
	fib->ifindex = skb->ifindex;
	if (p->key.family == SNI_QUIC_AF_INET6) {
		fib->family = AF_INET6;
		__builtin_memcpy(fib->ipv6_src, f->saddr, 16);
		__builtin_memcpy(fib->ipv6_dst, f->daddr, 16);
	} else {
		fib->family = AF_INET;
		__builtin_memcpy(&fib->ipv4_src, f->saddr, 4);
		__builtin_memcpy(&fib->ipv4_dst, f->daddr, 4);
	}
	/* tot_len 0: the kernel checks this skb against the egress MTU (GSO aware) */
	return bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
}

/*
 * True when a local socket would receive the rewritten datagram (the stack's own UDP lookup):
 * then the stack delivers it. Asked of the socket table rather than the FIB, whose lookup
 * refuses to answer (FWD_DISABLED) on an interface without forwarding, lo included.
 */
static __always_inline int to_local_socket(struct __sk_buff *skb, struct parsed *p,
					   struct sni_quic_flow *f)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;

	if (p->key.family == SNI_QUIC_AF_INET6) {
		__builtin_memcpy(t.ipv6.saddr, f->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, f->daddr, 16);
		t.ipv6.sport = f->sport;
		t.ipv6.dport = f->dport;
		size = sizeof(t.ipv6);
	} else {
		__builtin_memcpy(&t.ipv4.saddr, f->saddr, 4);
		__builtin_memcpy(&t.ipv4.daddr, f->daddr, 4);
		t.ipv4.sport = f->sport;
		t.ipv4.dport = f->dport;
		size = sizeof(t.ipv4);
	}
	sk = bpf_sk_lookup_udp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* Records where the datagrams of this entry's key come from (see path_* in quic.h). */
static __always_inline void learn_path(struct __sk_buff *skb, struct sni_quic_flow *f)
{
	struct ethhdr *eth = (void *)(long)skb->data;

	if ((void *)(eth + 1) > (void *)(long)skb->data_end)
		return;
	/* unconditional: the counters beside these fields are written for every datagram anyway */
	f->path_ifindex = skb->ifindex;
	__builtin_memcpy(f->path_peer_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(f->path_self_mac, eth->h_dest, ETH_ALEN);
}

/*
 * The entry of the other direction, whose learned path leads to this datagram's new
 * destination: its key is this entry's rewrite, reversed.
 */
static __always_inline struct sni_quic_flow *reverse_entry(struct parsed *p,
							   struct sni_quic_flow *f)
{
	struct sni_quic_key k = {};

	k.family = p->key.family;
	k.sport = f->dport;
	k.dport = f->sport;
	__builtin_memcpy(k.saddr, f->daddr, 16);
	__builtin_memcpy(k.daddr, f->saddr, 16);
	return bpf_map_lookup_elem(&quic_flows, &k);
}

/* Sends the rewritten datagram the way the other direction came in (Ethernet, not lo). */
static __always_inline int send_learned(struct __sk_buff *skb, struct parsed *p,
					struct sni_quic_flow *f, struct sni_quic_flow *back)
{
	__u8 macs[2 * ETH_ALEN];
	__u32 ifindex = back->path_ifindex;
	__u32 mtu = 0;

	/* the FIB lookup checked the MTU on its way; this way checks it here */
	if (bpf_check_mtu(skb, ifindex, &mtu, 0, 0)) {
		COUNT(fib_frag_needed);
		return COUNT(passed_fib);
	}
	__builtin_memcpy(macs, back->path_peer_mac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, back->path_self_mac, ETH_ALEN);
	if (rewrite(skb, p, f) || bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0))
		return TC_ACT_SHOT;
	account(f, p, skb, 0);
	COUNT(redirected_learned);
	return bpf_redirect(ifindex, 0);
}

static __always_inline int forward(struct __sk_buff *skb, struct parsed *p)
{
	struct sni_quic_flow *f = bpf_map_lookup_elem(&quic_flows, &p->key);
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	int rc;

	if (!f)
		return COUNT(passed_no_flow);
	learn_path(skb, f);
	if (to_local_socket(skb, p, f)) {
		if (rewrite(skb, p, f))
			return TC_ACT_SHOT; /* half-rewritten: never deliver it */
		account(f, p, skb, 1);
		if (skb->ifindex == LOOPBACK_IFINDEX)
			return TC_ACT_OK; /* the local route is attached already (loopback xmit) */
		/* Arrived elsewhere: input routing would drop a local (or 127/8) source there as a
		 * martian. Sent out of lo with an output route, as if a local socket had sent it. */
		return bpf_redirect_neigh(LOOPBACK_IFINDEX, 0, 0, 0);
	}
	rc = route(skb, p, f, &fib);
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		struct sni_quic_flow *back = reverse_entry(p, f);

		if (back && back->path_ifindex && back->path_ifindex != LOOPBACK_IFINDEX)
			return send_learned(skb, p, f, back);
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
			COUNT(fib_fwd_disabled);
		else if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
			COUNT(fib_frag_needed);
		else
			COUNT(fib_no_route);
		return COUNT(passed_fib);
	}
	if (rewrite(skb, p, f))
		return TC_ACT_SHOT;
	account(f, p, skb, 0);
	if (fib.family == AF_INET6) {
		nh.nh_family = AF_INET6;
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
	} else {
		nh.nh_family = AF_INET;
		nh.ipv4_nh = fib.ipv4_dst;
	}
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

SEC("tc")
int sni_quic_tc(struct __sk_buff *skb)
{
	struct parsed p = {};
	int rc;

	if (skb->protocol == bpf_htons(ETH_P_IP))
		rc = parse_v4(skb, &p);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		rc = parse_v6(skb, &p);
	else
		return TCX_NEXT;
	if (rc)
		return rc;
	return forward(skb, &p);
}

char _license[] SEC("license") = "Dual BSD/GPL";
