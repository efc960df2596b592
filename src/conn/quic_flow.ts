/**
 * QUIC flows of one listener: what is known of each client address:port (its Initial reader
 * while the ClientHello is not whole, its buffered datagrams, then its backend socket), and the
 * table that finds a flow per datagram: by the client's address, or (a client that rebinds to
 * a new address:port) by the connection ID the backend chose, learned from the Source
 * Connection ID of its long-header packets.
 *
 * Everything is bounded: flows in all and per source (the listener checks before adding),
 * flows not routed yet (the oldest gives way), datagrams and bytes buffered per flow, server
 * connection IDs per flow.
 *
 * @module
 */
import type { QuicInitialReader } from "../proto/quic.ts";
import type { Backend, BackendPool } from "../route/backend.ts";
import type { RoutingTable } from "../route/table.ts";
import type { UdpSocket } from "../io/udp.ts";
import type { SessionInfo } from "./conn_record.ts";

/** Server connection IDs one flow is followed by at most (a Retry adds one). */
const MAX_CIDS_PER_FLOW = 4;

/** An address as the kernel fast path takes it. */
export interface FlowAddr {
  hostname: string;
  port: number;
}

/** A routed flow's four addresses (client C -> listener L, socket S -> backend B). */
export interface KernelFlow {
  client: FlowAddr;
  listener: FlowAddr;
  local: FlowAddr;
  backend: FlowAddr;
}

/**
 * The kernel forwarding of routed flows (kernel mode; see src/ebpf/quic.ts), as a flow table
 * uses it: after routing a flow is added (false: it stays in userspace, e.g. the map is full),
 * its idle time is read at each sweep, and it is removed before its socket closes.
 */
export interface QuicKernelPath {
  addFlow(flow: KernelFlow): boolean;
  removeFlow(flow: KernelFlow): boolean;
  /** What the kernel forwarded of the flow, and how long ago it last did; null: not there. */
  lastSeen(flow: KernelFlow): {
    idleMs: number;
    toBackend: { packets: number; bytes: number };
    toClient: { packets: number; bytes: number };
  } | null;
}

/**
 * With workers > 1: where a listener publishes the server connection IDs its flows are followed
 * by, so that the kernel sends a datagram carrying one to this worker whatever its source
 * address (see src/ebpf/quic_reuseport.ts). Calls never throw (a refusal is counted there).
 */
export interface SteeredIds {
  add(cid: string): void;
  remove(cid: string): void;
}

/** Where a flow is in its life. */
export type FlowState =
  /** Reading the ClientHello from the Initials; datagrams are buffered. */
  | "pending"
  /** The hello is whole; a backend is being picked (maybe a name resolved). */
  | "routing"
  /** Forwarding both ways. */
  | "routed"
  /** Refused (bad Initial, no route...): its datagrams are dropped until it expires. */
  | "refused"
  | "closed";

/** Why a flow ended, as the access log says it. */
export type FlowEnd =
  | "idle_timeout"
  | "client_hello_timeout"
  | "bad_initial"
  | "no_route"
  | "no_backend"
  | "backend_full"
  | "address_denied"
  | "connect_failed"
  | "resource_exhausted"
  | "fingerprint_denied"
  | "backend_refused"
  | "pending_evicted"
  /** An Initial of another connection came from the flow's address (a reused port). */
  | "new_connection"
  | "admin"
  | "shutdown";

/** One client address:port of a QUIC listener. */
export class QuicFlow {
  /** The client's key in the table (see sockaddrKey). */
  key: number | string;
  /** The client's sockaddr as received (where its answers are sent). */
  clientAddr: Uint8Array;
  /** The address the client sends to (the listener's, or from IP_PKTINFO), or null. */
  listenerIp: string | null = null;
  /** The client as `IP:port`, and its IP (ACL, limits, balancing). */
  client: string;
  clientNet: Deno.NetAddr;
  readonly table: RoutingTable;
  state: FlowState = "pending";
  reader: QuicInitialReader | null;
  /** Datagrams held until the flow is routed (copies), and their bytes. */
  pending: Uint8Array[] = [];
  pendingBytes = 0;
  sock: UdpSocket | null = null;
  pool: BackendPool | null = null;
  backend: Backend | null = null;
  /** The backend as dialled (`IP:port`) and as configured. */
  backendText: string | null = null;
  backendLabel: string | null = null;
  route: string | null = null;
  sni: string | null = null;
  alpn: string[] | undefined;
  ja4: string | undefined;
  ja3: string | undefined;
  /** The client's first Destination Connection ID (as a CID key), once the hello is whole. */
  clientDcid: string | null = null;
  /** Server connection IDs the table follows this flow by (keys of the CID map). */
  readonly cids: string[] = [];
  /** Kernel mode: the flow as added to the kernel, or null (userspace). */
  kernel: KernelFlow | null = null;
  /** Kernel mode: routed, and added to the kernel once the backend's ID was seen. */
  kernelAfterIds = false;
  /** Whether the kernel forwarded it at some time (the access log's `mode`). */
  wasInKernel = false;
  /** ms since epoch. */
  readonly started = Date.now();
  lastActive = this.started;
  datagramsUp = 0;
  datagramsDown = 0;
  bytesUp = 0;
  bytesDown = 0;
  /** The IP counted against limits.per_source (released at the end), or null. */
  admittedIp: string | null = null;
  endReason: FlowEnd | null = null;
  error: string | null = null;

  constructor(
    key: number | string,
    clientAddr: Uint8Array,
    clientNet: Deno.NetAddr,
    client: string,
    table: RoutingTable,
    reader: QuicInitialReader,
  ) {
    this.key = key;
    this.clientAddr = clientAddr;
    this.clientNet = clientNet;
    this.client = client;
    this.table = table;
    this.reader = reader;
  }

  /** Keeps a copy of a datagram for after routing; false when the flow's buffer is full. */
  hold(datagram: Uint8Array, maxDatagrams: number, maxBytes: number): boolean {
    if (this.pending.length >= maxDatagrams) return false;
    if (this.pendingBytes + datagram.length > maxBytes) return false;
    this.pending.push(datagram.slice());
    this.pendingBytes += datagram.length;
    return true;
  }

  /** What the admin API shows of it. */
  info(listener: string): SessionInfo {
    return {
      state: this.route === null ? "hello" : "relaying",
      client: this.client,
      listener,
      table: this.table.name,
      sni: this.sni,
      route: this.route,
      backend: this.backendText,
      backend_config: this.backendLabel,
      age_ms: Date.now() - this.started,
      bytes_up: this.bytesUp,
      bytes_down: this.bytesDown,
      mode: this.wasInKernel ? "kernel" : "userspace",
    };
  }
}

/** The key of a connection ID in the CID map. */
export function cidKey(b: Uint8Array, start = 0, len = b.length - start): string {
  let s = "";
  for (let i = start; i < start + len; i++) s += String.fromCharCode(b[i]);
  return s;
}

/** A listener's flows by client address and by server connection ID. */
export class FlowTable {
  readonly #byClient = new Map<number | string, QuicFlow>();
  readonly #byCid = new Map<string, QuicFlow>();
  /** Connection ID lengths seen (a short header does not say its DCID's length). */
  readonly #cidLengths = new Set<number>();
  /** Flows not routed yet and refused ones, oldest first (a Set keeps insertion order). */
  readonly #pending = new Set<QuicFlow>();
  /** Flows per client IP, for quic.max_flows_per_source. */
  readonly #perSource = new Map<string, number>();
  /** Where the IDs in #byCid are published for steering (workers > 1), or null. */
  readonly #steered: SteeredIds | null;

  constructor(steered: SteeredIds | null = null) {
    this.#steered = steered;
  }

  /** Flows in the table (all states). */
  get size(): number {
    return this.#byClient.size;
  }

  /** Flows whose hello is not whole yet, and refused ones. */
  get pendingCount(): number {
    return this.#pending.size;
  }

  /** Every flow. */
  flows(): IterableIterator<QuicFlow> {
    return this.#byClient.values();
  }

  get(key: number | string): QuicFlow | undefined {
    return this.#byClient.get(key);
  }

  /** Flows `ip` holds now. */
  ofSource(ip: string): number {
    return this.#perSource.get(ip) ?? 0;
  }

  /** The oldest flow not routed yet (or refused), or undefined. */
  oldestPending(): QuicFlow | undefined {
    return this.#pending.values().next().value;
  }

  add(flow: QuicFlow): void {
    this.#byClient.set(flow.key, flow);
    this.#pending.add(flow);
    const ip = flow.clientNet.hostname;
    this.#perSource.set(ip, (this.#perSource.get(ip) ?? 0) + 1);
  }

  /** The flow is being routed: no longer one to evict. */
  settled(flow: QuicFlow): void {
    this.#pending.delete(flow);
  }

  /** The flow was refused: its tombstone may give way to a new flow, as a pending one may. */
  evictable(flow: QuicFlow): void {
    this.#pending.delete(flow);
    this.#pending.add(flow);
  }

  /** Follows `flow` by the server connection ID in `b` (bounded per flow; 0-length IDs not). */
  learnCid(flow: QuicFlow, b: Uint8Array, start: number, len: number): void {
    if (len === 0 || flow.cids.length >= MAX_CIDS_PER_FLOW) return;
    const key = cidKey(b, start, len);
    if (flow.cids.includes(key)) return;
    const other = this.#byCid.get(key);
    // another flow's ID (a backend reusing one): the newer flow takes it
    if (other && other !== flow) other.cids.splice(other.cids.indexOf(key), 1);
    flow.cids.push(key);
    this.#byCid.set(key, flow);
    this.#cidLengths.add(len);
    this.#steered?.add(key);
  }

  /**
   * The flow whose server connection ID a datagram from an unknown address carries as its
   * Destination Connection ID: in a long header it is explicit; in a short one every length
   * seen is tried.
   */
  byDcid(b: Uint8Array, n: number): QuicFlow | undefined {
    if (n < 2) return undefined;
    if (b[0] & 0x80) {
      if (n < 6) return undefined;
      const len = b[5];
      return len > 0 && 6 + len <= n ? this.#byCid.get(cidKey(b, 6, len)) : undefined;
    }
    for (const len of this.#cidLengths) {
      if (1 + len > n) continue;
      const flow = this.#byCid.get(cidKey(b, 1, len));
      if (flow) return flow;
    }
    return undefined;
  }

  /** Moves `flow` to a new client address (it rebound); the old address is forgotten. */
  rebind(
    flow: QuicFlow,
    key: number | string,
    addr: Uint8Array,
    net: Deno.NetAddr,
    text: string,
  ): void {
    this.#byClient.delete(flow.key);
    const other = this.#byClient.get(key);
    if (other && other !== flow) return; // the caller checked; never two flows on one address
    this.#sourceDone(flow.clientNet.hostname);
    flow.key = key;
    flow.clientAddr = addr;
    flow.clientNet = net;
    flow.client = text;
    this.#byClient.set(key, flow);
    this.#perSource.set(net.hostname, (this.#perSource.get(net.hostname) ?? 0) + 1);
  }

  /** Takes `flow` out of every index. */
  remove(flow: QuicFlow): void {
    if (this.#byClient.get(flow.key) === flow) this.#byClient.delete(flow.key);
    this.#pending.delete(flow);
    for (const c of flow.cids) {
      if (this.#byCid.get(c) !== flow) continue;
      this.#byCid.delete(c);
      this.#steered?.remove(c);
    }
    this.#sourceDone(flow.clientNet.hostname);
  }

  #sourceDone(ip: string): void {
    const n = (this.#perSource.get(ip) ?? 1) - 1;
    if (n <= 0) this.#perSource.delete(ip);
    else this.#perSource.set(ip, n);
  }
}
