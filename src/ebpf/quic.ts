/**
 * Kernel fast path for routed QUIC flows (bpf/quic.bpf.c): once the proxy has read a client's
 * ClientHello from its Initial packets and opened a per-flow UDP socket toward the backend, the
 * flow's datagrams are rewritten and forwarded by a tc program and never enter the process.
 *
 * How to use (kernel mode of a QUIC listener):
 * ```ts
 * const fast = await QuicFastPath.open({ interfaces: ["eth0", "lo"], maxFlows: 65536, log });
 * // after routing: L = the address the client sent to (concrete, e.g. from IP_PKTINFO),
 * // S = the per-flow socket connected to the backend (its local address)
 * const inKernel = fast.addFlow({ client, listener, local: s.addr, backend });
 * if (!inKernel) relayInUserspace(flow); // map full or unsupported: counted in stats().refused
 * // keep S open while the flow lives: it holds Sp, and a datagram the program passes (fragment,
 * // no route...) still reaches S or L and must be relayed as before.
 * const seen = fast.lastSeen(flow); // idle expiry: seen.idleMs, with the process's own view
 * fast.removeFlow(flow); // at expiry, before closing S
 * fast.close(); // detaches from every interface; nothing stays behind
 * ```
 * The program is attached with tcx links (BPF_LINK_CREATE, BPF_TCX_INGRESS; Linux 6.6+): no
 * qdisc is created, nothing is pinned, and the links go away with the process even on SIGKILL.
 * Each instance has its own maps and program, and passes what is not its own on to the next
 * program of the interface, so two proxies on one host do not disturb each other.
 *
 * Attach it to every interface the flows' datagrams arrive on (client side and backend side;
 * `lo` when clients or backends are local). A datagram to a local address after the rewrite is
 * delivered by the stack; one to another host leaves through the interface the routing table
 * names (bpf_redirect_neigh). A datagram the program cannot handle (IP fragments, IPv4 options,
 * IPv6 extension headers, no route, larger than the egress MTU) goes on unchanged to the proxy's
 * sockets, counted by reason in {@link QuicFastPath.stats}.
 *
 * Forwarding sysctls: bpf_fib_lookup refuses to route (FWD_DISABLED) a datagram that arrived on
 * an interface with forwarding off (net.ipv4.conf.IF.forwarding, net.ipv6.conf.IF.forwarding;
 * lo included). The program then sends it the way the flow's other direction came in (that
 * interface, to the MAC of its last hop: symmetric routing, as for any server's replies), which
 * it learns from every datagram of the flow. Until the other side has sent a datagram after
 * addFlow, the datagram goes to userspace (`fibFwdDisabled`). So with forwarding off, a remote
 * client's replies from a local backend (arriving on lo) are forwarded from the client's first
 * datagram on; a remote backend is reached in the kernel once it has answered once.
 * @module
 */

import type { BpfMap, BpfObject } from "../../ffi/libbpf.ts";
import { Errno, monotonicNs } from "../../ffi/libc.ts";
import { inRange, QUIC_DEFAULT_FLOWS, QUIC_FLOWS } from "./bounds.ts";
import {
  decodeQuicFlowCounters,
  KEY_ZERO,
  QUIC_FLOW,
  QUIC_MAPS,
  QUIC_PROGRAM,
  QUIC_STATS_FIELDS,
  QUIC_STATS_SIZE,
} from "./layout.ts";
import {
  checkBpfAccess,
  checkPlatform,
  type EbpfLog,
  loadError,
  openBpfObject,
  sumPerCpu,
  Undo,
  withLibbpfLog,
} from "./loader.ts";
import {
  attach,
  detach,
  noteForwarding,
  QuicBpfError,
  resolveInterface,
  type TcxLink,
} from "./quic_attach.ts";
import { addrText, flowEntries, flowKeys, type QuicAddr, type QuicFlow } from "./quic_flow.ts";

export { QuicBpfError };
export type { QuicAddr, QuicFlow };

/** Options of {@link QuicFastPath.open}. */
export interface QuicFastPathOptions {
  /** Interfaces (in this network namespace) the flows' datagrams arrive on, e.g. `["eth0"]`. */
  interfaces: string[];
  /** Flows held in the kernel at most (two map entries each); default 65536. */
  maxFlows?: number;
  /** Receives loader and libbpf messages. */
  log: EbpfLog;
  /** The compiled object's bytes; default: read bpf/quic.bpf.o next to this source tree. */
  object?: Uint8Array;
}

/** Datagrams and UDP payload bytes. */
export interface QuicTraffic {
  packets: number;
  bytes: number;
}

/** What the program recorded of one flow ({@link QuicFastPath.lastSeen}). */
export interface QuicFlowSeen {
  /** bpf_ktime_get_ns() (CLOCK_MONOTONIC) of the last datagram forwarded; 0n: none yet. */
  lastSeenNs: bigint;
  /** Milliseconds since then; since the flow was added when nothing was forwarded yet. */
  idleMs: number;
  toBackend: QuicTraffic;
  toClient: QuicTraffic;
}

/** Counters of the fast path: the program's (summed over CPUs) and the loader's. */
export interface QuicFastPathStats {
  toBackend: QuicTraffic;
  toClient: QuicTraffic;
  /** Of the forwarded datagrams: delivered to a local address, sent to another host. */
  deliveredLocal: number;
  redirected: number;
  /** Of the redirected: sent the way the other direction came in, the FIB lookup refused. */
  redirectedLearned: number;
  /** Datagrams passed unchanged to the stack (and so to the proxy's sockets), by reason. */
  passed: {
    /**
     * UDP of no flow in the map: flows' first datagrams, other UDP traffic, and datagrams this
     * program already forwarded into lo (they cross lo's ingress once more).
     */
    noFlow: number;
    /** IP fragments. */
    fragment: number;
    /** IPv4 options (UDP), IPv6 extension headers (any protocol: they are not walked). */
    ipOptions: number;
    /** Headers shorter than they claim. */
    truncated: number;
    /** The route lookup failed (the three below). */
    fib: number;
  };
  /** Forwarding is off on the interface it arrived on, and no way back was learned yet. */
  fibFwdDisabled: number;
  /** Larger than the egress MTU: userspace sends it (and the kernel answers with ICMP). */
  fibFragNeeded: number;
  /** No route: blackhole, unreachable, prohibit, or a local address without a socket. */
  fibNoRoute: number;
  /** Flows in the kernel now. */
  flows: number;
  /** addFlow calls that returned false, by reason: the caller relays those in userspace. */
  refused: { full: number; mixedFamilies: number; unsupportedAddress: number };
}

/**
 * The QUIC forwarding program, loaded and attached to its interfaces. Use
 * {@link QuicFastPath.open}; see the module documentation for the whole life of a flow.
 */
export class QuicFastPath {
  readonly #obj: BpfObject;
  readonly #flows: BpfMap;
  readonly #stats: BpfMap;
  readonly #statsBuf: Uint8Array;
  readonly #valueBuf = new Uint8Array(QUIC_FLOW.size);
  readonly #links: TcxLink[];
  readonly #log: EbpfLog;
  /** Flows in the map by their client -> listener key (hex): when added, and the reply key. */
  readonly #added = new Map<string, { at: bigint; replyKey: Uint8Array }>();
  readonly #refused = { full: 0, mixedFamilies: 0, unsupportedAddress: 0 };
  /** Flows held at most. */
  readonly capacity: number;
  #closed = false;

  private constructor(obj: BpfObject, links: TcxLink[], capacity: number, log: EbpfLog) {
    this.#obj = obj;
    this.#flows = obj.map(QUIC_MAPS.flows);
    this.#stats = obj.map(QUIC_MAPS.stats);
    this.#statsBuf = new Uint8Array(this.#stats.valueBufferSize);
    this.#links = links;
    this.capacity = capacity;
    this.#log = log;
  }

  /**
   * Load the program and attach it to every interface (tcx ingress).
   * @throws {QuicBpfError} naming the cause and the fix; nothing stays attached then.
   */
  static async open(options: QuicFastPathOptions): Promise<QuicFastPath> {
    const log = options.log;
    const maxFlows = checkOptions(options);
    checkPlatform(
      QuicBpfError,
      "the QUIC fast path",
      [6, 6],
      "tcx links",
      "forward QUIC in userspace",
    );
    await checkBpfAccess(
      QuicBpfError,
      "load and attach tc programs",
      "run as root, or grant CAP_BPF and CAP_NET_ADMIN",
    );
    const ifaces = options.interfaces.map(resolveInterface);
    const obj = await openBpfObject(
      QuicBpfError,
      "quic.bpf.o",
      "sni_quic",
      "QUIC",
      options.object,
      log,
    );
    const undo = new Undo();
    undo.push(() => obj.close());
    const links: TcxLink[] = [];
    try {
      load(obj, maxFlows, log);
      const progFd = obj.program(QUIC_PROGRAM).fd;
      for (const iface of ifaces) {
        const link = attach(progFd, iface);
        undo.push(() => detach(link, log));
        links.push(link);
      }
    } catch (e) {
      await undo.unwind();
      throw e;
    }
    noteForwarding(ifaces, log);
    log(
      "info",
      `QUIC fast path attached (tcx ingress) to ${links.map((l) => l.interface).join(", ")}; ` +
        `up to ${maxFlows} flows`,
    );
    return new QuicFastPath(obj, links, maxFlows, log);
  }

  /** Interfaces the program is attached to, in the order given. */
  get interfaces(): readonly string[] {
    return this.#links.map((l) => l.interface);
  }

  /** Flows in the kernel now. */
  get flows(): number {
    return this.#added.size;
  }

  /**
   * Forward `flow` in the kernel from now on (both directions). Adding a flow again replaces it
   * (its counters restart). Returns false when it cannot be: {@link capacity} flows are in the
   * kernel already, or its addresses are of two families (IPv4 client, IPv6 backend) or are
   * unspecified, multicast or IPv6 link-local. The caller then relays it in userspace; the
   * refusal is counted in `stats().refused`.
   * @throws {TypeError} for an address that is not an IP literal or a port out of 1..65535.
   * @throws {QuicBpfError} `closed`, or `update_failed` when the kernel refuses otherwise.
   */
  addFlow(flow: QuicFlow): boolean {
    this.#checkOpen();
    const e = flowEntries(flow);
    if (typeof e === "string") {
      if (e === "mixed_families") this.#refused.mixedFamilies++;
      else this.#refused.unsupportedAddress++;
      return false;
    }
    const id = hex(e.toBackendKey);
    const previous = this.#added.get(id);
    if (!previous && this.#added.size >= this.capacity) {
      this.#refused.full++;
      return false;
    }
    // the same client -> listener routed anew (another socket or backend): its old reply entry
    // would otherwise stay behind
    if (previous && hex(previous.replyKey) !== hex(e.toClientKey)) {
      this.#flows.delete(previous.replyKey);
    }
    try {
      // the reply direction first: once the client's datagrams reach the backend, its answers
      // must already be expected
      this.#flows.update(e.toClientKey, e.toClientValue);
      try {
        this.#flows.update(e.toBackendKey, e.toBackendValue);
      } catch (err) {
        this.#flows.delete(e.toClientKey);
        throw err;
      }
    } catch (err) {
      if ((err as { errno?: number }).errno === Errno.E2BIG) {
        this.#refused.full++;
        return false;
      }
      throw new QuicBpfError(
        "update_failed",
        `cannot add the QUIC flow ${addrText(flow.client)} -> ${addrText(flow.backend)}: ${
          (err as Error).message
        }`,
        "relay this flow in userspace",
        { cause: err },
      );
    }
    this.#added.set(id, { at: monotonicNs(), replyKey: e.toClientKey });
    return true;
  }

  /**
   * Stop forwarding `flow` in the kernel: its next datagrams reach the proxy's sockets again.
   * Returns false when it was not in the kernel. Remove it before closing its socket S.
   */
  removeFlow(flow: QuicFlow): boolean {
    if (this.#closed) return false;
    const keys = flowKeys(flow);
    if (!keys) return false;
    const [toBackend, toClient] = keys;
    const id = hex(toBackend);
    // the client's direction first, so no datagram is forwarded whose answer would not be
    const found = this.#flows.delete(toBackend);
    const foundReply = this.#flows.delete(this.#added.get(id)?.replyKey ?? toClient);
    this.#added.delete(id);
    return found || foundReply;
  }

  /**
   * What the program recorded of `flow`: when it last forwarded one of its datagrams (either
   * direction) and how many. null when the flow is not in the kernel.
   */
  lastSeen(flow: QuicFlow): QuicFlowSeen | null {
    if (this.#closed) return null;
    const keys = flowKeys(flow);
    if (!keys) return null;
    const added = this.#added.get(hex(keys[0]))?.at;
    if (added === undefined) return null;
    const [up, down] = keys.map((k) =>
      this.#flows.lookup(k, this.#valueBuf) ? decodeQuicFlowCounters(this.#valueBuf) : null
    );
    if (!up || !down) return null;
    const last = up.lastSeenNs > down.lastSeenNs ? up.lastSeenNs : down.lastSeenNs;
    const since = last > 0n ? last : added;
    const now = monotonicNs();
    return {
      lastSeenNs: last,
      idleMs: now > since ? Number((now - since) / 1_000_000n) : 0,
      toBackend: { packets: up.packets, bytes: up.bytes },
      toClient: { packets: down.packets, bytes: down.bytes },
    };
  }

  /** The program's counters summed over CPUs, with the loader's flow count and refusals. */
  stats(): QuicFastPathStats {
    const ok = !this.#closed && this.#stats.lookup(KEY_ZERO, this.#statsBuf);
    const s = sumPerCpu(
      ok ? this.#statsBuf : new Uint8Array(0),
      QUIC_STATS_SIZE,
      QUIC_STATS_FIELDS,
    );
    return {
      toBackend: { packets: s.to_backend_packets, bytes: s.to_backend_bytes },
      toClient: { packets: s.to_client_packets, bytes: s.to_client_bytes },
      deliveredLocal: s.delivered_local,
      redirected: s.redirected,
      redirectedLearned: s.redirected_learned,
      passed: {
        noFlow: s.passed_no_flow,
        fragment: s.passed_fragment,
        ipOptions: s.passed_ip_options,
        truncated: s.passed_truncated,
        fib: s.passed_fib,
      },
      fibFwdDisabled: s.fib_fwd_disabled,
      fibFragNeeded: s.fib_frag_needed,
      fibNoRoute: s.fib_no_route,
      flows: this.#added.size,
      refused: { ...this.#refused },
    };
  }

  /** Detach from every interface and free the program and maps. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const l of this.#links) detach(l, this.#log);
    this.#obj.close();
    this.#added.clear();
    this.#log("info", `QUIC fast path detached from ${this.interfaces.join(", ")}`);
  }

  #checkOpen(): void {
    if (this.#closed) {
      throw new QuicBpfError("closed", "the QUIC fast path is closed", "open a new one");
    }
  }
}

/** The flow capacity (default filled in), after refusing bad options (`bad_option`). */
function checkOptions(options: QuicFastPathOptions): number {
  const maxFlows = options.maxFlows ?? QUIC_DEFAULT_FLOWS;
  if (!inRange(maxFlows, QUIC_FLOWS)) {
    throw new QuicBpfError(
      "bad_option",
      `maxFlows must be an integer from ${QUIC_FLOWS.min} to ${QUIC_FLOWS.max} (got ${maxFlows})`,
      "fix the QUIC flow capacity in the config",
    );
  }
  if (options.interfaces.length === 0) {
    throw new QuicBpfError(
      "bad_option",
      "no interface to attach the QUIC fast path to",
      "list the interfaces the QUIC traffic arrives on",
    );
  }
  const dup = options.interfaces.find((n, i) => options.interfaces.indexOf(n) !== i);
  if (dup !== undefined) {
    throw new QuicBpfError(
      "bad_option",
      `interface "${dup}" is listed twice`,
      "list each interface once",
    );
  }
  return maxFlows;
}

/** Size the flow map (two entries per flow) and load the program. */
function load(obj: BpfObject, maxFlows: number, log: EbpfLog): void {
  try {
    obj.map(QUIC_MAPS.flows).setMaxEntries(maxFlows * 2);
    withLibbpfLog(log, () => obj.load());
  } catch (e) {
    throw loadError(QuicBpfError, e, {
      program: "the QUIC tc program",
      verifierFallback: "forward QUIC in userspace",
      memoryErrnos: [Errno.ENOMEM, Errno.E2BIG, Errno.ENOSPC],
      memory: {
        reason: "load_failed",
        cause: (errnoName) =>
          `the kernel could not create the QUIC flow map (${errnoName}; ${maxFlows} flows)`,
        fix: "lower the QUIC flow capacity",
      },
      refused: "the QUIC tc program",
      permissionFix: "run as root with CAP_BPF and CAP_NET_ADMIN; check kernel lockdown",
      object: "the QUIC object",
      otherFix: "check the kernel supports tc programs (CONFIG_NET_CLS_BPF, tcx)",
    });
  }
}

function hex(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += x.toString(16).padStart(2, "0");
  return s;
}
