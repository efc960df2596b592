/**
 * The proxy: its listeners, the current routing table, the live sessions, the connection
 * limit, reload and drain.
 *
 * @module
 */
import {
  type AdminRequest,
  type AdminResult,
  type AdminSession,
  type AdminTarget,
  applyLocal,
  applyUnblock,
  everyPool,
} from "../ops/admin.ts";
import { type Config, type ListenerConfig, reloadable, routeSummary } from "../config/mod.ts";
import { DialGuard, type OwnSocket } from "../route/dialguard.ts";
import { FdBudget } from "../conn/fdbudget.ts";
import { shedLingering } from "../conn/linger.ts";
import type { KernelAccel } from "../ebpf/sockmap.ts";
import { PipePool } from "../conn/piped.ts";
import { pathMode, type RelayPath, USERSPACE_PATH } from "../conn/kernel_handoff.ts";
import type { XdpFilter } from "../ebpf/xdp.ts";
import { Listener, type ListenerHost, warnIfListened } from "../conn/listener.ts";
import type { QuicListener } from "../conn/quic_listener.ts";
import type { QuicListenerHost } from "../conn/quic_end.ts";
import type { QuicKernelPath } from "../conn/quic_flow.ts";
import { logger } from "../ops/log.ts";
import { MemoryReleaser } from "../ops/memory.ts";
import { eventLoop } from "../io/loop.ts";
import { Metrics } from "../ops/metrics.ts";
import { DEFAULT_DNS_PIN_PATH, type HostResolver, Resolver } from "../dns/resolver.ts";
import { type MetricsServer, serveMetrics } from "../ops/metrics_server.ts";
import type { Session } from "../conn/session.ts";
import { SourceLimiter } from "../conn/sourcelimit.ts";
import { AcceptGate, type PauseReason } from "./acceptgate.ts";
import type { OffenceSink, SourceBlocker } from "../ebpf/xdpblock.ts";
import type { SteeringMember } from "./accel.ts";
import { ebpfLog, kernelMode } from "./kernel_mode.ts";
import type { QuicFastPath } from "../ebpf/quic.ts";
import type { RelayMode } from "./ready.ts";
import {
  buildTables,
  type RoutingTables,
  startHealthChecks,
  stopHealthChecks,
} from "../route/table.ts";

const log = logger("proxy");

/** The eBPF parts (and libbpf behind them), loaded by a process that opens one. */
const accel = () => import("./accel.ts");

/** This process's part when the proxy runs as several worker processes (see supervisor.ts and worker.ts). */
export interface WorkerRole {
  /** 1-based. */
  index: number;
  /** Worker processes in all. */
  count: number;
  /** Where the supervisor pinned the eBPF fast path it loaded (attach to it there), or null. */
  kernel: string | null;
  /** Where the supervisor pinned the QUIC steering (join the QUIC listeners to it), or null. */
  quicSteer?: string | null;
}

/** A running proxy. */
export class Proxy implements ListenerHost, QuicListenerHost, AdminTarget {
  tables: RoutingTables;
  readonly metrics = new Metrics();
  /** TCP listeners (TLS, HTTP). */
  readonly listeners: Listener[] = [];
  /** QUIC listeners (UDP). */
  readonly quicListeners: QuicListener[] = [];
  /** Every listener in config order (the ready line's order). */
  readonly #all: (Listener | QuicListener)[] = [];
  /** Kernel mode: the kernel forwarding of routed QUIC flows, or null. */
  quicKernel: QuicKernelPath | null = null;
  #quicFast: QuicFastPath | null = null;
  /** A worker's part of the steering of QUIC datagrams to the worker of their flow, or null. */
  quicSteer: SteeringMember | null = null;
  /** QUIC flows may not be sent to the proxy's own UDP sockets (set once they are bound). */
  quicGuard = new DialGuard([]);
  kernel: KernelAccel | null = null;
  /** Kernel mode through splice(2): the pipes of this process, or null. */
  pipes: PipePool | null = null;
  /** The XDP source filter, when configured and attached. */
  xdp: XdpFilter | null = null;
  /**
   * Where offences of misbehaving sources go (ebpf.xdp.block): this process's counter of XDP
   * blocks, or in a worker the reports to its supervisor's; null when off.
   */
  blocker: OffenceSink | null = null;
  /** The counter of XDP blocks when this process owns the XDP maps (not in a worker). */
  #counter: SourceBlocker | null = null;
  /** Set once the listeners are bound (they are its own sockets). */
  guard = new DialGuard([]);
  readonly fds: FdBudget | null;
  readonly sources = new SourceLimiter();
  #metricsServer: MetricsServer | null = null;
  /** Gives the garbage of each burst of connections back to the system once it is over. */
  #memory: MemoryReleaser | null = null;
  readonly #sessions = new Set<Session>();
  /** Told when the last live session ends (a drain waits for it). */
  #noSessions: (() => void)[] = [];
  readonly #gate: AcceptGate;
  #stopping = false;
  /** SIGTERM came: /healthz answers 503 (the listeners accept until #stopping). */
  #leaving = false;
  /** The listeners' accept loops, settled once each has stopped. */
  readonly #accepting: Promise<void>[] = [];

  /** Set when this process is one of several workers; null: the whole proxy. */
  readonly worker: WorkerRole | null;

  private constructor(config: Config, worker: WorkerRole | null) {
    this.tables = buildTables(config);
    this.worker = worker;
    const fds = FdBudget.open();
    if (typeof fds === "string") {
      log.warn(`accepting without a descriptor reserve: ${fds}`);
      this.fds = null;
    } else {
      this.fds = fds;
      this.metrics.fdSource = () => {
        fds.recount();
        return { open: fds.open, limit: fds.limit };
      };
    }
    this.#gate = new AcceptGate({
      full: () => this.#full(),
      maxConnections: () => this.tables.config.limits.maxConnections,
      metrics: this.metrics,
      fds: this.fds,
    });
  }

  /**
   * Attaches the eBPF fast path when the config asks for it (falling back to userspace mode
   * with one warning when it cannot), binds every listener (all or none) and starts accepting.
   * A worker passes `offences`: where it reports offences for its supervisor's XDP blocks.
   */
  static async start(
    config: Config,
    worker: WorkerRole | null = null,
    offences: OffenceSink | null = null,
  ): Promise<Proxy> {
    const proxy = new Proxy(config, worker);
    if (worker && offences) {
      proxy.blocker = offences;
      proxy.metrics.blockSource = () => offences.snapshot();
    }
    // a worker's warnings would repeat its supervisor's once per worker
    if (!worker) { for (const w of config.warnings) log.warn(w); }
    await proxy.#openKernelPath(config);
    proxy.#configureDns(config);
    if (!worker) warnIfListened(config.listeners);
    if (worker?.quicSteer) {
      proxy.quicSteer = (await accel()).joinQuicSteering(worker.quicSteer, worker, proxy.metrics);
    }
    // QUIC's modules (its crypto among them) only where a listener speaks it
    const quic = config.listeners.some((l) => l.protocol === "quic")
      ? (await import("../conn/quic_listener.ts")).QuicListener
      : null;
    try {
      proxy.#bind(config, quic);
      if (config.metrics && !worker) {
        const { hostname, port } = config.metrics;
        proxy.#metricsServer = await serveMetrics(
          () => proxy.metrics.snapshot(),
          hostname,
          port,
          () => !proxy.#leaving,
        );
      }
    } catch (e) {
      for (const l of proxy.#all) l.close();
      proxy.quicSteer?.close();
      proxy.#resolver?.close();
      await proxy.kernel?.close();
      throw e;
    }
    await proxy.#openQuicKernel(config);
    proxy.guard = new DialGuard(proxy.#ownSockets(config));
    proxy.quicGuard = new DialGuard(proxy.quicListeners.map((l) => l.bound));
    // a worker's lines would repeat the supervisor's once per worker
    const info = worker ? log.debug.bind(log) : log.info.bind(log);
    for (const l of proxy.#all) {
      info(`listening on ${l.address} (${l.config.protocol})`);
      const serving = l.serve().catch((e) => log.error(`listener ${l.address} stopped: ${e}`));
      // a QUIC listener serves its flows until the drain ends: only TCP accept loops are awaited
      if (l instanceof Listener) proxy.#accepting.push(serving);
    }
    if (config.ebpf.enabled && !config.ebpf.sockmapEnabled && !worker) {
      log.info("ebpf.sockmap_enabled is false: userspace mode in use");
    }
    if (config.ebpf.enabled && config.ebpf.xdp && !worker) {
      const { openXdpBlocking, flattenXdp } = await accel();
      const { xdp, blocker } = await openXdpBlocking(config, proxy.#listeningPorts());
      proxy.xdp = xdp;
      if (xdp) proxy.metrics.kernelSources.set("xdp", () => flattenXdp(xdp.stats()));
      if (blocker) {
        proxy.blocker = proxy.#counter = blocker;
        proxy.metrics.blockSource = () => blocker.snapshot();
      }
    }
    startHealthChecks(proxy.tables);
    const loop = eventLoop();
    proxy.#memory = new MemoryReleaser({ activity: () => loop.stats.events });
    info(
      `ready: ${proxy.#all.length} listener(s), ${routeSummary(config)}, ` +
        `mode ${proxy.mode}`,
    );
    return proxy;
  }

  /**
   * Kernel mode's relay path as the config asks: splice pipes, or the sockmap fast path (in a
   * worker, its supervisor's: the worker reports the sockets it paired, the supervisor reads the
   * kernel counters and serves the metrics endpoint and the XDP filter).
   */
  async #openKernelPath(config: Config): Promise<void> {
    const worker = this.worker;
    if (kernelMode(config) === "pipe") {
      this.pipes = new PipePool(config.ebpf.pipeBytes);
    } else if (worker) {
      if (worker.kernel) {
        this.kernel = (await accel()).attachKernel(config, worker.kernel, worker.count);
      }
    } else if (kernelMode(config) === "sockmap") {
      this.kernel = await (await accel()).openKernel(config);
    }
    const kernel = this.kernel;
    if (kernel) this.metrics.kernelSources.set("sockmap", () => ({ ...kernel.stats() }));
  }

  /** Kernel mode for QUIC listeners (`ebpf.quic`): the fast path, or userspace (warned). */
  async #openQuicKernel(config: Config): Promise<void> {
    if (this.quicListeners.length === 0) return;
    const { openQuicFastPath, flattenQuic } = await accel();
    const fast = await openQuicFastPath(config, this.worker?.count ?? 1);
    if (!fast) return;
    this.#quicFast = fast;
    this.quicKernel = fast;
    this.metrics.kernelSources.set("quic", () => flattenQuic(fast.stats()));
  }

  /**
   * Binds every listener of `config`, TCP or QUIC (throws at the first that fails); `quic`: the
   * QUIC listener's class, loaded when the config has one.
   */
  #bind(config: Config, quic: typeof QuicListener | null): void {
    config.listeners.forEach((l, i) => {
      if (l.protocol === "quic") {
        const q = new quic!(l, i, this);
        this.quicListeners.push(q);
        this.#all.push(q);
      } else {
        const t = new Listener(l, i, this);
        this.listeners.push(t);
        this.#all.push(t);
      }
    });
  }

  #resolver: Resolver | null = null;
  /** Resolves backend hosts for the sessions: the resolver of the config in force. */
  readonly resolver: HostResolver = { resolve: (host) => this.#resolver!.resolve(host) };

  /** (Re)creates the backend resolver and its cache from the config; closes the previous one. */
  #configureDns(config: Config): void {
    const d = config.dns;
    const pinned = config.ebpf.enabled && config.ebpf.dnsCacheEnabled;
    const previous = this.#resolver;
    this.#resolver = Resolver.open({
      ...d,
      servers: d.servers ?? undefined,
      maxEntries: d.cacheEntries,
      pinned: pinned ? { path: DEFAULT_DNS_PIN_PATH } : null,
    }, ebpfLog("dns"));
    previous?.close();
    const resolver = this.#resolver;
    this.metrics.dnsSource = () => resolver.cache.stats;
  }

  /** This process's listening sockets, and the supervisor's metrics endpoint in a worker. */
  #ownSockets(config: Config): OwnSocket[] {
    const own: OwnSocket[] = this.listeners.map((l) => l.bound);
    const metrics = this.#metricsServer?.addr ?? config.metrics;
    if (metrics && metrics.port !== 0) own.push(metrics);
    return own;
  }

  /** The bound TCP ports of the listeners (what the XDP allow rule protects). */
  /** The bound ports of every listener, TCP and QUIC (XDP filters both on them). */
  #listeningPorts(): number[] {
    return [...new Set(this.#all.map((l) => l.bound.port))];
  }

  /** The listeners' configs with the ports they are bound to (the ready line's listeners). */
  get listening(): ListenerConfig[] {
    return this.#all.map((l) => ({ ...l.config, port: l.bound.port }));
  }

  /** How the bytes of this process's connections move: resolved once, at start. */
  get path(): RelayPath {
    this.#path ??= this.pipes
      ? { kind: "pipe", pipes: this.pipes }
      : this.kernel
      ? { kind: "sockmap", kernel: this.kernel }
      : USERSPACE_PATH;
    return this.#path;
  }
  #path: RelayPath | null = null;

  /** Whether the bytes of this process's connections move in the kernel. */
  get mode(): RelayMode {
    return pathMode(this.path);
  }

  /** No workers: this process serves. */
  get workerPids(): number[] {
    return [];
  }

  /** The metrics endpoint's bound `host:port`, or null (always null in a worker). */
  get metricsAddress(): string | null {
    return this.#metricsServer?.address ?? null;
  }

  /** Live sessions. */
  get active(): number {
    return this.#sessions.size;
  }

  /** The live sessions themselves. */
  sessions(): Iterable<AdminSession> {
    return [...this.#sessions, ...this.quicListeners.flatMap((q) => q.sessions())];
  }

  /**
   * The admin API's backend and session commands, on this process's tables and sessions, and
   * `unblock` on its XDP block set.
   */
  admin(req: AdminRequest): AdminResult {
    if (req.cmd === "unblock") return applyUnblock(this.#counter, req);
    return applyLocal(this, req);
  }

  get effectiveConfig(): Config {
    return this.tables.config;
  }

  waitForSlot(): Promise<void> {
    return this.#gate.wait();
  }

  hasSlot(): boolean {
    return this.#full() === null;
  }

  /** Which limit keeps a new client out now, or null when one may come in. */
  #full(): PauseReason | null {
    if (this.#stopping) return null;
    if (this.#sessions.size >= this.tables.config.limits.maxConnections) return "max_connections";
    if (!this.fds || this.fds.hasRoom()) return null;
    // refused clients' lingering closes give their descriptors up first
    return shedLingering(this.fds) > 0 && this.fds.hasRoom() ? null : "fd_reserve";
  }

  track(session: Session): void {
    this.#sessions.add(session);
    this.fds?.sessionStarted();
    this.metrics.active = this.#sessions.size;
  }

  ended(session: Session): void {
    if (!this.#sessions.delete(session)) return;
    this.fds?.sessionEnded();
    this.metrics.active = this.#sessions.size;
    this.#gate.wake();
    if (this.#sessions.size > 0) return;
    const waiters = this.#noSessions;
    this.#noSessions = [];
    for (const resolve of waiters) resolve();
  }

  /** Resolves once no session is live. */
  #sessionsEnded(): Promise<void> {
    if (this.#sessions.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#noSessions.push(resolve));
  }

  /**
   * Serves new connections by `next` from now on (but for the fields that need a restart, each
   * named in one warning); live connections keep their table. Throws a ConfigError, changing
   * nothing, when a running listener's table is gone.
   */
  reload(next: Config): void {
    const old = this.tables.config;
    const { config, warnings } = reloadable(old, next);
    // the supervisor warns for its workers
    const warn = this.worker ? log.debug.bind(log) : log.warn.bind(log);
    for (const w of warnings) warn(w);
    if (
      JSON.stringify(old.dns) !== JSON.stringify(config.dns) ||
      old.ebpf.dnsCacheEnabled !== config.ebpf.dnsCacheEnabled
    ) {
      this.#configureDns(config);
    }
    const previous = this.tables;
    const held = everyPool(previous).flatMap(({ pool }) =>
      pool.backends.flatMap((b) => [
        ...(b.held ? [`${b.address.text} ${b.held}`] : []),
        ...(b.weight !== b.configWeight ? [`${b.address.text} weight ${b.weight}`] : []),
      ])
    );
    if (held.length > 0) {
      log.info(`reload: admin changes end, the config file rules again: ${held.join(", ")}`);
    }
    this.tables = buildTables(config);
    stopHealthChecks(previous);
    startHealthChecks(this.tables);
    if (this.xdp) {
      try {
        this.xdp.update(config.acl.deny, config.acl.allow, this.#listeningPorts());
      } catch (e) {
        log.error(
          `reload: XDP lists not updated, the previous ones stay in force: ${(e as Error).message}`,
        );
      }
    }
    this.#gate.wake();
    log.info(
      `reloaded ${config.path}: ${routeSummary(config)}; ` +
        `${this.#sessions.size} live connection(s) keep their routes`,
    );
  }

  /**
   * Fails /healthz and keeps accepting for stop_delay_ms (a balancer's health check takes this
   * instance out meanwhile), stops accepting, lets live sessions finish for up to drain_ms, then
   * ends the rest.
   */
  async shutdown(): Promise<void> {
    if (this.#leaving) return;
    this.#leaving = true;
    const delayMs = this.tables.config.timeouts.stopDelayMs;
    if (delayMs > 0) {
      log.info(
        `stopping: /healthz answers 503, new connections are still accepted for ${delayMs} ms ` +
          `(timeouts.stop_delay_ms)`,
      );
      await new Promise((r) => setTimeout(r, delayMs));
    }
    this.#stopping = true;
    this.#gate.close();
    for (const l of this.listeners) l.close();
    for (const q of this.quicListeners) q.stopAccepting();
    stopHealthChecks(this.tables);
    this.sources.close();
    this.blocker?.close();
    this.#gate.wake();
    // an accept that completed as the listener closed still hands its connection over: it is
    // served and drained like the others, not cut by the exit
    await Promise.all(this.#accepting);
    const drainMs = this.tables.config.timeouts.drainMs;
    const flows = () => this.quicListeners.reduce((n, q) => n + q.flowCount, 0);
    if (this.#sessions.size > 0 || flows() > 0) {
      log.info(
        `draining ${this.#sessions.size} connection(s) and ${flows()} QUIC flow(s) for up to ` +
          `${drainMs} ms`,
      );
      let timer: ReturnType<typeof setTimeout> | undefined;
      const expired = new Promise<boolean>((r) => (timer = setTimeout(() => r(true), drainMs)));
      const drained = Promise.all([
        this.#sessionsEnded(),
        ...this.quicListeners.map((q) => q.drained()),
      ]).then(() => false);
      if (await Promise.race([drained, expired])) {
        log.warn(
          `drain time over: closing ${this.#sessions.size} connection(s), ${flows()} QUIC flow(s)`,
        );
        for (const q of this.quicListeners) q.close();
        for (const s of [...this.#sessions]) s.stop("shutdown");
        await this.#sessionsEnded();
      }
      clearTimeout(timer);
    }
    for (const q of this.quicListeners) q.close();
    this.quicSteer?.close();
    this.#memory?.close();
    this.#quicFast?.close();
    await this.#metricsServer?.close();
    this.#resolver?.close();
    this.xdp?.close();
    await this.kernel?.close();
    log.info("stopped");
  }
}
