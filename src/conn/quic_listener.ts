/**
 * A QUIC listener: one UDP socket that receives every client's datagrams, and a flow per
 * client address:port with its own UDP socket connected to the backend (so the backend's
 * answers come in on that socket, and go out to the client from the listener's address).
 *
 * A datagram from a client with a routed flow is sent on as it is (one recvfrom, one send). A
 * new client's first datagram must be a QUIC v1/v2 Initial of at least 1200 bytes; the flow is
 * admitted (ACL, limits) and its Initials go through a {@link QuicInitialReader} until the
 * ClientHello is whole, its datagrams buffered meanwhile (bounded). Then it is routed
 * (src/conn/quic_route.ts) and the buffered datagrams are sent in order. Anything else is
 * dropped and counted by reason (`sni_proxy_quic_dropped_total`), never kept.
 *
 * A datagram from an unknown address whose Destination Connection ID is one the backend chose
 * for a flow (a client that rebound, e.g. behind a NAT) moves that flow to the new address.
 * With workers > 1 the kernel brings such a datagram to this worker (host.quicSteer), not to
 * whichever worker its new address hashes to.
 *
 * Flows end after `quic.idle_ms` without a datagram (a sweep a few times a second, not a timer
 * per flow); flows not routed within `timeouts.client_hello_ms` end too. The end is logged
 * (access log, metrics) by src/conn/quic_end.ts.
 *
 * @module
 */
import type { ListenerConfig } from "../config/mod.ts";
import { E } from "../../ffi/socket.ts";
import { eventLoop } from "../io/loop.ts";
import { bindUdp, type UdpSocket } from "../io/udp.ts";
import { DatagramBatch } from "../io/dgram_batch.ts";
import { decodeSockaddr, sockaddrKey } from "../io/sockaddr.ts";
import { formatAddr } from "../net/addr.ts";
import {
  classifyDatagram,
  MIN_INITIAL_DATAGRAM,
  QuicInitialReader,
  type QuicReadResult,
} from "../proto/quic.ts";
import type { ClientHello } from "../proto/clienthello.ts";
import { errText } from "../ops/errtext.ts";
import { logger } from "../ops/log.ts";
import type { SessionInfo } from "./conn_record.ts";
import { cidKey, FlowTable, QuicFlow } from "./quic_flow.ts";
import { routeQuic } from "./quic_route.ts";
import { FlowEnder, type QuicListenerHost } from "./quic_end.ts";

export type { QuicListenerHost };

const log = logger("quic");

/** Datagrams read per report of a socket; the rest are reported again next round. */
const BATCH = 64;
/** Receive buffer of the listening socket: bursts of new flows wait here, not dropped. */
const LISTEN_RCVBUF = 8 << 20;
/** Reasons of a bad Initial that count as an offence of its source (ebpf.xdp.block). */
const OFFENCES = new Set([
  "truncated",
  "small_datagram",
  "undecryptable",
  "bad_frame",
  "bad_hello",
]);

/**
 * One batch of receive slots for every QUIC socket of the process (handlers never interleave,
 * and a datagram kept past its handler is copied).
 */
const batch = new DatagramBatch(BATCH);

/** A flow as the admin API handles it. */
export interface QuicSessionView {
  info(): SessionInfo;
  stop(reason?: string): void;
}

/** A bound QUIC listener and its flows. */
export class QuicListener {
  readonly config: ListenerConfig;
  readonly index: number;
  readonly address: string;
  readonly bound: Deno.NetAddr;
  readonly #sock: UdpSocket;
  readonly #host: QuicListenerHost;
  readonly #flows: FlowTable;
  readonly #end: FlowEnder;
  #accepting = true;
  #closed = false;
  /** Bound to 0.0.0.0 or ::: each flow's local address comes from its first datagram. */
  readonly #wildcard: boolean;
  #sweepTimer: ReturnType<typeof setTimeout> | undefined;
  #onClosed: () => void = () => {};
  #onEmpty: (() => void) | null = null;

  /** Binds the UDP socket (SO_REUSEPORT, as TCP listeners); throws with the address. */
  constructor(config: ListenerConfig, index: number, host: QuicListenerHost) {
    this.config = config;
    this.index = index;
    this.#host = host;
    try {
      this.#sock = bindUdp(
        eventLoop(),
        config.hostname.replace(/^\[|\]$/g, ""),
        config.port,
        { reusePort: true, rcvbuf: LISTEN_RCVBUF, sndbuf: LISTEN_RCVBUF },
        () => this.#readClients(),
      );
    } catch (e) {
      throw new Error(`cannot listen on udp ${config.address}: ${errText(e)}`);
    }
    this.bound = this.#sock.addr;
    this.address = formatAddr(this.bound);
    // workers > 1: the datagrams of this worker's flows come here whatever their source
    this.#flows = new FlowTable(host.quicSteer?.join(index, this.#sock.fd) ?? null);
    this.#wildcard = this.bound.hostname === "0.0.0.0" || this.bound.hostname === "::";
    // the kernel path rewrites to the address a client sent to: a wildcard one is not it
    if (this.#wildcard) this.#sock.wantDestination();
    this.#end = new FlowEnder(host, this.#flows, this.address, this.bound, () => {
      if (this.#flows.size === 0) this.#onEmpty?.();
    });
  }

  /** Serves until close(); resolves then. */
  serve(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    this.#scheduleSweep();
    return new Promise<void>((resolve) => this.#onClosed = resolve);
  }

  /** Flows in the table now (every state). */
  get flowCount(): number {
    return this.#flows.size;
  }

  /** The flows, as the admin API lists and closes them. */
  sessions(): QuicSessionView[] {
    return [...this.#flows.flows()].filter((f) => f.state !== "refused").map((f) => ({
      info: () => f.info(this.address),
      stop: () => this.#end.end(f, "admin"),
    }));
  }

  /** Takes no new flow from now on (shutdown); live flows go on. */
  stopAccepting(): void {
    this.#accepting = false;
  }

  /** Resolves once no flow is left. */
  drained(): Promise<void> {
    if (this.#flows.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#onEmpty = resolve);
  }

  /** Ends every flow (`shutdown`) and closes the socket. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#accepting = false;
    clearTimeout(this.#sweepTimer);
    for (const f of [...this.#flows.flows()]) this.#end.end(f, "shutdown");
    this.#sock.close();
    this.#onClosed();
  }

  #scheduleSweep(): void {
    if (this.#closed) return;
    const idleMs = this.#host.tables.config.quic.idleMs;
    // a flow ends within a quarter of its idle time (at most a second) after it went idle
    const every = Math.max(20, Math.min(1000, idleMs / 4));
    this.#sweepTimer = setTimeout(() => {
      try {
        this.#end.sweep(Date.now());
      } catch (e) {
        log.error(`quic sweep on ${this.address}: ${errText(e)}`);
      }
      this.#scheduleSweep();
    }, every);
  }

  /** Reads a batch of client datagrams. */
  #readClients(): void {
    const now = Date.now();
    const q = this.#host.metrics.quic;
    const got = batch.receive(this.#sock.fd);
    if (got < 0) {
      if (got !== -E.EAGAIN && got !== -E.EINTR) q.drop("receive_error");
      return;
    }
    for (let i = 0; i < got; i++) {
      const d = batch.datagram(i);
      const src = batch.source(i);
      const key = sockaddrKey(src);
      const flow = key === null ? undefined : this.#flows.get(key);
      if (flow !== undefined && flow.sock !== null) {
        if ((d[0] & 0x80) !== 0 && this.#newConnection(flow, d)) {
          // the client's port was reused by a new connection (maybe for another name)
          this.#end.end(flow, "new_connection");
          this.#unknown(key!, d, src, now, i);
          continue;
        }
        flow.lastActive = now;
        this.#forwardUp(flow, d);
      } else if (flow !== undefined) this.#unrouted(flow, d, now);
      else if (key !== null) this.#unknown(key, d, src, now, i);
      else q.drop("garbage");
    }
  }

  /**
   * Whether the long-header datagram `d` is the Initial of another connection than the
   * flow's: its Destination Connection ID is neither the client's first one nor one the
   * backend chose (the client's Initials carry one of those, RFC 9000 7.2).
   */
  #newConnection(flow: QuicFlow, d: Uint8Array): boolean {
    if (classifyDatagram(d) !== "initial") return false;
    const key = cidKey(d, 6, d[5]);
    return key !== flow.clientDcid && !flow.cids.includes(key);
  }

  /** Sends a client datagram to the flow's backend. */
  #forwardUp(flow: QuicFlow, d: Uint8Array): void {
    const n = d.length;
    const w = flow.sock!.send(d, n);
    if (w >= 0) {
      const q = this.#host.metrics.quic;
      flow.datagramsUp++;
      flow.bytesUp += n;
      q.datagramsUp++;
      q.bytesUp += n;
    } else this.#end.sendFailed(flow, -w);
  }

  /** A datagram of a flow not routed (yet, or refused). */
  #unrouted(flow: QuicFlow, d: Uint8Array, now: number): void {
    const q = this.#host.metrics.quic;
    flow.lastActive = now;
    if (flow.state === "refused") {
      q.drop("refused_flow");
      return;
    }
    // 0-RTT and Handshake datagrams wait with the Initials; only Initials hold the hello
    if (flow.state === "routing" || flow.reader === null || classifyDatagram(d) !== "initial") {
      this.#hold(flow, d);
      return;
    }
    this.#afterPush(flow, d, flow.reader.push(d), false);
  }

  /** Buffers a datagram of a flow not routed yet, or drops it when its buffer is full. */
  #hold(flow: QuicFlow, d: Uint8Array): boolean {
    const quic = this.#host.tables.config.quic;
    if (flow.hold(d, quic.maxPendingDatagrams, quic.maxPendingBytes)) return true;
    this.#host.metrics.quic.drop("pending_full");
    return false;
  }

  /** A datagram from an address without a flow: a rebinding client, a new client, or junk. */
  #unknown(key: number | string, d: Uint8Array, src: Uint8Array, now: number, i: number): void {
    const q = this.#host.metrics.quic;
    const n = d.length;
    const kind = classifyDatagram(d);
    if (kind !== "initial") {
      const moved = kind === "short" || kind === "other_long"
        ? this.#flows.byDcid(d, n)
        : undefined;
      if (moved && moved.sock && this.#rebind(moved, key, src)) {
        moved.lastActive = now;
        this.#forwardUp(moved, d);
        return;
      }
      q.drop(
        moved || kind === "short" || kind === "other_long"
          ? "unknown_flow"
          : kind === "unknown_version"
          ? "wrong_version"
          : kind === "garbage"
          ? "garbage"
          : "not_initial",
      );
      return;
    }
    const net = decodeSockaddr(src, "udp")!;
    if (n < MIN_INITIAL_DATAGRAM) {
      q.drop("small_datagram");
      this.#host.blocker?.offence(net.hostname, "bad_quic_initial");
      return;
    }
    const table = this.#host.tables.byListener[this.index];
    const refusal = this.#admit(net.hostname);
    if (refusal) {
      q.drop(refusal);
      return;
    }
    const admitted = this.#admitSource(net.hostname);
    if (admitted === undefined) return;
    const reader = new QuicInitialReader({
      maxBytes: table.config.limits.maxClientHelloBytes,
      fingerprint: table.fingerprints,
    });
    const flow = new QuicFlow(
      key,
      src.slice(),
      net,
      formatAddr(net),
      table,
      reader,
    );
    flow.admittedIp = admitted;
    flow.listenerIp = this.#wildcard ? batch.destination(i) : this.bound.hostname;
    this.#flows.add(flow);
    q.active++;
    this.#afterPush(flow, d, reader.push(d), true);
  }

  /** Why a new flow from `ip` is refused now (the drop reason), or null. */
  #admit(ip: string): string | null {
    if (!this.#accepting) return "shutting_down";
    const { tables, metrics } = this.#host;
    const config = tables.config;
    if (!tables.byListener[this.index].acl.permits(ip)) return "acl_denied";
    const workers = Math.max(1, config.workers);
    const perSource = config.quic.maxFlowsPerSource;
    if (perSource !== null && this.#flows.ofSource(ip) >= perSource) return "source_flows";
    const full = this.#flows.size >= Math.ceil(config.quic.maxFlows / workers);
    if (full || this.#flows.pendingCount >= Math.ceil(config.quic.maxPendingFlows / workers)) {
      // the oldest unfinished hello (or refused flow) gives way: a flood of Initials cannot
      // lock new clients out; only routed flows make the table full
      const oldest = this.#flows.oldestPending();
      if (!oldest) return "flow_limit";
      this.#end.end(oldest, "pending_evicted", "count");
      metrics.quic.drop("pending_evicted");
    }
    return null;
  }

  /**
   * Counts a new flow against limits.per_source: the IP counted (null: no such limit), or
   * undefined when refused (the datagram is dropped and counted, an offence reported).
   */
  #admitSource(ip: string): string | null | undefined {
    const limits = this.#host.tables.byListener[this.index].config.limits.perSource;
    if (!limits) return null;
    const refusal = this.#host.sources.admit(ip, limits);
    if (!refusal) return ip;
    this.#host.metrics.quic.drop(refusal);
    this.#host.blocker?.offence(ip, refusal);
    return undefined;
  }

  /** Acts on what the reader made of a flow's Initial datagram `d`. */
  #afterPush(flow: QuicFlow, d: Uint8Array, r: QuicReadResult, first: boolean): void {
    const q = this.#host.metrics.quic;
    if (r.kind === "more") {
      if (!this.#hold(flow, d) && first) this.#end.end(flow, "pending_evicted", "none");
      return;
    }
    if (r.kind === "hello") {
      // the datagram that completes the hello is kept whatever the bounds: it is the hello
      flow.pending.push(d.slice());
      flow.pendingBytes += d.length;
      flow.clientDcid = cidKey(r.dcid);
      this.#route(flow, r.hello);
      return;
    }
    q.drop(r.reason);
    if (OFFENCES.has(r.reason)) {
      this.#host.blocker?.offence(flow.clientNet.hostname, "bad_quic_initial");
    }
    if (r.final) {
      log.info(`bad QUIC Initial from ${flow.client}: ${r.reason}: ${r.message}`);
      this.#end.refuse(flow, "bad_initial", r.message);
    } else if (first) {
      // nothing of this source is kept for a datagram that did not start a hello
      this.#end.end(flow, "bad_initial", "none");
    }
  }

  /** Routes a flow whose hello is whole, then flushes its buffered datagrams. */
  #route(flow: QuicFlow, hello: ClientHello): void {
    flow.state = "routing";
    flow.reader = null;
    this.#flows.settled(flow);
    flow.sni = hello.serverName;
    flow.alpn = hello.alpn;
    flow.ja4 = hello.fingerprints?.ja4;
    flow.ja3 = hello.fingerprints?.ja3;
    const host = this.#host;
    routeQuic({
      table: flow.table,
      hello,
      clientIp: flow.clientNet.hostname,
      client: flow.client,
      resolver: host.resolver,
      guard: host.quicGuard,
      metrics: host.metrics,
      fds: host.fds,
      onReadable: () => this.#readBackend(flow),
    }).then((r) => this.#end.routed(flow, r, (n) => this.#forwardHeld(flow, n)));
  }

  /** Sends a buffered datagram to the backend. */
  #forwardHeld(flow: QuicFlow, d: Uint8Array): void {
    this.#forwardUp(flow, d);
  }

  /** Reads a batch of the backend's datagrams of `flow` and sends them to the client. */
  #readBackend(flow: QuicFlow): void {
    const sock = flow.sock;
    if (!sock) return;
    const got = batch.receive(sock.fd);
    if (got < 0) {
      if (got !== -E.EAGAIN && got !== -E.EINTR) this.#end.receiveFailed(flow, -got);
      return;
    }
    let bytes = 0;
    /** The backend's ID is known, or its handshake is past: the kernel may take over. */
    let known = false;
    for (let i = 0; i < got; i++) {
      const d = batch.datagram(i);
      bytes += d.length;
      // the server's connection IDs, from its long headers (not Version Negotiation's echo)
      if ((d[0] & 0x80) === 0) known = true;
      else if (d.length > 7 && this.#learn(flow, d)) known = true;
    }
    if (flow.datagramsDown === 0) flow.pool?.connected(flow.backend!);
    flow.lastActive = Date.now();
    const sent = batch.send(this.#sock.fd, 0, got, flow.clientAddr);
    const q = this.#host.metrics.quic;
    if (sent < got) {
      const e = sent < 0 ? -sent : E.EAGAIN;
      for (let i = Math.max(0, sent); i < got; i++) {
        bytes -= batch.length(i);
        q.drop(e === E.EAGAIN || e === E.ENOBUFS ? "send_buffer_full" : "send_error");
      }
    }
    const n = Math.max(0, sent);
    flow.datagramsDown += n;
    flow.bytesDown += bytes;
    q.datagramsDown += n;
    q.bytesDown += bytes;
    // after the send: what the kernel forwards from now on comes after these
    if (known && flow.kernelAfterIds) this.#end.idsSeen(flow);
  }

  /**
   * Follows the flow by the Source Connection ID of the backend's long header `d`; true when
   * that is the ID the connection goes on with (not a Retry's, which the next Initial replaces).
   */
  #learn(flow: QuicFlow, d: Uint8Array): boolean {
    if ((d[1] | d[2] | d[3] | d[4]) === 0) return false; // Version Negotiation
    const n = d.length;
    const scidAt = 6 + d[5];
    if (scidAt >= n) return false;
    const len = d[scidAt];
    if (len <= 20 && scidAt + 1 + len <= n) this.#flows.learnCid(flow, d, scidAt + 1, len);
    return classifyDatagram(d) !== "retry";
  }

  /** Moves `flow` to the address `src`; false when another flow has it. */
  #rebind(flow: QuicFlow, key: number | string, src: Uint8Array): boolean {
    if (this.#flows.get(key)) return false;
    const net = decodeSockaddr(src, "udp")!;
    const text = formatAddr(net);
    log.debug(`QUIC flow of ${flow.client} continues from ${text}`);
    this.#flows.rebind(flow, key, src.slice(), net, text);
    this.#end.rebound(flow);
    this.#host.metrics.quic.rebinds++;
    return true;
  }
}
