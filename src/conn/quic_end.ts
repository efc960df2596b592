/**
 * The life events of a QUIC listener's flows after the first datagram: routed (buffered
 * datagrams flushed, kernel forwarding added in kernel mode), refused, failed sends, idle or
 * hello timeouts found by the sweep, and the end: resources released, passive health told,
 * counted and access-logged once.
 *
 * Passive health over UDP: a backend socket that gets ECONNREFUSED (ICMP port unreachable) or
 * a flow that idles out having sent datagrams and received none counts as a failed connect of
 * its backend (`health.max_fails` / `fail_timeout_ms` as for TCP); a datagram back resets it.
 *
 * @module
 */
import { E, errnoText } from "../../ffi/socket.ts";
import type { DialGuard } from "../route/dialguard.ts";
import type { RoutingTables } from "../route/table.ts";
import type { HostResolver } from "../dns/resolver.ts";
import type { OffenceSink } from "../ebpf/xdpblock.ts";
import { writeAccess } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import type { FdBudget } from "./fdbudget.ts";
import type { SourceLimiter } from "./sourcelimit.ts";
import type { QuicRouteResult } from "./quic_route.ts";
import type { FlowEnd, FlowTable, QuicFlow, QuicKernelPath, SteeredIds } from "./quic_flow.ts";

/** What a QUIC listener needs from the proxy that owns it. */
export interface QuicListenerHost {
  /** The routing tables new flows are served by (swapped on reload). */
  readonly tables: RoutingTables;
  readonly metrics: Metrics;
  readonly resolver: HostResolver;
  /** Which backend addresses flows may be sent to (not the proxy's own UDP sockets). */
  readonly quicGuard: DialGuard;
  readonly fds: FdBudget | null;
  /** limits.per_source, shared with the TCP listeners. */
  readonly sources: SourceLimiter;
  /** Where offences go (ebpf.xdp.block), or null. */
  readonly blocker: OffenceSink | null;
  /** Kernel mode: the kernel forwarding of routed flows, or null (userspace). */
  readonly quicKernel: QuicKernelPath | null;
  /**
   * With workers > 1: steering by connection ID. A listener joins with its bound socket and
   * publishes its flows' server IDs through what it gets (null: not steered, hashed).
   */
  readonly quicSteer: { join(listener: number, fd: number): SteeredIds | null } | null;
}

/** Ends, refusals and routing outcomes of one listener's flows. */
export class FlowEnder {
  readonly #host: QuicListenerHost;
  readonly #flows: FlowTable;
  readonly #listener: string;
  readonly #bound: Deno.NetAddr;
  readonly #onRemoved: () => void;

  constructor(
    host: QuicListenerHost,
    flows: FlowTable,
    listener: string,
    bound: Deno.NetAddr,
    onRemoved: () => void,
  ) {
    this.#host = host;
    this.#flows = flows;
    this.#listener = listener;
    this.#bound = bound;
    this.#onRemoved = onRemoved;
  }

  /** Routing ended: flushes the held datagrams through `forward`, or refuses the flow. */
  routed(flow: QuicFlow, r: QuicRouteResult, forward: (d: Uint8Array) => void): void {
    if (flow.state !== "routing") {
      // ended meanwhile (shutdown, admin): the socket just made is not needed
      if (r.kind === "routed") {
        r.sock.close();
        this.#host.fds?.backendClosed();
        r.backend.active--;
      }
      return;
    }
    flow.route = r.route;
    if (r.kind === "refused") {
      this.refuse(flow, r.reason, r.error);
      return;
    }
    flow.sock = r.sock;
    flow.pool = r.pool;
    flow.backend = r.backend;
    flow.backendText = r.dialled;
    flow.backendLabel = r.label;
    flow.state = "routed";
    this.#host.metrics.quic.routed++;
    const held = flow.pending;
    flow.pending = [];
    flow.pendingBytes = 0;
    for (const d of held) forward(d);
    // The kernel would hide the backend's first datagrams, whose Source Connection ID is what
    // the flow is found by when its client rebinds (and, with workers, what the kernel steers
    // by): it takes over once the listener saw that ID (idsSeen). Being after the flush,
    // nothing the kernel forwards can overtake a held datagram.
    if (this.#host.quicKernel) flow.kernelAfterIds = true;
  }

  /** Kernel mode: the backend's connection ID is known (see routed): the kernel takes over. */
  idsSeen(flow: QuicFlow): void {
    if (!flow.kernelAfterIds || flow.state !== "routed") return;
    flow.kernelAfterIds = false;
    this.#toKernel(flow);
  }

  /** Adds a routed flow to the kernel path (kernel mode); counted when it stays in userspace. */
  #toKernel(flow: QuicFlow): void {
    const kernel = this.#host.quicKernel;
    if (!kernel || !flow.sock?.remote) return;
    const fallbacks = this.#host.metrics.quic.kernelFallbacks;
    const b = this.#bound;
    const local = flow.listenerIp;
    if (!local || local === "0.0.0.0" || local === "::") {
      // the program rewrites to the address the client sent to: here it is not known
      Metrics.bump(fallbacks, "no_local_address");
      return;
    }
    const kf = {
      // a dual-stack socket's IPv4 client is IPv4 on the wire, where the program works
      client: {
        hostname: flow.clientNet.hostname.replace(/^::ffff:(?=\d)/, ""),
        port: flow.clientNet.port,
      },
      listener: { hostname: local, port: b.port },
      local: { hostname: flow.sock.addr.hostname, port: flow.sock.addr.port },
      backend: { hostname: flow.sock.remote.hostname, port: flow.sock.remote.port },
    };
    try {
      if (kernel.addFlow(kf)) {
        flow.kernel = kf;
        flow.wasInKernel = true;
      } else Metrics.bump(fallbacks, "map_full");
    } catch {
      Metrics.bump(fallbacks, "error");
    }
  }

  /** The flow moved to a new client address: its kernel entry follows. */
  rebound(flow: QuicFlow): void {
    const old = flow.kernel;
    if (!old) return;
    this.#collectKernel(flow);
    flow.kernel = null;
    this.#toKernel(flow);
  }

  /**
   * Refuses a flow (bad Initial, no route...): counted and logged now; the flow stays, its
   * datagrams dropped, until it is quiet for client_hello_ms, so a client retrying costs no
   * new hello reading or routing.
   */
  refuse(flow: QuicFlow, reason: FlowEnd, error: string | null): void {
    flow.error = error;
    flow.reader = null;
    flow.pending = [];
    flow.pendingBytes = 0;
    this.#flows.evictable(flow);
    this.#log(flow, reason);
    flow.state = "refused";
  }

  /**
   * Ends a flow. `record`: `log` counts it and writes its access-log line; `count` only counts
   * it (a flood's evictions would flood the log); `none` neither (a first datagram that
   * started no hello: counted as a drop, it was never a flow).
   */
  end(flow: QuicFlow, reason: FlowEnd, record: "log" | "count" | "none" = "log"): void {
    if (flow.state === "closed") return;
    const refused = flow.state === "refused";
    this.#collectKernel(flow);
    if (!refused && record === "log") this.#log(flow, reason);
    else if (!refused && record === "count") Metrics.bump(this.#host.metrics.quic.closed, reason);
    const { pool, backend } = flow;
    if (pool && backend) {
      backend.active--;
      if (reason === "idle_timeout" && flow.datagramsUp > 0 && flow.datagramsDown === 0) {
        pool.connectFailed(backend, "no datagram came back on a QUIC flow");
      }
    }
    if (flow.sock) {
      flow.sock.close();
      this.#host.fds?.backendClosed();
    }
    this.#remove(flow);
  }

  /** Takes a flow out of the table for good. */
  #remove(flow: QuicFlow): void {
    flow.state = "closed";
    flow.pending = [];
    flow.reader = null;
    this.#flows.remove(flow);
    this.#host.metrics.quic.active--;
    if (flow.admittedIp !== null) this.#host.sources.release(flow.admittedIp);
    this.#onRemoved();
  }

  /** Takes the flow out of the kernel, adding what the kernel forwarded to its counts. */
  #collectKernel(flow: QuicFlow): void {
    const kernel = this.#host.quicKernel;
    if (!kernel || !flow.kernel) return;
    try {
      const seen = kernel.lastSeen(flow.kernel);
      if (seen) {
        flow.datagramsUp += seen.toBackend.packets;
        flow.bytesUp += seen.toBackend.bytes;
        flow.datagramsDown += seen.toClient.packets;
        flow.bytesDown += seen.toClient.bytes;
      }
      kernel.removeFlow(flow.kernel);
    } catch { /* the kernel path is closed: nothing to take out */ }
    flow.kernel = null;
  }

  /** Ends flows idle for quic.idle_ms, and those not routed within client_hello_ms. */
  sweep(now: number): void {
    const config = this.#host.tables.config;
    const idleMs = config.quic.idleMs;
    const helloMs = config.timeouts.clientHelloMs;
    for (const f of this.#flows.flows()) {
      if (f.state === "routed") {
        if (now - f.lastActive < idleMs || this.#kernelActive(f, now, idleMs)) continue;
        this.end(f, "idle_timeout");
      } else if (f.state === "refused") {
        if (now - f.lastActive >= helloMs) this.#remove(f);
      } else if (now - f.started >= helloMs) this.end(f, "client_hello_timeout");
    }
  }

  /** Whether the kernel forwarded a datagram of `f` within `idleMs` (its lastActive moves). */
  #kernelActive(f: QuicFlow, now: number, idleMs: number): boolean {
    if (!f.kernel) return false;
    try {
      const seen = this.#host.quicKernel!.lastSeen(f.kernel);
      if (!seen || seen.idleMs >= idleMs) return false;
      f.lastActive = Math.max(f.lastActive, now - seen.idleMs);
      return true;
    } catch {
      return false;
    }
  }

  /** A send to the backend failed with `errno`. */
  sendFailed(flow: QuicFlow, errno: number): void {
    if (errno === E.ECONNREFUSED) this.#backendRefused(flow);
    else {
      this.#host.metrics.quic.drop(
        errno === E.EAGAIN || errno === E.ENOBUFS ? "send_buffer_full" : "send_error",
      );
    }
  }

  /** A receive from the backend failed with `errno`. */
  receiveFailed(flow: QuicFlow, errno: number): void {
    if (errno === E.ECONNREFUSED) this.#backendRefused(flow);
    else this.#host.metrics.quic.drop("receive_error");
  }

  /** The backend's host says its port is closed: a failed connect of the backend. */
  #backendRefused(flow: QuicFlow): void {
    const why = `ICMP port unreachable (${errnoText(E.ECONNREFUSED)})`;
    if (flow.pool && flow.backend) flow.pool.connectFailed(flow.backend, why);
    flow.error = why;
    this.end(flow, "backend_refused");
  }

  /** Counts the flow's end and writes its access-log line. */
  #log(flow: QuicFlow, reason: FlowEnd): void {
    const m = this.#host.metrics;
    Metrics.bump(m.quic.closed, reason);
    if (flow.route) Metrics.bump(m.byRoute, flow.route);
    if (flow.backendLabel) Metrics.bump(m.byBackend, flow.backendLabel);
    writeAccess({
      time: new Date().toISOString(),
      client: flow.client,
      listener: this.#listener,
      sni: flow.sni,
      ...(flow.alpn ? { alpn: flow.alpn } : {}),
      ...(flow.ja4 ? { ja4: flow.ja4, ja3: flow.ja3 } : {}),
      route: flow.route,
      backend: flow.backendText,
      bytes_up: flow.bytesUp,
      bytes_down: flow.bytesDown,
      protocol: "quic",
      datagrams_up: flow.datagramsUp,
      datagrams_down: flow.datagramsDown,
      duration_ms: Date.now() - flow.started,
      close_reason: reason,
      mode: flow.wasInKernel ? "kernel" : "userspace",
      ...(flow.error ? { error: flow.error } : {}),
    });
  }
}
