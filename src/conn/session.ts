/**
 * One client connection's life: read the ClientHello (or HTTP head) → route by name → connect
 * the backend → forward the bytes read so far → relay until both sides are done → access log.
 *
 * @module
 */
import { BackendPool } from "../route/backend.ts";
import { concat, writeAll } from "../net/bytes.ts";
import { formatAddr } from "../net/addr.ts";
import { errText } from "../ops/errtext.ts";
import type { Backend } from "../route/backend.ts";
import type { ClientHello } from "../proto/clienthello.ts";
import type { Protocol, Refusal } from "../proto/protocol.ts";
import type { FingerprintPatterns } from "../proto/fingerprint.ts";
import {
  AddressDeniedError,
  type DeniedAddress,
  type DialGuard,
  type InternalPolicy,
} from "../route/dialguard.ts";
import { type FdBudget, localResourceError, localResourceHint } from "./fdbudget.ts";
import type { KernelAccel } from "../ebpf/sockmap.ts";
import { BurstLog, logger, writeAccess } from "../ops/log.ts";
import { Metrics, NO_ROUTE } from "../ops/metrics.ts";
import { type ByteRelay, closeQuietly, Relay, type RelayEnd } from "./relay.ts";
import type { PipePool } from "./piped.ts";
import {
  parseProxyHeader,
  proxyHeader,
  ProxyHeaderError,
  type ProxyTlv,
  type ProxyTlvValues,
  type ReceivedProxyHeader,
} from "../proto/proxyproto.ts";
import { resolveHost } from "../dns/resolver.ts";
import type { RoutingTable } from "../route/table.ts";
import type { CloseReason, SessionInfo } from "./conn_record.ts";
import { type KernelHandoff, kernelHandoff } from "./kernel_handoff.ts";

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
  /** The eBPF fast path, when it is on; null: userspace mode. */
  kernel: KernelAccel | null;
  /** Kernel mode with splice(2) (`ebpf.splice_mode` "pipe"): the pipes; null otherwise. */
  pipes: PipePool | null;
  /** Which resolved backend addresses may be dialled. */
  guard: DialGuard;
  /** The process's descriptor budget (told about backend sockets), or null when unknown. */
  fds: FdBudget | null;
  /** Told when the client sent a bad ClientHello / HTTP head (an XDP block offence), or null. */
  onBadHello?: (() => void) | null;
}

class Stopped extends Error {}

/** This process's part of every connection id: random, so ids stay unique across restarts. */
const connIdPrefix = Array.from(
  crypto.getRandomValues(new Uint8Array(6)),
  (b) => b.toString(16).padStart(2, "0"),
).join("");
let connIds = 0;

/** One accepted client connection. */
export class Session {
  readonly #client: Deno.TcpConn;
  readonly #ctx: SessionContext;
  readonly #started = Date.now();
  /** performance.now() at accept, and the seconds the hello and the backend connect took. */
  readonly #t0 = performance.now();
  #helloSeconds: number | null = null;
  #connectSeconds: number | null = null;
  #clientAddr: string;
  /** The client and the address it connected to: the socket's, or a trusted PROXY header's. */
  #clientNet: Deno.NetAddr;
  #serverNet: Deno.NetAddr;
  #backendConn: Deno.TcpConn | null = null;
  #relay: ByteRelay | null = null;
  #stopReason: CloseReason | null = null;
  #connectAbort = new AbortController();
  #sni: string | null = null;
  /** The parsed ClientHello (TLS listeners only). */
  #hello: ClientHello | null = null;
  /** Kernel mode's part, made once the client is known; null in userspace mode. */
  #handoff: KernelHandoff | null = null;
  #route: string | null = null;
  /** The ALPN protocols of the route taken (null: a route without `alpn`). */
  #routeAlpn: readonly string[] | null = null;
  /** The id sent to the backend in a PROXY v2 UNIQUE_ID TLV, also logged; null when none. */
  #connId: string | null = null;
  /** The backend for the access log: a dynamic one by the name it was dialled by. */
  #backend: string | null = null;
  /** The backend for the metrics: as configured (`$sni:443`), so the label set stays bounded. */
  #backendLabel: string | null = null;
  /** Bytes of the hello (or HTTP head) forwarded to the backend before the relay started. */
  #helloBytes = 0;
  #earlyError: unknown = null;

  constructor(client: Deno.TcpConn, ctx: SessionContext) {
    this.#client = client;
    this.#ctx = ctx;
    this.#clientAddr = formatAddr(client.remoteAddr);
    this.#clientNet = client.remoteAddr as Deno.NetAddr;
    this.#serverNet = client.localAddr as Deno.NetAddr;
  }

  /** Serves the connection to its end. Never throws. */
  async run(): Promise<void> {
    const m = this.#ctx.metrics;
    let reason: CloseReason = "error";
    let error: unknown = null;
    let picked: Backend | null = null;
    try {
      const name = await this.#readName();
      if (name === undefined) {
        reason = this.#stopReason!;
        error = this.#earlyError;
        return;
      }
      if (this.#fingerprintDenied(this.#ctx.table.config.acl.denyFingerprints, "acl")) {
        reason = "fingerprint_denied";
        await this.#refuse("forbidden");
        return;
      }
      const pool = this.#route_(name);
      if (!pool) {
        reason = "no_route";
        await this.#refuse("misdirected");
        return;
      }
      if (this.#fingerprintDenied(pool.denyFingerprints, `route "${pool.name}"`)) {
        reason = "fingerprint_denied";
        await this.#refuse("forbidden");
        return;
      }
      this.#handoff = kernelHandoff(this.#client, {
        kernel: this.#ctx.kernel,
        pipes: this.#ctx.pipes,
        ebpf: this.#ctx.table.config.ebpf,
        metrics: m,
        clientAddr: this.#clientAddr,
        idleMs: this.#ctx.table.config.timeouts.idleMs,
      });
      // try backends until one connects: a failed one is marked (passive health) and skipped
      const clientIp = this.#clientNet.hostname;
      const tried = new Set<Backend>();
      while (!this.#backendConn) {
        const b = pool.pick(clientIp, tried);
        if (!b) {
          if (pool.allFull(tried)) {
            reason = "backend_full";
            bursts.warn(
              `full:${pool.name}`,
              `every backend of route "${pool.name}" that is up is at its max_connections: ` +
                `refusing ${this.#clientAddr}`,
            );
            await this.#refuse("unavailable");
          } else if (tried.size === 0) {
            reason = "no_backend";
            log.warn(`all backends of route "${pool.name}" are down: refusing ${this.#clientAddr}`);
            await this.#refuse("unavailable");
          } else if (error instanceof AddressDeniedError) {
            reason = "address_denied";
            await this.#refuse("misdirected");
          } else reason = "connect_failed";
          return;
        }
        tried.add(b);
        picked = b;
        b.active++;
        const host = b.address.dynamic ? name! : b.address.host;
        this.#backend = b.address.dynamic ? `${host}:${b.address.port}` : b.address.text;
        this.#backendLabel = b.address.text;
        try {
          const policy = b.address.dynamic ? pool.internal : null;
          const t = performance.now();
          this.#backendConn = await this.#connect(host, b.address.port, policy);
          this.#connectSeconds = (performance.now() - t) / 1000;
          this.#ctx.fds?.backendOpened();
          pool.connected(b);
        } catch (e) {
          if (this.#stopReason) throw new Stopped();
          b.active--;
          picked = null;
          error = e;
          if (e instanceof AddressDeniedError) {
            // not the backend's failure: its health is untouched; the next backend may do
            this.#logDenied(pool, e.denied[0]);
            continue;
          }
          const lacking = localResourceError(e);
          if (lacking) {
            // this host is out of descriptors, ports or memory: no backend is to blame
            reason = "resource_exhausted";
            Metrics.bump(m.localErrors, `connect:${lacking}`);
            bursts.warn(
              `local:${lacking}`,
              `connect to ${this.#backend} for ${this.#clientAddr} failed for lack of a local ` +
                `resource (${errText(e)}); the backend is not marked down. ` +
                localResourceHint(lacking),
            );
            await this.#refuse("unavailable");
            return;
          }
          m.connectFailures++;
          log.warn(`connect to ${this.#backend} failed for ${this.#clientAddr}: ${errText(e)}`);
          if (!b.address.dynamic) pool.connectFailed(b, errText(e));
        }
      }
      error = null;
      const backend = this.#backendConn;
      backend.setNoDelay(true);
      this.#client.setNoDelay(true);
      // pair before forwarding the hello: the backend answers nothing until it has the hello
      // and a TLS client sends nothing more until it has the answer, so no byte can pass the
      // kernel path ahead of one still in userspace
      const pending = this.#pending!;
      let first = pending;
      if (pool.proxyProtocol) {
        const header = proxyHeader(
          pool.proxyProtocol,
          this.#clientNet,
          this.#serverNet,
          pool.proxyTlvs.length ? this.#tlvValues(pool.proxyTlvs) : undefined,
        );
        first = concat(header, first);
      }
      const idleMs = this.#ctx.table.config.timeouts.idleMs;
      // a kernel relay writes the hello itself: its sockets are out of Deno's hands
      const handoff = this.#handoff;
      const kernelRelay =
        handoff?.handOff(backend, { first, clientBytes: pending.length, hello: this.#hello }) ??
          null;
      if (!kernelRelay) await writeAll(backend, first);
      this.#helloBytes = pending.length;
      this.#pending = null;
      const relay = kernelRelay ??
        new Relay(this.#client, backend, idleMs, handoff?.hooks, this.#readBuffer);
      this.#readBuffer = undefined;
      this.#relay = relay;
      if (this.#stopReason) relay.stop("shutdown");
      reason = await relay.run();
      error = relay.error;
    } catch (e) {
      if (e instanceof Stopped || this.#stopReason) {
        reason = this.#stopReason ?? "shutdown";
      } else {
        reason = "error";
        error = e;
        log.warn(`session ${this.#clientAddr}: ${errText(e)}`);
      }
    } finally {
      if (picked) picked.active--;
      this.#handoff?.release();
      closeQuietly(this.#client);
      if (this.#backendConn) {
        closeQuietly(this.#backendConn);
        this.#ctx.fds?.backendClosed();
      }
      this.#finish(reason, error);
    }
  }

  /** What the admin API shows of this session. */
  info(): SessionInfo {
    return {
      client: this.#clientAddr,
      listener: this.#ctx.listener,
      table: this.#ctx.table.name,
      sni: this.#sni,
      route: this.#route,
      backend: this.#backend,
      backend_config: this.#backendLabel,
      age_ms: Date.now() - this.#started,
      bytes_up: this.#helloBytes + (this.#relay?.bytesUp ?? 0),
      bytes_down: this.#relay?.bytesDown ?? 0,
      mode: this.#handoff?.mode ?? "userspace",
    };
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

  /** The buffer the hello was read into; the relay reads the client with it afterwards. */
  #readBuffer: Uint8Array | undefined;

  /** Bytes read from the client before the backend was connected; forwarded as-is. */
  #pending: Uint8Array | null = null;

  /**
   * Reads until the parser has the name. Returns the name (null: client sent none), or
   * undefined after closing a connection that sent a bad or no hello in time.
   */
  async #readName(): Promise<string | null | undefined> {
    const { clientHelloMs } = this.#ctx.table.config.timeouts;
    const max = this.#ctx.table.config.limits.maxClientHelloBytes;
    const parser = this.#ctx.protocol.parser({
      maxBytes: max,
      fingerprint: this.#ctx.table.fingerprints,
    });
    const timer = setTimeout(() => this.stop("client_hello_timeout"), clientHelloMs);
    let header: Uint8Array | null = this.#ctx.trustedProxy ? new Uint8Array(0) : null;
    const buf = new Uint8Array(2048);
    this.#readBuffer = buf;
    try {
      for (;;) {
        let n: number | null;
        try {
          n = await this.#client.read(buf);
        } catch (e) {
          if (this.#stopReason) throw new Stopped();
          this.#finishEarly("client_reset", e);
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
        const result = chunk === null ? parser.end() : parser.push(chunk);
        if (result) {
          // a view, not a copy: the parser is not fed again
          this.#pending = parser.data;
          this.#helloSeconds = (performance.now() - this.#t0) / 1000;
          this.#sni = result.serverName;
          this.#hello = this.#ctx.protocol.hello(result);
          return result.serverName;
        }
      }
    } catch (e) {
      if (e instanceof Stopped || this.#stopReason) throw new Stopped();
      if (e instanceof ProxyHeaderError) {
        log.warn(`bad PROXY header from trusted ${this.#clientAddr}: ${e.message}`);
        this.#finishEarly("bad_proxy_header", e);
        return undefined;
      }
      if (this.#ctx.protocol.isHeadError(e)) {
        Metrics.bump(this.#ctx.metrics.helloErrors, e.kind);
        log.info(
          `bad ${this.#ctx.protocol.headName} from ${this.#clientAddr}: ${e.kind}: ${e.message}`,
        );
        this.#finishEarly("bad_client_hello", e);
        this.#ctx.onBadHello?.();
        return undefined;
      }
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * Takes the real client from a trusted load balancer's PROXY header and applies the ACL to
   * it. Returns false (connection closed, acl_denied) when the ACL refuses it.
   */
  #acceptProxyHeader(h: ReceivedProxyHeader): boolean {
    if (!h.source || !h.destination) return true; // LOCAL: the balancer's own check
    const via = this.#clientAddr;
    this.#clientNet = h.source;
    this.#serverNet = h.destination;
    this.#clientAddr = formatAddr(h.source);
    log.debug(`${via}: PROXY header says client ${this.#clientAddr}`);
    if (this.#ctx.table.acl.permits(h.source.hostname)) return true;
    log.info(`${this.#clientAddr} (via ${via}) denied by acl`);
    this.#finishEarly("acl_denied", null);
    return false;
  }

  /** Picks the pool for `name`, or null when the connection must be refused. */
  #route_(name: string | null): BackendPool | null {
    const { router, defaultPool } = this.#ctx.table;
    const found = router.lookup(name, this.#hello?.alpn);
    if (found.kind === "route") {
      this.#route = found.route.target.name;
      this.#routeAlpn = found.route.alpn;
      return found.route.target;
    }
    if (found.kind === "not_allowed") {
      log.info(
        `${this.#clientAddr}: name "${name}" matches route "${found.route.pattern.text}" but not its allow list`,
      );
      return null;
    }
    if (defaultPool) {
      this.#route = "default_backend";
      return defaultPool;
    }
    log.info(
      `${this.#clientAddr}: no route for ${name === null ? "a hello without SNI" : `"${name}"`}`,
    );
    return null;
  }

  /**
   * The values of the PROXY v2 TLVs `tlvs`: the requested name, the application protocol (the
   * proxy does not see the server's choice: for a route with `alpn` the client's first offer
   * the route lists, else the client's first offer) and a new connection id.
   */
  #tlvValues(tlvs: readonly ProxyTlv[]): ProxyTlvValues {
    const offered = this.#hello?.alpn ?? [];
    const routeAlpn = this.#routeAlpn;
    if (tlvs.includes("unique_id")) this.#connId = `${connIdPrefix}-${(++connIds).toString(36)}`;
    return {
      authority: tlvs.includes("authority") ? this.#sni : null,
      alpn: tlvs.includes("alpn")
        ? (routeAlpn ? offered.find((p) => routeAlpn.includes(p)) : offered[0]) ?? null
        : null,
      uniqueId: this.#connId,
    };
  }

  /** Logs, once per burst of its route and kind, that a backend address was refused. */
  #logDenied(pool: BackendPool, first: DeniedAddress): void {
    const { address, kind } = first;
    const policy = pool.internal;
    const why = kind === "own_listener"
      ? "is one of this proxy's own listening sockets (a loop)"
      : `is a ${kind.replace("_", "-")} address` + (policy
        ? `, which the route does not allow (set ${policy.path}.allow_private, or list the ` +
          `address in ${policy.path}.allow_addresses, to allow it)`
        : "");
    bursts.warn(
      `denied:${pool.name}:${kind}`,
      `route "${pool.name}": refusing ${this.#backend} for ${this.#clientAddr}: ${address} ${why}`,
    );
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
      `${by}: refusing ${this.#clientAddr}: its TLS fingerprint matches "${hit}" ` +
        `(ja4 ${fp!.ja4}, ja3 ${fp!.ja3})`,
    );
    return true;
  }

  /** Tells the client no, as its protocol says `refusal`, and ends its side. */
  async #refuse(refusal: Refusal): Promise<void> {
    try {
      await writeAll(this.#client, this.#ctx.protocol.refusals[refusal]);
      await this.#client.closeWrite();
    } catch {
      // the client is gone already
    }
  }

  /**
   * Connects to `host:port`, trying each resolved address the guard allows within one
   * connect_ms budget. `policy`: the route's opt-in to internal addresses, for a dynamic backend.
   * @throws {AddressDeniedError} when the guard allows none of them.
   */
  async #connect(
    host: string,
    port: number,
    policy: InternalPolicy | null,
  ): Promise<Deno.TcpConn> {
    const connectMs = this.#ctx.table.config.timeouts.connectMs;
    // one controller per attempt, aborted by its deadline or by the session's stop; the timer
    // is cleared once connected so no per-connection timer outlives the connect, and a timed-out
    // attempt leaves the next backend's attempt unaborted
    const abort = new AbortController();
    const onStop = () => abort.abort();
    this.#connectAbort.signal.addEventListener("abort", onStop, { once: true });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      abort.abort();
    }, connectMs);
    try {
      const addresses = this.#dialable(
        host,
        port,
        await abortable(resolveHost(host), abort.signal),
        policy,
      );
      let lastError: unknown = null;
      for (const hostname of addresses) {
        if (abort.signal.aborted) break;
        try {
          this.#handoff?.beforeConnect();
          // no signal for Deno.connect itself: its cancel handle cost about a tenth of a new
          // connection's CPU (profile in README); a connect given up on is closed when it lands
          const connecting = Deno.connect({ hostname, port });
          try {
            return await abortable(connecting, abort.signal);
          } catch (e) {
            if (abort.signal.aborted) connecting.then((c) => c.close(), () => {});
            throw e;
          }
        } catch (e) {
          lastError = e;
        }
      }
      throw lastError ?? new Error("connect aborted");
    } catch (e) {
      if (timedOut) throw new Error(`timed out after ${connectMs} ms`);
      throw e;
    } finally {
      clearTimeout(timer);
      this.#connectAbort.signal.removeEventListener("abort", onStop);
    }
  }

  /** The addresses of `host` the guard lets this session dial; each refused one is counted. */
  #dialable(
    host: string,
    port: number,
    addresses: string[],
    policy: InternalPolicy | null,
  ): string[] {
    const guard = this.#ctx.guard;
    const denied: DeniedAddress[] = [];
    const allowed = addresses.filter((address) => {
      const kind = guard.check(address, port, policy);
      if (kind === null) return true;
      denied.push({ address, kind });
      Metrics.bump(this.#ctx.metrics.addressDenied, kind);
      return false;
    });
    if (denied.length === 0) return allowed;
    if (allowed.length === 0) throw new AddressDeniedError(host, port, denied);
    const skipped = denied.map((d) => `${d.address} (${d.kind})`).join(", ");
    log.debug(`${this.#clientAddr}: ${host}: not dialling ${skipped}`);
    return allowed;
  }

  /** Ends the session before routing (bad or missing hello); run() reports it. */
  #finishEarly(reason: CloseReason, error: unknown): void {
    this.#stopReason ??= reason;
    this.#earlyError = error;
    closeQuietly(this.#client);
  }

  #finish(reason: CloseReason, error: unknown): void {
    const m = this.#ctx.metrics;
    const finalReason = this.#stopReason && reason === "error" ? this.#stopReason : reason;
    const relay = this.#relay;
    const kernelBytes = this.#handoff?.kernelBytes ?? { up: 0, down: 0 };
    const up = this.#helloBytes + (relay?.bytesUp ?? 0) + kernelBytes.up;
    const down = (relay?.bytesDown ?? 0) + kernelBytes.down;
    m.bytesUp += up;
    m.bytesDown += down;
    m.bytesUserspace += up + down - kernelBytes.up - kernelBytes.down;
    if (this.#route) Metrics.bump(m.byRoute, this.#route);
    if (this.#backendLabel) Metrics.bump(m.byBackend, this.#backendLabel);
    const mode = this.#handoff?.mode ?? "userspace";
    if (relay) Metrics.bump(m.byMode, mode);
    Metrics.bump(m.closed, finalReason);
    const route = this.#route ?? NO_ROUTE;
    const undelivered = this.#handoff?.undelivered;
    if (this.#helloSeconds !== null) m.helloSeconds.observe(route, this.#helloSeconds);
    if (this.#connectSeconds !== null) m.connectSeconds.observe(route, this.#connectSeconds);
    m.durationSeconds.observe(route, (performance.now() - this.#t0) / 1000);
    m.bytesUpHistogram.observe(route, up);
    m.bytesDownHistogram.observe(route, down);
    writeAccess({
      time: new Date().toISOString(),
      client: this.#clientAddr,
      listener: this.#ctx.listener,
      sni: this.#sni,
      ...(this.#hello ? { alpn: this.#hello.alpn } : {}),
      ...(this.#hello?.fingerprints ?? {}),
      route: this.#route,
      backend: this.#backend,
      ...(this.#connId ? { conn_id: this.#connId } : {}),
      bytes_up: up,
      bytes_down: down,
      duration_ms: Date.now() - this.#started,
      close_reason: finalReason,
      mode,
      ...(undelivered && (undelivered.up || undelivered.down) ? { undelivered } : {}),
      ...(error && finalReason !== "done" ? { error: errText(error) } : {}),
    });
    log.debug(`${this.#clientAddr} closed: ${finalReason}`);
  }
}

function abortable<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}
