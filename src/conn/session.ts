/**
 * One client connection's life, in steps: read the ClientHello (or HTTP head) → route by name →
 * connect a backend (src/conn/backend_dial.ts) → forward the bytes read so far → relay until
 * both sides are done (in kernel mode handed to the kernel: src/conn/kernel_handoff.ts) → access
 * log (src/conn/conn_record.ts). The connection is an explicit state machine: its record's
 * `state` goes hello → routing → connecting → relaying (→ draining once one side has ended) →
 * closed, and the admin API shows it. What differs between TLS and HTTP listeners is their
 * {@link Protocol} value.
 *
 * @module
 */
import type { Backend, BackendPool } from "../route/backend.ts";
import { concat } from "../net/bytes.ts";
import { E } from "../../ffi/socket.ts";
import { socketError, type TcpSocket, writeAll } from "../io/tcp.ts";
import { formatAddr } from "../net/addr.ts";
import type { ClientHello } from "../proto/clienthello.ts";
import type { FingerprintPatterns } from "../proto/fingerprint.ts";
import type { Head, Protocol, Refusal } from "../proto/protocol.ts";
import type { DialGuard } from "../route/dialguard.ts";
import type { FdBudget } from "./fdbudget.ts";
import { BurstLog, logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { errText } from "../ops/errtext.ts";
import { type ByteRelay, closeQuietly, Relay, type RelayEnd } from "./relay.ts";
import {
  parseProxyHeader,
  proxyHeader,
  ProxyHeaderError,
  type ProxyTlv,
  type ProxyTlvValues,
  type ReceivedProxyHeader,
} from "../proto/proxyproto.ts";
import type { HostResolver } from "../dns/resolver.ts";
import type { RoutingTable } from "../route/table.ts";
import { type CloseReason, ConnRecord, type SessionInfo } from "./conn_record.ts";
import { dialBackend } from "./backend_dial.ts";
import { type KernelHandoff, kernelHandoff, type RelayPath } from "./kernel_handoff.ts";

const log = logger("session");
/** Warnings that can come once per connection: logged once per burst. */
const bursts = new BurstLog(log);

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
  /** Told when the client sent a bad ClientHello / HTTP head (an XDP block offence), or null. */
  onBadHello?: (() => void) | null;
}

/**
 * What every session reads its hello into: the parser copies each read at once (before any
 * await), so one buffer serves them all and a new connection allocates none for it.
 */
const helloChunk = new Uint8Array(16 * 1024);

/** Thrown out of a step the session's stop() cut short; run() reports the stop's reason. */
class Stopped extends Error {}

/** This process's part of every connection id: random, so ids stay unique across restarts. */
const connIdPrefix = Array.from(
  crypto.getRandomValues(new Uint8Array(6)),
  (b) => b.toString(16).padStart(2, "0"),
).join("");
/** Connection ids made by this process so far (process-wide, so no two sessions share one). */
let connIds = 0;

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
  /** Bytes read from the client before the backend was connected; forwarded as-is. */
  #pending: Uint8Array | null = null;
  /** The ALPN protocols of the route taken (null: a route without `alpn`). */
  #routeAlpn: readonly string[] | null = null;
  /** Kernel mode's part, made once the client is known; null in userspace mode. */
  #handoff: KernelHandoff | null = null;
  #backendConn: TcpSocket | null = null;
  /** The backend connected to: this session is one of its `active` connections. */
  #backend: Backend | null = null;
  #relay: ByteRelay | null = null;
  #stopReason: CloseReason | null = null;
  #connectAbort = new AbortController();
  /** The error behind the end so far, for the access log. */
  #error: unknown = null;

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

  /** Serves the connection to its end. Never throws. */
  async run(): Promise<void> {
    let reason: CloseReason = "error";
    try {
      reason = await this.#steps();
    } catch (e) {
      if (e instanceof Stopped || this.#stopReason) {
        reason = this.#stopReason ?? "shutdown";
      } else {
        reason = "error";
        this.#error = e;
        log.warn(`session ${this.#record.client}: ${errText(e)}`);
      }
    } finally {
      if (this.#backend) this.#backend.active--;
      this.#handoff?.release();
      closeQuietly(this.#client);
      if (this.#backendConn) {
        closeQuietly(this.#backendConn);
        this.#ctx.fds?.backendClosed();
      }
      const final = this.#stopReason && reason === "error" ? this.#stopReason : reason;
      this.#record.state = "closed";
      this.#record.finish(this.#ctx.metrics, final, this.#error);
    }
  }

  /** What the admin API shows of this session. */
  info(): SessionInfo {
    return this.#record.info();
  }

  /** Ends the session now (drain deadline passed, or closed by the admin API). */
  stop(reason: CloseReason = "shutdown"): void {
    if (this.#stopReason) return;
    this.#stopReason = reason;
    if (this.#relay) {
      this.#relay.stop(reason as RelayEnd);
    } else {
      this.#connectAbort.abort();
      closeQuietly(this.#client);
    }
  }

  /** The connection's steps; returns why it ended (throws Stopped when stop() cut one short). */
  async #steps(): Promise<CloseReason> {
    const record = this.#record;
    const name = await this.#readName();
    if (name === undefined) return this.#stopReason!;
    record.state = "routing";
    const pool = await this.#route(name);
    if (typeof pool === "string") return pool;
    record.state = "connecting";
    const failed = await this.#connectBackend(name, pool);
    if (failed) return failed;
    record.state = "relaying";
    return await this.#relayPair(pool);
  }

  /** The parsed ClientHello (TLS listeners only). */
  get #hello(): ClientHello | null {
    return this.#record.hello;
  }

  /**
   * Reads until the parser has the name. Returns the name (null: client sent none), or
   * undefined after closing a connection that sent a bad or no hello in time.
   */
  async #readName(): Promise<string | null | undefined> {
    const { table, protocol } = this.#ctx;
    const { timeouts, limits } = table.config;
    const parser = protocol.parser({
      maxBytes: limits.maxClientHelloBytes,
      fingerprint: table.fingerprints,
    });
    const timer = setTimeout(() => this.stop("client_hello_timeout"), timeouts.clientHelloMs);
    let header: Uint8Array | null = this.#ctx.trustedProxy ? new Uint8Array(0) : null;
    const buf = helloChunk;
    try {
      for (;;) {
        const open = await this.#clientReadable();
        if (this.#stopReason) throw new Stopped();
        const n = open ? this.#readClient(buf) : socketError("recv", E.EBADF);
        if (n === 0) continue;
        if (typeof n !== "number" && n !== null) {
          this.#finishEarly("client_reset", n);
          return undefined;
        }
        let chunk: Uint8Array | null = n === null ? null : buf.subarray(0, n);
        if (header !== null) {
          if (chunk === null) {
            throw new ProxyHeaderError("connection ended inside the PROXY header");
          }
          header = concat(header, chunk);
          const h = parseProxyHeader(header);
          if (!h) continue;
          const rest: Uint8Array = header.subarray(h.headerBytes);
          header = null;
          if (!this.#acceptProxyHeader(h)) return undefined;
          if (rest.length === 0) continue;
          chunk = rest;
        }
        const head = chunk === null ? parser.end() : parser.push(chunk);
        // a view, not a copy: the parser is not fed again
        if (head) return this.#headRead(head, parser.data);
      }
    } catch (e) {
      return this.#headFailed(e);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Resolves once the client has input (true), or its socket was closed (false): a new
   * connection's hello comes after the accept, so epoll is waited for rather than a read tried.
   */
  async #clientReadable(): Promise<boolean> {
    const client = this.#client;
    while (!client.readable) {
      if ((await client.nextEvent()) === 0) return false;
    }
    return true;
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

  /** Notes the head read (`data`: every byte read so far); returns the name to route by. */
  #headRead(head: Head, data: Uint8Array): string | null {
    this.#pending = data;
    this.#record.noteHelloRead();
    this.#record.sni = head.serverName;
    this.#record.hello = this.#ctx.protocol.hello(head);
    return head.serverName;
  }

  /** Closes a connection whose head (or PROXY header) could not be read; rethrows the rest. */
  #headFailed(e: unknown): undefined {
    if (e instanceof Stopped || this.#stopReason) throw new Stopped();
    const client = this.#record.client;
    if (e instanceof ProxyHeaderError) {
      log.warn(`bad PROXY header from trusted ${client}: ${e.message}`);
      this.#finishEarly("bad_proxy_header", e);
      return undefined;
    }
    const protocol = this.#ctx.protocol;
    if (protocol.isHeadError(e)) {
      Metrics.bump(this.#ctx.metrics.helloErrors, e.kind);
      log.info(`bad ${protocol.headName} from ${client}: ${e.kind}: ${e.message}`);
      this.#finishEarly("bad_client_hello", e);
      this.#ctx.onBadHello?.();
      return undefined;
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

  /** Ends the session before routing (bad or missing hello); run() reports it. */
  #finishEarly(reason: CloseReason, error: unknown): void {
    this.#stopReason ??= reason;
    this.#error = error;
    closeQuietly(this.#client);
  }

  /**
   * The pool of the route `name` takes; when the client is refused (by its fingerprint, or no
   * route takes the name) it is told so and the reason is returned instead.
   */
  async #route(name: string | null): Promise<BackendPool | CloseReason> {
    if (this.#fingerprintDenied(this.#ctx.table.config.acl.denyFingerprints, "acl")) {
      await this.#refuse("forbidden");
      return "fingerprint_denied";
    }
    const pool = this.#poolFor(name);
    if (!pool) {
      await this.#refuse("misdirected");
      return "no_route";
    }
    if (this.#fingerprintDenied(pool.denyFingerprints, `route "${pool.name}"`)) {
      await this.#refuse("forbidden");
      return "fingerprint_denied";
    }
    return pool;
  }

  /** Picks the pool for `name`, or null when the connection must be refused. */
  #poolFor(name: string | null): BackendPool | null {
    const { router, defaultPool } = this.#ctx.table;
    const client = this.#record.client;
    const found = router.lookup(name, this.#hello?.alpn);
    if (found.kind === "route") {
      this.#record.route = found.route.target.name;
      this.#routeAlpn = found.route.alpn;
      return found.route.target;
    }
    if (found.kind === "not_allowed") {
      log.info(
        `${client}: name "${name}" matches route "${found.route.pattern.text}" but not its allow list`,
      );
      return null;
    }
    if (defaultPool) {
      this.#record.route = "default_backend";
      return defaultPool;
    }
    log.info(`${client}: no route for ${name === null ? "a hello without SNI" : `"${name}"`}`);
    return null;
  }

  /**
   * Whether `patterns` refuse this client's fingerprint (logged once per burst of `by`, which
   * names the ACL or the route).
   */
  #fingerprintDenied(patterns: FingerprintPatterns | null, by: string): boolean {
    const fp = this.#hello?.fingerprints;
    const hit = patterns && fp ? patterns.match(fp.ja4, fp.ja3) : null;
    if (hit === null) return false;
    bursts.warn(
      `fingerprint:${by}:${hit}`,
      `${by}: refusing ${this.#record.client}: its TLS fingerprint matches "${hit}" ` +
        `(ja4 ${fp!.ja4}, ja3 ${fp!.ja3})`,
    );
    return true;
  }

  /** Tells the client no, as its protocol says `refusal`, and ends its side. */
  async #refuse(refusal: Refusal): Promise<void> {
    try {
      await writeAll(this.#client, this.#ctx.protocol.refusals[refusal]);
      this.#client.shutdownWrite();
    } catch {
      // the client is gone already
    }
  }

  /**
   * Connects a backend of `pool` (in kernel mode with the handoff ready for the pair). Returns
   * null once connected, else why not (the client told so).
   */
  async #connectBackend(name: string | null, pool: BackendPool): Promise<CloseReason | null> {
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
    const dialled = await dialBackend(pool, {
      name,
      clientIp: this.#clientNet.hostname,
      clientAddr: record.client,
      connectMs: table.config.timeouts.connectMs,
      resolver,
      guard,
      metrics,
      fds,
      signal: this.#connectAbort.signal,
      onTry: (backend, configured) => {
        record.backend = backend;
        record.backendLabel = configured;
      },
    });
    this.#error = dialled.kind === "connected" ? null : dialled.error;
    if (dialled.kind === "stopped") throw new Stopped();
    if (dialled.kind === "failed") {
      if (dialled.refusal) await this.#refuse(dialled.refusal);
      return dialled.reason;
    }
    this.#backendConn = dialled.conn;
    this.#backend = dialled.backend;
    record.connectSeconds = dialled.seconds;
    return null;
  }

  /** Forwards what the client sent so far, then relays until both sides are done. */
  async #relayPair(pool: BackendPool): Promise<CloseReason> {
    const backend = this.#backendConn!;
    // pair before forwarding the hello: the backend answers nothing until it has the hello
    // and a TLS client sends nothing more until it has the answer, so no byte can pass the
    // kernel path ahead of one still in userspace
    const pending = this.#pending!;
    const first = pool.proxyProtocol ? concat(this.#proxyHeader(pool), pending) : pending;
    const idleMs = this.#ctx.table.config.timeouts.idleMs;
    // a kernel relay writes the hello itself
    const handed = this.#handoff?.handOff(backend, {
      first,
      clientBytes: pending.length,
      hello: this.#hello,
    }) ?? null;
    // a backend that reset or closed before its hello (e.g. overloaded; a sockmap pairing
    // then fails on it, as not established) ends like a reset in the relay, not as an error
    if (!handed && !(await this.#writeHello(backend, first))) return "backend_reset";
    this.#record.helloBytes = pending.length;
    this.#pending = null;
    const relay = handed ?? new Relay(this.#client, backend, idleMs);
    this.#relay = relay;
    this.#record.relay = relay;
    // stopped while the hello was written: the relay ends as stop() would have ended it
    if (this.#stopReason) relay.stop(this.#stopReason as RelayEnd);
    const reason = await relay.run();
    this.#error = relay.error;
    return reason;
  }

  /** Writes the hello to the backend; false (the client reset) when the backend refused it. */
  async #writeHello(backend: TcpSocket, first: Uint8Array): Promise<boolean> {
    try {
      await writeAll(backend, first);
      return true;
    } catch (e) {
      this.#error = e;
      this.#client.reset();
      return false;
    }
  }

  /** The PROXY protocol header `pool` sends its backends ahead of the client's bytes. */
  #proxyHeader(pool: BackendPool): Uint8Array {
    return proxyHeader(
      pool.proxyProtocol!,
      this.#clientNet,
      this.#serverNet ?? this.#client.localAddr,
      pool.proxyTlvs.length ? this.#tlvValues(pool.proxyTlvs) : undefined,
    );
  }

  /**
   * The values of the PROXY v2 TLVs `tlvs`: the requested name, the application protocol (the
   * proxy does not see the server's choice: for a route with `alpn` the client's first offer
   * the route lists, else the client's first offer) and a new connection id.
   */
  #tlvValues(tlvs: readonly ProxyTlv[]): ProxyTlvValues {
    const offered = this.#hello?.alpn ?? [];
    const routeAlpn = this.#routeAlpn;
    const record = this.#record;
    if (tlvs.includes("unique_id")) record.connId = `${connIdPrefix}-${(++connIds).toString(36)}`;
    return {
      authority: tlvs.includes("authority") ? record.sni : null,
      alpn: tlvs.includes("alpn")
        ? (routeAlpn ? offered.find((p) => routeAlpn.includes(p)) : offered[0]) ?? null
        : null,
      uniqueId: record.connId,
    };
  }
}
