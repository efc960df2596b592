/**
 * One client connection's life, in steps: read the ClientHello (or HTTP head) -> route by name ->
 * connect a backend (src/conn/backend_dial.ts) -> forward the bytes read so far -> relay until
 * both sides are done (in kernel mode handed to the kernel: src/conn/kernel_handoff.ts) -> access
 * log (src/conn/conn_record.ts). The connection is an explicit state machine: its record's
 * `state` goes hello -> routing -> connecting -> relaying (-> draining once one side has ended) ->
 * closed, and the admin API shows it. What differs between TLS and HTTP listeners is their
 * {@link Protocol} value.
 *
 * Every step is a synchronous handler of a socket event (the client's bytes, the backend's
 * connect, room to write the hello), as in the relay: no promise, timer or abort signal per
 * step. The hello and connect timeouts (connect_ms bounds the hello's write too:
 * src/conn/first_write.ts) are deadlines in queues shared by every session (src/io/deadlines.ts);
 * a refused client's socket outlives its session in a lingering close (src/conn/linger.ts).
 *
 * @module
 */
import type { Backend, BackendPool } from "../route/backend.ts";
import { concat } from "../net/bytes.ts";
import { E } from "../../ffi/socket.ts";
import { socketError, type TcpSocket } from "../io/tcp.ts";
import { type Deadline, deadline } from "../io/deadlines.ts";
import { formatAddr } from "../net/addr.ts";
import type { ClientHello } from "../proto/clienthello.ts";
import type { Head, HeadReader, Protocol, Refusal } from "../proto/protocol.ts";
import type { DialGuard } from "../route/dialguard.ts";
import type { FdBudget } from "./fdbudget.ts";
import { logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { errText } from "../ops/errtext.ts";
import { type ByteRelay, closeQuietly, Relay, type RelayEnd } from "./relay.ts";
import {
  parseProxyHeader,
  ProxyHeaderError,
  type ReceivedProxyHeader,
} from "../proto/proxyproto.ts";
import type { HostResolver } from "../dns/resolver.ts";
import type { RoutingTable } from "../route/table.ts";
import { type CloseReason, ConnRecord, type SessionInfo } from "./conn_record.ts";
import { dialBackend, type Dialling, type DialResult } from "./backend_dial.ts";
import { pickRoute } from "./route_pick.ts";
import {
  backendStalled,
  boundFirstWrite,
  type FirstWrite,
  type FirstWriteEnd,
  type StalledBackend,
  writeFirst,
} from "./first_write.ts";
import { lingerClose } from "./linger.ts";
import { proxyHeaderFor } from "./proxy_tlvs.ts";
import { type KernelHandoff, kernelHandoff, type RelayPath } from "./kernel_handoff.ts";

const log = logger("session");

/** What a session needs from the proxy around it. */
export interface SessionContext {
  table: RoutingTable;
  /** The listener's bound address, e.g. `127.0.0.1:8443`. */
  listener: string;
  /** The listener's protocol: how the head is read, how a refused client is told. */
  protocol: Protocol;
  metrics: Metrics;
  /**
   * The connection comes from a trusted load balancer (`accept_proxy_protocol`): it starts
   * with a PROXY header naming the real client, and the ACL applies to that client.
   */
  trustedProxy: boolean;
  /** How bytes move in this process (userspace, or kernel mode's pipes or sockmap). */
  path: RelayPath;
  /** Resolves backend hosts. */
  resolver: HostResolver;
  /** Which resolved backend addresses may be dialled. */
  guard: DialGuard;
  /** The process's descriptor budget (told about backend sockets), or null when unknown. */
  fds: FdBudget | null;
  /**
   * Told when the client sent a bad ClientHello / HTTP head (an XDP block offence), with the
   * socket's source address; or null.
   */
  onBadHello?: ((source: string) => void) | null;
}

/**
 * What every session reads its hello into: the parser copies each read at once (before any
 * await), so one buffer serves them all and a new connection allocates none for it.
 */
const helloChunk = new Uint8Array(16 * 1024);

/** One accepted client connection. */
export class Session {
  readonly #client: TcpSocket;
  readonly #ctx: SessionContext;
  /** What is known of the connection; at the end its metrics and access-log line. */
  readonly #record: ConnRecord;
  /** The client and the address it connected to: the socket's, or a trusted PROXY header's. */
  #clientNet: Deno.NetAddr;
  /** Null until asked for (a getsockname), unless a PROXY header named it. */
  #serverNet: Deno.NetAddr | null = null;
  /** The head's parser while the hello is read. */
  #parser: HeadReader | null = null;
  /** A trusted balancer's PROXY header read so far (null: none expected, or read). */
  #proxyBytes: Uint8Array | null = null;
  /** The client_hello_ms deadline while the hello is read. */
  #helloDeadline: Deadline | null = null;
  /** Bytes read from the client before the backend was connected; forwarded as-is. */
  #pending: Uint8Array | null = null;
  /** The ALPN protocols of the route taken (null: a route without `alpn`). */
  #routeAlpn: readonly string[] | null = null;
  /** Kernel mode's part, made once the client is known; null in userspace mode. */
  #handoff: KernelHandoff | null = null;
  /** The dial under way. */
  #dial: Dialling | null = null;
  #backendConn: TcpSocket | null = null;
  /** The backend connected to: this session is one of its `active` connections. */
  #backend: Backend | null = null;
  /** The write of the first bytes to the backend (hello, maybe after a PROXY header). */
  #firstWrite: FirstWrite | null = null;
  /** A sockmap relay writes them: the connect_ms deadline of that write, while it lasts. */
  #firstDue: Deadline | null = null;
  /** The client was told no and sent its FIN: it is closed by a lingering close. */
  #refused = false;
  #relay: ByteRelay | null = null;
  #stopReason: CloseReason | null = null;
  /** The error behind the end so far, for the access log. */
  #error: unknown = null;
  #ended = false;
  #onEnd: (() => void) | null = null;

  constructor(client: TcpSocket, ctx: SessionContext) {
    this.#client = client;
    this.#ctx = ctx;
    this.#clientNet = client.remoteAddr;
    this.#record = new ConnRecord({
      client: formatAddr(client.remoteAddr),
      listener: ctx.listener,
      table: ctx.table.name,
    });
  }

  /** Serves the connection; `onEnd` is called once at its end (maybe before this returns). */
  start(onEnd: () => void): void {
    this.#onEnd = onEnd;
    this.#guarded(() => this.#begin());
  }

  /** What the admin API shows of this session. */
  info(): SessionInfo {
    return this.#record.info();
  }

  /** Ends the session now (drain deadline passed, or closed by the admin API). */
  stop(reason: CloseReason = "shutdown"): void {
    if (this.#stopReason || this.#ended) return;
    this.#stopReason = reason;
    if (this.#relay) this.#relay.stop(reason as RelayEnd);
    else if (this.#dial) this.#dial.stop();
    else this.#end(reason);
  }

  /** Runs a step; a step that throws (a defect) ends the session as `error`, logged. */
  #guarded(step: () => void): void {
    try {
      step();
    } catch (e) {
      if (this.#ended) return;
      this.#error = e;
      log.warn(`session ${this.#record.client}: ${errText(e)}`);
      this.#end("error");
    }
  }

  /**
   * Ends the session with `reason` (a stop's reason wins over an error it caused): every socket
   * closed, the backend's slot given back, the connection counted and logged. Once.
   */
  #end(reason: CloseReason): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#helloDeadline?.cancel();
    this.#dial?.stop();
    this.#firstWrite?.stop();
    this.#firstDue?.cancel();
    if (this.#backend) this.#backend.active--;
    this.#handoff?.release();
    if (this.#refused) {
      const { timeouts, limits } = this.#ctx.table.config;
      const { metrics, fds } = this.#ctx;
      lingerClose(this.#client, { ms: timeouts.lingerMs, max: limits.maxLingering, metrics, fds });
    } else closeQuietly(this.#client);
    if (this.#backendConn) {
      closeQuietly(this.#backendConn);
      this.#ctx.fds?.backendClosed();
    }
    const final = this.#stopReason && reason === "error" ? this.#stopReason : reason;
    this.#record.state = "closed";
    try {
      this.#record.finish(this.#ctx.metrics, final, () => this.#error ?? this.#relay?.error);
    } finally {
      // counted out whatever happened: a session left in would hold a drain to its deadline
      this.#onEnd?.();
    }
  }

  /** Starts reading the hello: the client's events drive the session from here on. */
  #begin(): void {
    const { table, protocol } = this.#ctx;
    const { timeouts, limits } = table.config;
    this.#parser = protocol.parser({
      maxBytes: limits.maxClientHelloBytes,
      fingerprint: table.fingerprints,
    });
    if (this.#ctx.trustedProxy) this.#proxyBytes = new Uint8Array(0);
    this.#helloDeadline = deadline(
      timeouts.clientHelloMs,
      () => this.stop("client_hello_timeout"),
    );
    // a new connection's hello comes after the accept: epoll says when, rather than a read
    this.#client.setHandler(() => this.#guarded(() => this.#readHello()));
    if (this.#client.readable) this.#readHello();
  }

  /** The parsed ClientHello (TLS listeners only). */
  get #hello(): ClientHello | null {
    return this.#record.hello;
  }

  /**
   * Reads what the client sent until the parser has the head, then routes. A bad or missing
   * hello (or PROXY header) ends the session.
   */
  #readHello(): void {
    const client = this.#client;
    const buf = helloChunk;
    while (client.readable && this.#parser !== null && !this.#ended) {
      const n = this.#readClient(buf);
      if (n === 0) return;
      if (typeof n !== "number" && n !== null) {
        this.#finishEarly("client_reset", n);
        return;
      }
      let head: Head | null;
      try {
        const chunk = this.#afterProxyHeader(n === null ? null : buf.subarray(0, n));
        if (chunk === undefined) continue;
        head = chunk === null ? this.#parser.end() : this.#parser.push(chunk);
      } catch (e) {
        this.#headFailed(e);
        return;
      }
      // a view, not a copy: the parser is not fed again
      if (head) this.#headRead(head, this.#parser.data);
    }
  }

  /**
   * What of a read (null: EOF) is the client's own, after a trusted balancer's PROXY header:
   * undefined while the header is incomplete, or it was read and nothing followed, or the ACL
   * refused its client (the session is ended then).
   * @throws {ProxyHeaderError} on a bad header or an EOF inside it.
   */
  #afterProxyHeader(chunk: Uint8Array | null): Uint8Array | null | undefined {
    if (this.#proxyBytes === null) return chunk;
    if (chunk === null) throw new ProxyHeaderError("connection ended inside the PROXY header");
    const bytes = concat(this.#proxyBytes, chunk);
    const h = parseProxyHeader(bytes);
    if (!h) {
      this.#proxyBytes = bytes;
      return undefined;
    }
    this.#proxyBytes = null;
    if (!this.#acceptProxyHeader(h)) return undefined;
    const rest = bytes.subarray(h.headerBytes);
    return rest.length === 0 ? undefined : rest;
  }

  /**
   * One read of the client into `buf`: bytes read, null at EOF, 0 for nothing after all
   * (EAGAIN), or the error. Synchronous: the caller uses `buf` before anything else runs (the
   * buffer is shared by all sessions).
   */
  #readClient(buf: Uint8Array): number | null | Error {
    const n = this.#client.recv(buf);
    if (n > 0) return n;
    if (n === 0) return null;
    return n === -E.EAGAIN ? 0 : socketError("recv", -n);
  }

  /** The head is read (`data`: every byte read so far): routes by its name. */
  #headRead(head: Head, data: Uint8Array): void {
    this.#parser = null;
    this.#helloDeadline?.cancel();
    this.#helloDeadline = null;
    this.#client.setHandler(null);
    this.#pending = data;
    const record = this.#record;
    record.noteHelloRead();
    record.sni = head.serverName;
    record.hello = this.#ctx.protocol.hello(head);
    record.state = "routing";
    const picked = pickRoute(this.#ctx.table, record, head.serverName);
    if ("refusal" in picked) {
      this.#refuse(picked.refusal);
      this.#end(picked.reason);
      return;
    }
    const pool = picked.pool;
    this.#routeAlpn = picked.alpn;
    record.state = "connecting";
    this.#connectBackend(head.serverName, pool);
  }

  /** Closes a connection whose head (or PROXY header) could not be read; rethrows the rest. */
  #headFailed(e: unknown): void {
    const client = this.#record.client;
    if (e instanceof ProxyHeaderError) {
      log.warn(`bad PROXY header from trusted ${client}: ${e.message}`);
      this.#finishEarly("bad_proxy_header", e);
      return;
    }
    const protocol = this.#ctx.protocol;
    if (protocol.isHeadError(e)) {
      Metrics.bump(this.#ctx.metrics.helloErrors, e.kind);
      log.info(`bad ${protocol.headName} from ${client}: ${e.kind}: ${e.message}`);
      this.#finishEarly("bad_client_hello", e);
      this.#ctx.onBadHello?.(this.#client.remoteAddr.hostname);
      return;
    }
    throw e;
  }

  /**
   * Takes the real client from a trusted load balancer's PROXY header and applies the ACL to
   * it. Returns false (connection closed, acl_denied) when the ACL refuses it.
   */
  #acceptProxyHeader(h: ReceivedProxyHeader): boolean {
    if (!h.source || !h.destination) return true; // LOCAL: the balancer's own check
    const via = this.#record.client;
    this.#clientNet = h.source;
    this.#serverNet = h.destination;
    this.#record.client = formatAddr(h.source);
    log.debug(`${via}: PROXY header says client ${this.#record.client}`);
    if (this.#ctx.table.acl.permits(h.source.hostname)) return true;
    log.info(`${this.#record.client} (via ${via}) denied by acl`);
    this.#finishEarly("acl_denied", null);
    return false;
  }

  /** Ends the session before routing (bad or missing hello). */
  #finishEarly(reason: CloseReason, error: unknown): void {
    this.#error = error;
    this.#end(reason);
  }

  /**
   * Tells the client no, as its protocol says `refusal`, and ends its side; its socket is then
   * closed by a lingering close (src/conn/linger.ts), so bytes it sent that were never read do
   * not turn the close into a reset that discards the refusal. One send: a refusal (an alert, a
   * short HTTP response) fits in a new connection's send buffer; a client that is gone already
   * gets nothing.
   */
  #refuse(refusal: Refusal): void {
    const bytes = this.#ctx.protocol.refusals[refusal];
    if (this.#client.send(bytes) !== bytes.length) return;
    this.#refused = this.#client.shutdownWrite() === 0;
  }

  /** Connects a backend of `pool` (in kernel mode with the handoff ready for the pair). */
  #connectBackend(name: string | null, pool: BackendPool): void {
    const { table, metrics, resolver, guard, fds } = this.#ctx;
    const record = this.#record;
    const handoff = kernelHandoff(this.#client, {
      path: this.#ctx.path,
      ebpf: table.config.ebpf,
      metrics,
      clientAddr: record.client,
      idleMs: table.config.timeouts.idleMs,
    });
    this.#handoff = handoff;
    record.kernel = handoff;
    this.#dial = dialBackend(pool, {
      name,
      clientIp: this.#clientNet.hostname,
      clientAddr: record.client,
      connectMs: table.config.timeouts.connectMs,
      resolver,
      guard,
      metrics,
      fds,
      onTry: (backend, configured) => {
        record.backend = backend;
        record.backendLabel = configured;
      },
    }, (r) => this.#guarded(() => this.#dialled(pool, r)));
    this.#dial.start();
  }

  /** The dial ended: the pair starts relaying, or the client is told why not. */
  #dialled(pool: BackendPool, dialled: DialResult): void {
    this.#dial = null;
    this.#error = dialled.kind === "connected" ? null : dialled.error;
    if (dialled.kind === "stopped") {
      this.#end(this.#stopReason ?? "shutdown");
      return;
    }
    if (dialled.kind === "failed") {
      if (dialled.refusal) this.#refuse(dialled.refusal);
      this.#end(dialled.reason);
      return;
    }
    this.#backendConn = dialled.conn;
    this.#backend = dialled.backend;
    this.#record.connectSeconds = dialled.seconds;
    this.#record.state = "relaying";
    this.#startRelay(pool);
  }

  /** Forwards what the client sent so far, then relays until both sides are done. */
  #startRelay(pool: BackendPool): void {
    const backend = this.#backendConn!;
    // pair before forwarding the hello: the backend answers nothing until it has the hello
    // and a TLS client sends nothing more until it has the answer, so no byte can pass the
    // kernel path ahead of one still in userspace
    const pending = this.#pending!;
    const server = this.#serverNet ?? this.#client.localAddr;
    const first = pool.proxyProtocol
      ? concat(
        proxyHeaderFor(pool, this.#clientNet, server, this.#record, this.#routeAlpn),
        pending,
      )
      : pending;
    // a sockmap relay writes the hello itself
    const handed = this.#handoff?.handOff(backend, {
      first,
      clientBytes: pending.length,
      hello: this.#hello,
    }) ?? null;
    if (handed) {
      this.#relayWith(handed, pool);
      return;
    }
    const ms = this.#ctx.table.config.timeouts.connectMs;
    this.#firstWrite = writeFirst(backend, first, ms, (end) => {
      this.#firstWrite = null;
      this.#guarded(() => this.#firstWritten(pool, end));
    });
  }

  /**
   * The hello is written: the relay starts. A backend that reset or closed before its hello
   * (e.g. overloaded) ends like a reset in the relay, not as an error: the client is reset. One
   * that took no more of it within connect_ms is the backend's failure (logged, counted, its
   * passive health told): the client is told the backend timed out.
   */
  #firstWritten(pool: BackendPool, end: FirstWriteEnd): void {
    if (end.kind === "written") {
      const idleMs = this.#ctx.table.config.timeouts.idleMs;
      const bulk = this.#handoff?.bulk ?? null; // pipe mode: splice(2) takes a bulk pair over
      this.#relayWith(new Relay(this.#client, this.#backendConn!, idleMs, bulk), pool);
      return;
    }
    if (end.kind === "failed") {
      this.#error = end.error;
      this.#client.reset();
      this.#end("backend_reset");
      return;
    }
    this.#error = this.#backendStalled(pool, { written: end.written, total: end.total });
    this.#backendConn!.reset();
    this.#refuse("timed_out");
    this.#end("backend_timeout");
  }

  /** Reports the backend, which did not take the hello in time (see backendStalled). */
  #backendStalled(pool: BackendPool, taken: StalledBackend["taken"]): Error {
    const { metrics, table: { config } } = this.#ctx;
    const [backend, record, ms] = [this.#backend!, this.#record, config.timeouts.connectMs];
    return backendStalled({ pool, backend, record, taken, ms, metrics });
  }

  /**
   * The hello is with the backend, or with a sockmap relay that writes it (within connect_ms, else
   * the relay is cut as the backend's failure): `relay` moves the rest until both sides are done.
   */
  #relayWith(relay: ByteRelay, pool: BackendPool): void {
    this.#record.helloBytes = this.#pending!.length;
    this.#pending = null;
    this.#relay = relay;
    this.#record.relay = relay;
    // stopped while the hello was written: the relay ends as stop() would have ended it
    if (this.#stopReason) relay.stop(this.#stopReason as RelayEnd);
    relay.run((reason) => this.#guarded(() => this.#end(reason)));
    const ms = this.#ctx.table.config.timeouts.connectMs; // after run(), which writes at once
    this.#firstDue = boundFirstWrite(relay, ms, () =>
      this.#guarded(() => {
        this.#error = this.#backendStalled(pool, null);
        relay.stop("backend_timeout");
      }));
  }
}
