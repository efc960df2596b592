/**
 * Listener: one listening socket's accept loop. Applies the connection limit, the ACL and the
 * per-source limits (before reading a byte), then hands each connection to a new Session.
 *
 * @module
 */
import { Acl } from "../route/acl.ts";
import type { ListenerConfig } from "../config/mod.ts";
import type { DialGuard } from "../route/dialguard.ts";
import type { HostResolver } from "../dns/resolver.ts";
import { type FdBudget, localResourceError, localResourceHint } from "./fdbudget.ts";
import { pathMode, type RelayPath } from "./kernel_handoff.ts";
import { BurstLog, logger, writeAccess } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { closeQuietly } from "./relay.ts";
import { E } from "../../ffi/socket.ts";
import { eventLoop } from "../io/loop.ts";
import { SocketError, socketError, TcpListenSocket, type TcpSocket } from "../io/tcp.ts";
import { Session, type SessionContext } from "./session.ts";
import type { CloseReason } from "./conn_record.ts";
import { formatAddr } from "../net/addr.ts";
import { errText } from "../ops/errtext.ts";
import { type Protocol, PROTOCOLS } from "../proto/protocol.ts";
import type { SourceLimiter } from "./sourcelimit.ts";
import type { OffenceSink } from "../ebpf/xdpblock.ts";
import type { RoutingTable, RoutingTables } from "../route/table.ts";

const log = logger("listener");
const bursts = new BurstLog(log);

/** Connections taken per report of a listening socket; the rest wait for the next round. */
const ACCEPT_BATCH = 64;
/** The accept queue of each listening socket (nginx's default; the kernel caps it at somaxconn). */
const BACKLOG = 511;

/** What a listener needs from the proxy that owns it. */
export interface ListenerHost {
  /** The routing tables new connections are served by (swapped on reload). */
  readonly tables: RoutingTables;
  readonly metrics: Metrics;
  /** How bytes move in this process (userspace, or kernel mode's pipes or sockmap). */
  readonly path: RelayPath;
  /** Resolves backend hosts for the sessions. */
  readonly resolver: HostResolver;
  /** Which resolved backend addresses sessions may dial. */
  readonly guard: DialGuard;
  /** The descriptor budget, or null when unknown. */
  readonly fds: FdBudget | null;
  /** Live connections and new-connection buckets per source (limits.per_source). */
  readonly sources: SourceLimiter;
  /**
   * Where offences of misbehaving sources go (ebpf.xdp.block): the counter of XDP blocks, or in
   * a worker the reports to its supervisor's; null when off.
   */
  readonly blocker: OffenceSink | null;
  /**
   * Resolves when a connection slot is free: under limits.max_connections, and with descriptors
   * for the client and its backend to spare (immediately when so).
   */
  waitForSlot(): Promise<void>;
  /** Whether a connection slot is free now (waitForSlot would resolve at once). */
  hasSlot(): boolean;
  /** Registers a live session (before it starts). */
  track(session: Session): void;
  /** The session ended: it no longer counts. */
  ended(session: Session): void;
}

/** A session context as a listener shares it, with the XDP blocker it was made for. */
type SharedContext = SessionContext & { blocker: OffenceSink | null };

/** A bound listening socket and its accept loop. */
export class Listener {
  readonly config: ListenerConfig;
  /** Its place in the config's listeners (which names its route table). */
  readonly index: number;
  /** The bound address (`127.0.0.1:8443`), with the real port when the config said 0. */
  readonly address: string;
  /** The same, as host and port. */
  readonly bound: Deno.NetAddr;
  readonly #socket: TcpListenSocket;
  readonly #host: ListenerHost;
  /** Sources that send a PROXY header first; null when the listener accepts none. */
  readonly #trusted: Acl | null;
  /** The protocol the config names. */
  readonly #protocol: Protocol;
  #closed = false;
  #onClosed: () => void = () => {};
  /** The session contexts in use: for clients, and for a trusted balancer's clients. */
  readonly #contexts: (SharedContext | null)[] = [null, null];

  /**
   * Binds the socket; throws (e.g. EADDRINUSE) with the address in the message. Always with
   * SO_REUSEPORT: worker processes share the address (the kernel spreads new connections over
   * them), and a new proxy process can bind it before the old one stops (a restart without
   * refusing anyone, see the README). `index` is its place in the config's listeners.
   */
  constructor(config: ListenerConfig, index: number, host: ListenerHost) {
    this.config = config;
    this.index = index;
    this.#host = host;
    // QUIC listeners are QuicListeners (src/conn/quic_listener.ts), never this
    this.#protocol = PROTOCOLS[config.protocol as Protocol["name"]];
    this.#trusted = config.acceptProxyProtocol.length
      ? new Acl(config.acceptProxyProtocol, [])
      : null;
    try {
      this.#socket = new TcpListenSocket(
        eventLoop(),
        config.hostname.replace(/^\[|\]$/g, ""),
        config.port,
        { reusePort: true, backlog: BACKLOG },
        () => this.#acceptBatch(),
      );
    } catch (e) {
      throw new Error(`cannot listen on ${config.address}: ${errText(e)}`);
    }
    this.bound = this.#socket.addr;
    this.address = formatAddr(this.bound);
  }

  /** Accepts until close(); resolves then. */
  serve(): Promise<void> {
    const closed = new Promise<void>((resolve) => this.#onClosed = resolve);
    if (this.#closed) return Promise.resolve();
    this.#socket.resume();
    return closed;
  }

  /**
   * Accepts what waits, up to a batch (the loop reports the rest next round), while the host
   * has a slot for it.
   */
  #acceptBatch(): void {
    const host = this.#host;
    for (let i = 0; i < ACCEPT_BATCH && !this.#closed; i++) {
      if (!host.hasSlot()) {
        // clients wait in the backlog until a slot frees up
        this.#socket.pause();
        host.waitForSlot().then(() => this.#socket.resume());
        return;
      }
      const got = this.#socket.accept();
      if (typeof got !== "number") {
        this.#admit(got);
        continue;
      }
      if (got === -E.EAGAIN) return;
      if (got === -E.ECONNABORTED || got === -E.EINTR) continue;
      this.#acceptFailed(socketError(`accept on ${this.address}`, -got));
      return;
    }
  }

  /**
   * EMFILE and friends: logged, counted, and the listener paused for 100 ms (a level-triggered
   * listener would otherwise be reported, and fail, every round); clients wait in the backlog.
   */
  #acceptFailed(e: SocketError): void {
    const lacking = localResourceError(e);
    if (lacking) {
      Metrics.bump(this.#host.metrics.localErrors, `accept:${lacking}`);
      bursts.warn(
        `accept:${lacking}`,
        `accept on ${this.address} failed: ${errText(e)}; retrying every 100 ms. ` +
          localResourceHint(lacking),
      );
    } else log.error(`accept on ${this.address} failed: ${errText(e)}`);
    this.#socket.pause();
    setTimeout(() => this.#socket.resume(), 100);
  }

  /** Applies the ACL and per-source limits to a new connection, then starts its session. */
  #admit(conn: TcpSocket): void {
    const host = this.#host;
    host.metrics.accepted++;
    const table = host.tables.byListener[this.index];
    const remote = conn.remoteAddr;
    // a trusted balancer's clients are checked by the session, once the header names them
    const trustedProxy = this.#trusted?.permits(remote.hostname) ?? false;
    if (!trustedProxy && !table.acl.permits(remote.hostname)) {
      log.info(`${formatAddr(remote)} denied by acl on ${this.address}`);
      this.#refuse(conn, remote, "acl_denied");
      return;
    }
    // a balancer's clients are not known yet: the per-source limits skip trusted sources
    const perSource = trustedProxy ? null : table.config.limits.perSource;
    const refusal = perSource ? host.sources.admit(remote.hostname, perSource) : null;
    if (refusal) {
      const limit = refusal === "source_connections"
        ? `limits.per_source.max_connections (${perSource!.maxConnections}) live connections`
        : `limits.per_source.new_per_second (${perSource!.newPerSecond}, burst ` +
          `${perSource!.burst}) new connections`;
      bursts.warn(
        refusal,
        `${formatAddr(remote)} refused on ${this.address}: its address is at ${limit}`,
      );
      this.#refuse(conn, remote, refusal);
      host.blocker?.offence(remote.hostname, refusal);
      return;
    }
    const session = new Session(conn, this.#sessionContext(table, trustedProxy));
    host.track(session);
    session.start(() => {
      if (perSource) host.sources.release(remote.hostname);
      host.ended(session);
    });
  }

  /**
   * What the sessions of `table` share (with the trusted balancer's clients, or not): made
   * once per table and kept until a reload changes what it holds.
   */
  #sessionContext(table: RoutingTable, trustedProxy: boolean): SharedContext {
    const host = this.#host;
    const cached = this.#contexts[trustedProxy ? 1 : 0];
    if (
      cached && cached.table === table && cached.guard === host.guard &&
      cached.blocker === host.blocker && cached.resolver === host.resolver &&
      cached.path === host.path && cached.fds === host.fds && cached.metrics === host.metrics
    ) return cached;
    const blocker = host.blocker;
    const context = {
      table,
      listener: this.address,
      protocol: this.#protocol,
      metrics: host.metrics,
      trustedProxy,
      path: host.path,
      resolver: host.resolver,
      guard: host.guard,
      fds: host.fds,
      blocker,
      // the socket's source is what XDP sees: a trusted balancer's clients are not blocked
      onBadHello: blocker && !trustedProxy
        ? (source: string) => blocker.offence(source, "bad_client_hello")
        : null,
    };
    this.#contexts[trustedProxy ? 1 : 0] = context;
    return context;
  }

  /** Closes a connection refused at accept; counts and access-logs it. */
  #refuse(conn: TcpSocket, remote: Deno.NetAddr, reason: CloseReason): void {
    closeQuietly(conn);
    Metrics.bump(this.#host.metrics.closed, reason);
    writeAccess({
      time: new Date().toISOString(),
      client: formatAddr(remote),
      listener: this.address,
      sni: null,
      route: null,
      backend: null,
      bytes_up: 0,
      bytes_down: 0,
      duration_ms: 0,
      close_reason: reason,
      mode: pathMode(this.#host.path),
    });
  }

  /** Stops accepting; live sessions are not touched. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#socket.close();
    this.#onClosed();
  }
}

/**
 * Warns (one line each) about the listeners whose address another socket listens on already:
 * this process will share new connections with it (SO_REUSEPORT). Expected while a new process
 * takes over from a running one; a mistake otherwise. Read from /proc/net/tcp and tcp6 (nothing
 * is said when they cannot be read); listeners on port 0 get a free port and are skipped.
 */
export function warnIfListened(listeners: ListenerConfig[]): void {
  const listening = listeningSockets();
  listeners.forEach((l, i) => {
    const host = normalHost(l.hostname);
    const wildcard = (h: string) => h === "0.0.0.0" || h === "[::]";
    const shared = l.port !== 0 &&
      listening.some((s) =>
        s.port === l.port && (s.host === host || wildcard(s.host) || wildcard(host))
      );
    if (shared) {
      log.warn(
        `listeners[${i}] ${l.address}: another socket listens there already. An sni-proxy ` +
          `there shares new connections with this one (SO_REUSEPORT) until it stops: expected ` +
          `while this process takes over from it (README: Restart without downtime), a ` +
          `mistake otherwise`,
      );
    }
  });
}

/** Listening TCP sockets of this network namespace, hosts as `normalHost` gives them. */
function listeningSockets(): { host: string; port: number }[] {
  const out: { host: string; port: number }[] = [];
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text = "";
    try {
      text = Deno.readTextFileSync(file);
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const [, local, , state] = line.trim().split(/\s+/);
      if (state !== "0A" || !local) continue; // 0A: TCP_LISTEN
      const [hex, port] = local.split(":");
      // each 32-bit word of the address is in host (little-endian) byte order
      const bytes = (hex.match(/.{8}/g) ?? []).flatMap((w) =>
        (w.match(/../g) ?? []).reverse().map((b) => parseInt(b, 16))
      );
      const host = bytes.length === 4 ? bytes.join(".") : normalHost(
        Array.from({ length: 8 }, (_, k) => (bytes[2 * k] << 8 | bytes[2 * k + 1]).toString(16))
          .join(":"),
      );
      out.push({ host, port: parseInt(port, 16) });
    }
  }
  // the runtime's last regexp match keeps its subject, a slice of the whole file (a megabyte
  // with many connections): point it at a string of its own
  /^/.exec("");
  return out;
}

/** An IP address in one spelling: IPv4 as is, IPv6 compressed in brackets (`[::1]`). */
function normalHost(ip: string): string {
  return ip.includes(":") ? new URL(`http://[${ip}]/`).hostname : ip;
}
