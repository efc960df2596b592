/**
 * What is known of one connection, filled in by its session as it learns it (the name, the
 * route, the backend, the relay), and what it becomes: the admin API's view while it lives, and
 * the metrics and the access-log line at its end.
 *
 * A record lives as long as its connection (hours for an idle one, tens of thousands at a time),
 * so it keeps only what its end needs: once the relay starts, of the parsed ClientHello only the
 * ALPN list and the fingerprints, and those only when an access log is written.
 *
 * @module
 */
import type { ClientHello } from "../proto/clienthello.ts";
import type { Fingerprints } from "../proto/fingerprint.ts";
import { accessLogEnabled, writeAccess } from "../ops/log.ts";
import { Metrics, NO_ROUTE } from "../ops/metrics.ts";
import { errText } from "../ops/errtext.ts";
import type { ByteRelay, RelayEnd } from "./relay.ts";

/** Why a session ended, as written to the access log. */
export type CloseReason =
  | RelayEnd
  | "client_hello_timeout"
  | "bad_client_hello"
  | "no_route"
  | "connect_failed"
  | "no_backend"
  | "address_denied"
  | "resource_exhausted"
  | "bad_proxy_header"
  | "acl_denied"
  | "fingerprint_denied"
  | "backend_full"
  | "source_connections"
  | "source_rate"
  | "admin";

/** One live session as the admin API lists it. */
export interface SessionInfo {
  /** Where the connection is in its life (see {@link ConnState}). */
  state: ConnState;
  client: string;
  listener: string;
  table: string;
  sni: string | null;
  /** The route's `match`, `default_backend`, or null while not routed yet. */
  route: string | null;
  /** As dialled (a `$sni` backend by the requested name), or null while not connected. */
  backend: string | null;
  /** As configured (`$sni:443`): what drain / disable name. */
  backend_config: string | null;
  age_ms: number;
  /** Bytes so far (in `ebpf.splice_mode` "sockmap" the kernel's are counted at the end only). */
  bytes_up: number;
  bytes_down: number;
  mode: "userspace" | "kernel";
}

/**
 * The states of a connection, in order: reading the hello (or HTTP head) -> routing by its name
 * -> connecting a backend -> relaying both ways -> draining (one side has ended, the other still
 * sends) -> closed. A QUIC flow is `hello` until its ClientHello is complete, then `relaying`.
 */
export type ConnState = "hello" | "routing" | "connecting" | "relaying" | "draining" | "closed";

/** Bytes of each direction: `up` client -> backend, `down` backend -> client. */
export interface ByteCounts {
  up: number;
  down: number;
}

/** What the record reads of a connection's kernel-mode part (src/conn/kernel_handoff.ts). */
export interface KernelPart {
  /** "kernel" once the kernel relays the pair. */
  readonly mode: "userspace" | "kernel";
  /** Bytes the kernel redirected each way (known once the pairing is removed). */
  readonly kernelBytes: ByteCounts;
  /** Bytes known not delivered when a stalled drain cut the connection. */
  readonly undelivered: ByteCounts;
}

/** One connection's facts, as far as they are known. */
export class ConnRecord {
  /**
   * performance.now() at accept: the age, the duration, the hello and connect seconds (the
   * wall clock at accept is `performance.timeOrigin` plus it).
   */
  readonly #t0 = performance.now();
  /** The listener's bound address, e.g. `127.0.0.1:8443`. */
  readonly listener: string;
  /** The routing table's name. */
  readonly table: string;
  /** The client, as logged: the socket's peer, or the one a trusted PROXY header names. */
  client: string;
  /** The requested name (SNI or Host), once read. */
  sni: string | null = null;
  /**
   * The parsed ClientHello (TLS listeners only), for routing; null again once the relay started
   * (see {@link relay}).
   */
  hello: ClientHello | null = null;
  /** What the access-log line takes of the hello, kept once the relay started. */
  #alpn: readonly string[] | null = null;
  #fingerprints: Fingerprints | null = null;
  /** Seconds from accept until the hello was read, and that the backend connect took. */
  helloSeconds: number | null = null;
  connectSeconds: number | null = null;
  /** The route taken: its pool's name, `default_backend`, or null. */
  route: string | null = null;
  /** The backend for the access log: a dynamic one by the name it was dialled by. */
  backend: string | null = null;
  /** The backend for the metrics: as configured (`$sni:443`), so the label set stays bounded. */
  backendLabel: string | null = null;
  /** The id sent to the backend in a PROXY v2 UNIQUE_ID TLV, also logged; null when none. */
  connId: string | null = null;
  /** Bytes of the hello (or HTTP head) forwarded to the backend before the relay started. */
  helloBytes = 0;
  #relay: ByteRelay | null = null;
  /** Where the connection is (the session moves it on; relaying becomes draining by itself). */
  state: ConnState = "hello";
  /** Kernel mode's part, when the proxy runs in kernel mode. */
  kernel: KernelPart | null = null;

  constructor(options: { client: string; listener: string; table: string }) {
    this.client = options.client;
    this.listener = options.listener;
    this.table = options.table;
  }

  /** The relay, once started. */
  get relay(): ByteRelay | null {
    return this.#relay;
  }

  /**
   * Sets the relay: routing is over, so the hello goes, but for what the access-log line takes
   * of it when an access log is written.
   */
  set relay(relay: ByteRelay | null) {
    this.#relay = relay;
    const hello = this.hello;
    if (relay === null || hello === null) return;
    this.hello = null;
    if (!accessLogEnabled()) return;
    // an exact-size copy: the parser's array has room for more
    this.#alpn = hello.alpn.slice();
    this.#fingerprints = hello.fingerprints ?? null;
  }

  /** Notes that the hello (or HTTP head) is read now. */
  noteHelloRead(): void {
    this.helloSeconds = (performance.now() - this.#t0) / 1000;
  }

  /** "kernel" when the kernel relays the pair. */
  get mode(): "userspace" | "kernel" {
    return this.kernel?.mode ?? "userspace";
  }

  /** What the admin API shows of this connection. */
  info(): SessionInfo {
    return {
      state: this.state === "relaying" && this.relay?.halfClosed ? "draining" : this.state,
      client: this.client,
      listener: this.listener,
      table: this.table,
      sni: this.sni,
      route: this.route,
      backend: this.backend,
      backend_config: this.backendLabel,
      age_ms: Math.round(performance.now() - this.#t0),
      bytes_up: this.helloBytes + (this.relay?.bytesUp ?? 0),
      bytes_down: this.relay?.bytesDown ?? 0,
      mode: this.mode,
    };
  }

  /**
   * Counts the ended connection in `m` and writes its access-log line (`error`: what ended it,
   * asked for only when the line is written).
   */
  finish(m: Metrics, reason: CloseReason, error: () => unknown): void {
    const relay = this.#relay;
    const kernelBytes = this.kernel?.kernelBytes ?? { up: 0, down: 0 };
    const up = this.helloBytes + (relay?.bytesUp ?? 0) + kernelBytes.up;
    const down = (relay?.bytesDown ?? 0) + kernelBytes.down;
    m.bytesUp += up;
    m.bytesDown += down;
    m.bytesUserspace += up + down - kernelBytes.up - kernelBytes.down;
    if (this.route) Metrics.bump(m.byRoute, this.route);
    if (this.backendLabel) Metrics.bump(m.byBackend, this.backendLabel);
    const mode = this.mode;
    if (relay) Metrics.bump(m.byMode, mode);
    Metrics.bump(m.closed, reason);
    const route = this.route ?? NO_ROUTE;
    if (this.helloSeconds !== null) m.helloSeconds.observe(route, this.helloSeconds);
    if (this.connectSeconds !== null) m.connectSeconds.observe(route, this.connectSeconds);
    m.durationSeconds.observe(route, (performance.now() - this.#t0) / 1000);
    m.bytesUpHistogram.observe(route, up);
    m.bytesDownHistogram.observe(route, down);
    if (accessLogEnabled()) {
      this.#writeAccess(reason, reason === "done" ? null : error(), up, down, mode);
    }
  }

  /** The connection's access-log line. */
  #writeAccess(
    reason: CloseReason,
    error: unknown,
    up: number,
    down: number,
    mode: "userspace" | "kernel",
  ): void {
    const undelivered = this.kernel?.undelivered;
    // the relay never started: the hello is still here
    const alpn = this.hello?.alpn ?? this.#alpn;
    const fingerprints = this.hello?.fingerprints ?? this.#fingerprints;
    writeAccess({
      time: new Date().toISOString(),
      client: this.client,
      listener: this.listener,
      sni: this.sni,
      ...(alpn ? { alpn: alpn as string[] } : {}),
      ...(fingerprints ?? {}),
      route: this.route,
      backend: this.backend,
      ...(this.connId ? { conn_id: this.connId } : {}),
      bytes_up: up,
      bytes_down: down,
      duration_ms: Math.round(performance.now() - this.#t0),
      close_reason: reason,
      mode,
      ...(undelivered && (undelivered.up || undelivered.down) ? { undelivered } : {}),
      ...(error ? { error: errText(error) } : {}),
    });
  }
}
