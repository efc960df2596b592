/**
 * Multi-process mode (`workers` > 1). The process started by the operator becomes the
 * supervisor: it loads the eBPF fast path and the XDP filter (once per machine), serves the
 * metrics endpoint, owns the log files, and starts `workers` processes of this same program
 * (src/run/worker.ts). The supervisor counts every worker's offences in one place, beside the
 * XDP maps it owns. With a QUIC listener it loads the steering of QUIC datagrams to the worker
 * holding their flow (src/ebpf/quic_reuseport.ts). SIGHUP and SIGTERM are passed on to every worker; a worker that dies is
 * restarted (with a back-off) and logged.
 *
 * @module
 */
import {
  AdminError,
  type AdminRequest,
  type AdminResult,
  type AdminTarget,
  applyUnblock,
  mergeResults,
} from "../ops/admin.ts";
import { type Config, type ListenerConfig, reloadable, routeSummary } from "../config/mod.ts";
import { lines } from "../net/bytes.ts";
import type { KernelAccel } from "../ebpf/sockmap.ts";
import { warnIfListened } from "../conn/listener.ts";
import { logger, writeForwarded } from "../ops/log.ts";
import { addSnapshot, emptySnapshot, type MetricsSnapshot } from "../ops/metrics.ts";
import { type MetricsServer, serveMetrics } from "../ops/metrics_server.ts";
import {
  addCounters,
  ebpfLog,
  flattenSteer,
  flattenXdp,
  kernelMode,
  openKernel,
  openQuicSteering,
  openXdpBlocking,
} from "./accel.ts";
import type { QuicSteering } from "../ebpf/quic_reuseport.ts";
import { instancePinDir } from "../ebpf/layout.ts";
import { DEFAULT_DNS_PIN_PATH, pinnedCacheUsable } from "../dns/resolver.ts";
import type { XdpFilter } from "../ebpf/xdp.ts";
import { SourceBlocker } from "../ebpf/xdpblock.ts";
import { countOffences, type OffenceLine } from "./offences.ts";
import type { RelayMode } from "./ready.ts";
import { withPort, WORKER_ENV, type WorkerLine, type WorkerSpec } from "./worker.ts";

// the supervisor is the proxy to the operator: its lines read like the single-process ones
const log = logger("proxy");
const encoder = new TextEncoder();

/** How long a new worker may take to bind its listeners and say it is ready. */
const READY_TIMEOUT_MS = 30_000;
/** How long the supervisor waits for a worker's counters. */
const STATS_TIMEOUT_MS = 1_000;
/** Restart back-off after a crash: doubles while workers keep dying young. */
const RESTART_MIN_MS = 100;
const RESTART_MAX_MS = 10_000;
/** A worker that lived this long resets the back-off. */
const STABLE_MS = 10_000;

/**
 * Whether the workers can use the pinned DNS cache the config asks for (undefined: it does not
 * ask): found out once here, so that where it cannot be had there is one warning, not one per
 * worker. Where it can, the pin exists before the workers open it.
 */
function pinnedDnsUsable(config: Config): boolean | undefined {
  if (!config.ebpf.enabled || !config.ebpf.dnsCacheEnabled) return undefined;
  return pinnedCacheUsable(DEFAULT_DNS_PIN_PATH, config.dns.cacheEntries, ebpfLog("dns"));
}

/** The command that runs this program again: the compiled binary, or deno run of main.ts. */
function selfCommand(configPath: string): { cmd: string; args: string[] } {
  if (Deno.build.standalone) return { cmd: Deno.execPath(), args: ["--config", configPath] };
  const main = new URL(Deno.mainModule);
  const denoJson = new URL("./deno.json", main).pathname;
  let config: string[] = [];
  try {
    Deno.statSync(denoJson);
    config = ["--config", denoJson];
  } catch {
    // no deno.json beside main.ts: deno finds one from the working directory, if any
  }
  return {
    cmd: Deno.execPath(),
    args: [
      "run",
      "-A",
      "--unstable-net",
      // as `deno task start`: no code cache (its mapped database and buffers stay resident for
      // the process's life, about 2.5 MB, to save a one-time compile at start)
      "--no-code-cache",
      "--v8-flags=--max-semi-space-size=4",
      ...config,
      main.pathname,
      "--config",
      configPath,
    ],
  };
}

/** One worker process, from spawn to exit. */
class WorkerProcess {
  readonly index: number;
  readonly child: Deno.ChildProcess;
  readonly startedAt = Date.now();
  readonly ready: Promise<number>;
  readonly exited: Promise<Deno.CommandStatus>;
  /** True once the worker said it serves. */
  isReady = false;
  #stdin: WritableStreamDefaultWriter<Uint8Array>;
  /** Answers awaited from the worker, by request id. */
  readonly #pending = new Map<number, (s: unknown) => void>();

  readonly #onOffences: (line: OffenceLine) => void;

  constructor(
    index: number,
    spec: WorkerSpec,
    configPath: string,
    onOffences: (line: OffenceLine) => void,
  ) {
    this.index = index;
    this.#onOffences = onOffences;
    const { cmd, args } = selfCommand(configPath);
    this.child = new Deno.Command(cmd, {
      args,
      // no update check: deno's would load the system's CA bundle and its HTTP client into
      // every worker (about 1 MB each) to ask the network for a newer deno
      env: { [WORKER_ENV]: JSON.stringify(spec), DENO_NO_UPDATE_CHECK: "1" },
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.#stdin = this.child.stdin.getWriter();
    this.exited = this.child.status;
    const ready = Promise.withResolvers<number>();
    this.ready = ready.promise;
    this.ready.catch(() => {});
    this.#read(ready.resolve).catch((e) => log.warn(`worker ${index} output: ${e}`));
    this.exited.then((s) => ready.reject(new Error(`exited (${describeStatus(s)})`)));
  }

  get pid(): number {
    return this.child.pid;
  }

  async #read(onReady: (pid: number) => void): Promise<void> {
    for await (const text of lines(this.child.stdout)) {
      let line: WorkerLine;
      try {
        line = JSON.parse(text);
      } catch {
        log.warn(`worker ${this.index}: ${text}`);
        continue;
      }
      if (line.t === "log" || line.t === "access") writeForwarded(this.index, line);
      else if (line.t === "offences") this.#onOffences(line);
      else if (line.t === "ready") {
        this.isReady = true;
        onReady(line.pid);
      } else if (line.t === "stats" || line.t === "admin") {
        this.#pending.get(line.id)?.(line.s);
        this.#pending.delete(line.id);
      }
    }
  }

  /** The worker's counters, or null when it does not answer in time. */
  stats(id: number): Promise<MetricsSnapshot | null> {
    return this.#ask<MetricsSnapshot>({ t: "stats", id });
  }

  /** The worker's answer to an admin request, or null when it does not answer in time. */
  admin(id: number, req: AdminRequest): Promise<AdminResult | { error: string } | null> {
    return this.#ask({ t: "admin", id, req });
  }

  /** Sends `request` and waits for the answer with its id (null: none in time, or gone). */
  async #ask<T>(request: { t: string; id: number; req?: AdminRequest }): Promise<T | null> {
    if (!this.isReady) return null;
    const { id } = request;
    const answer = Promise.withResolvers<T | null>();
    this.#pending.set(id, answer.resolve as (s: unknown) => void);
    const timer = setTimeout(() => answer.resolve(null), STATS_TIMEOUT_MS);
    try {
      await this.#stdin.write(encoder.encode(JSON.stringify(request) + "\n"));
      return await answer.promise;
    } catch {
      return null;
    } finally {
      clearTimeout(timer);
      this.#pending.delete(id);
    }
  }

  signal(sig: Deno.Signal): void {
    try {
      this.child.kill(sig);
    } catch {
      // already gone
    }
  }
}

function describeStatus(s: Deno.CommandStatus): string {
  return s.signal ? `signal ${s.signal}` : `exit code ${s.code}`;
}

/** Picks a free port for each listener whose config says port 0, so all workers share it. */
function resolvePorts(listeners: ListenerConfig[]): number[] {
  return listeners.map((l) => {
    if (l.port !== 0) return l.port;
    const probe = Deno.listen({ hostname: l.hostname, port: 0 });
    const port = (probe.addr as Deno.NetAddr).port;
    probe.close();
    return port;
  });
}

/** The supervisor of `config.workers` worker processes. */
export class Supervisor implements AdminTarget {
  #config: Config;
  readonly #spec: Omit<WorkerSpec, "index">;
  readonly #workers: (WorkerProcess | null)[];
  readonly #kernel: KernelAccel | null;
  /** QUIC datagrams to the worker of their flow (by connection ID), or null. */
  #steer: QuicSteering | null = null;
  #xdp: XdpFilter | null = null;
  /** Every worker's offences, counted in one place (ebpf.xdp.block), once XDP is attached. */
  #blocker: SourceBlocker | null = null;
  #metricsServer: MetricsServer | null = null;
  #stopping = false;
  #statsId = 0;
  readonly #backoff: number[];

  private constructor(config: Config, spec: Omit<WorkerSpec, "index">, kernel: KernelAccel | null) {
    this.#config = config;
    this.#spec = spec;
    this.#kernel = kernel;
    this.#workers = new Array(config.workers).fill(null);
    this.#backoff = new Array(config.workers).fill(RESTART_MIN_MS);
  }

  /**
   * Loads the fast path (when configured), starts every worker and waits until each has bound
   * its listeners; then the XDP filter and the metrics endpoint. Throws (having stopped what
   * it started) when a worker cannot start.
   */
  static async start(config: Config): Promise<Supervisor> {
    for (const w of config.warnings) log.warn(w);
    warnIfListened(config.listeners);
    const ports = resolvePorts(config.listeners);
    // before the workers: they open its maps where it pinned them
    const kernel = kernelMode(config) === "sockmap" ? await openKernel(config) : null;
    // after the sockmap: its setup clears the pin dir they share
    const steer = await openQuicSteering(config, instancePinDir());
    const sup = new Supervisor(config, {
      count: config.workers,
      kernel: kernel?.pinDir ?? null,
      quicSteer: steer?.pinDir ?? null,
      ports,
      pinnedDns: pinnedDnsUsable(config),
    }, kernel);
    sup.#steer = steer;
    try {
      await Promise.all(sup.#workers.map((_, i) => sup.#spawn(i)));
    } catch (e) {
      await sup.#stopWorkers();
      await steer?.close();
      await kernel?.close();
      throw e;
    }
    const resolved = config.listeners.map((l, i) => withPort(l, ports[i]));
    for (const l of resolved) log.info(`listening on ${l.address} (${l.protocol})`);
    if (config.ebpf.enabled && config.ebpf.xdp) {
      ({ xdp: sup.#xdp, blocker: sup.#blocker } = await openXdpBlocking(config, [
        ...new Set(ports),
      ]));
    }
    if (config.metrics) {
      sup.#metricsServer = await serveMetrics(
        () => sup.snapshot(),
        config.metrics.hostname,
        config.metrics.port,
        () => !sup.#stopping,
      );
    }
    sup.mode = kernel || kernelMode(config) === "pipe" ? "kernel" : "userspace";
    log.info(
      `ready: ${config.workers} workers (pids ${sup.workerPids.join(", ")}), ` +
        `${resolved.length} listener(s), ${routeSummary(config)}, mode ${sup.mode}`,
    );
    return sup;
  }

  /** Starts worker `i` (0-based) and waits until it is ready; throws when it exits first. */
  async #spawn(i: number): Promise<void> {
    const w = new WorkerProcess(
      i + 1,
      { ...this.#spec, index: i + 1 },
      this.#config.path,
      (line) => {
        // offences that come before XDP is attached (or with it off) are not counted
        if (this.#blocker) countOffences(this.#blocker, line);
      },
    );
    this.#workers[i] = w;
    w.exited.then((status) => this.#exited(i, w, status));
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`not ready within ${READY_TIMEOUT_MS} ms`)),
        READY_TIMEOUT_MS,
      );
    });
    try {
      await Promise.race([w.ready, timeout]);
      log.debug(`worker ${i + 1} ready (pid ${w.pid})`);
    } catch (e) {
      w.signal("SIGKILL");
      throw new Error(`worker ${i + 1} (pid ${w.pid}) did not start: ${(e as Error).message}`);
    } finally {
      clearTimeout(timer);
    }
  }

  /** A worker ended: expected while stopping; otherwise logged and restarted after a back-off. */
  #exited(i: number, w: WorkerProcess, status: Deno.CommandStatus): void {
    // one that never got ready is reported by #spawn's caller
    if (this.#stopping || this.#workers[i] !== w || !w.isReady) return;
    const lived = Date.now() - w.startedAt;
    this.#backoff[i] = lived >= STABLE_MS
      ? RESTART_MIN_MS
      : Math.min(this.#backoff[i] * 2, RESTART_MAX_MS);
    log.error(
      `worker ${i + 1} (pid ${w.pid}) exited unexpectedly (${describeStatus(status)}) after ` +
        `${(lived / 1000).toFixed(1)} s; restarting it in ${this.#backoff[i]} ms`,
    );
    this.#workers[i] = null;
    // its flows are gone: their IDs would steer to its successor's socket
    this.#steer?.forgetWorker(i + 1);
    this.#restart(i);
  }

  /** Starts worker `i` again after its back-off; keeps trying (logged) while it fails. */
  #restart(i: number): void {
    setTimeout(() => {
      if (this.#stopping) return;
      this.#spawn(i).then(
        () => log.info(`worker ${i + 1} restarted (pid ${this.#workers[i]?.pid})`),
        (e) => {
          this.#workers[i] = null;
          this.#backoff[i] = Math.min(this.#backoff[i] * 2, RESTART_MAX_MS);
          log.error(`${(e as Error).message}; trying again in ${this.#backoff[i]} ms`);
          this.#restart(i);
        },
      );
    }, this.#backoff[i]);
  }

  /** How the workers relay bytes (kernel mode: as the config asks and the host allows). */
  mode: RelayMode = "userspace";

  /** The workers' pids now (a restarted worker has a new one). */
  get workerPids(): number[] {
    return this.#workers.flatMap((w) => w ? [w.pid] : []);
  }

  /** The listeners' configs with the ports every worker binds (the ready line's listeners). */
  get listening(): ListenerConfig[] {
    return this.#config.listeners.map((l, i) => withPort(l, this.#spec.ports[i]));
  }

  /** The metrics endpoint's bound `host:port`, or null. */
  get metricsAddress(): string | null {
    return this.#metricsServer?.address ?? null;
  }

  get effectiveConfig(): Config {
    return this.#config;
  }

  /**
   * An admin backend or session command, carried out by every worker (their answers merged);
   * `unblock` here, on the XDP block set.
   */
  async admin(req: AdminRequest): Promise<AdminResult> {
    if (req.cmd === "unblock") return applyUnblock(this.#blocker, req);
    const id = ++this.#statsId;
    const answers = await Promise.all(this.#workers.map((w) => w?.admin(id, req) ?? null));
    const missing = answers.flatMap((a, i) => a ? [] : [i + 1]);
    if (missing.length > 0 && missing.length < answers.length) {
      log.warn(`admin: ${req.cmd}: worker(s) ${missing.join(", ")} did not answer`);
    }
    if (missing.length === answers.length) throw new AdminError("no worker answered");
    return mergeResults(req, answers);
  }

  /** The sum of every worker's counters, plus the kernel's (read once, here). */
  async snapshot(): Promise<MetricsSnapshot> {
    const id = ++this.#statsId;
    const parts = await Promise.all(this.#workers.map((w) => w?.stats(id) ?? null));
    const sum = emptySnapshot();
    for (const p of parts) if (p) addSnapshot(sum, p);
    const kernel = this.#kernel;
    // the verdict program's counters, read here, plus the sockets the workers paired
    if (kernel) sum.kernel.sockmap = addCounters(sum.kernel.sockmap ?? {}, kernel.stats());
    // the program's counters, plus the IDs the workers could not publish
    const steer = this.#steer;
    if (steer) {
      sum.kernel.quic_steer = addCounters(sum.kernel.quic_steer ?? {}, flattenSteer(steer.stats()));
    }
    const xdp = this.#xdp;
    if (xdp) sum.kernel.xdp = flattenXdp(xdp.stats());
    // the workers' part is what they could not report
    const blocker = this.#blocker;
    if (blocker) {
      sum.xdp_block = {
        ...blocker.snapshot(),
        offences_dropped: sum.xdp_block.offences_dropped ?? 0,
      };
    }
    return sum;
  }

  /**
   * Applies a (valid) new config: XDP lists here, then SIGHUP to every worker (which reloads
   * the file itself). The fields that need a restart are named in one warning, here only.
   */
  reload(next: Config): void {
    const { config, warnings } = reloadable(this.#config, next);
    for (const w of warnings) log.warn(w);
    this.#config = config;
    if (this.#xdp) {
      try {
        this.#xdp.update(config.acl.deny, config.acl.allow, [...new Set(this.#spec.ports)]);
      } catch (e) {
        log.error(
          `reload: XDP lists not updated, the previous ones stay in force: ${(e as Error).message}`,
        );
      }
    }
    for (const w of this.#workers) w?.signal("SIGHUP");
    log.info(`reload: ${config.path} passed to ${this.#workers.filter((w) => w).length} workers`);
  }

  /** SIGTERM to every worker (each drains for up to drain_ms), then frees the fast path. */
  async shutdown(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    await this.#stopWorkers();
    await this.#metricsServer?.close();
    this.#blocker?.close();
    this.#xdp?.close();
    await this.#steer?.close();
    await this.#kernel?.close();
    log.info("stopped");
  }

  async #stopWorkers(): Promise<void> {
    this.#stopping = true;
    const live = this.#workers.filter((w): w is WorkerProcess => w !== null);
    for (const w of live) w.signal("SIGTERM");
    // a worker ends its sessions at drain_ms; past that (plus its own exit) it is killed
    const graceMs = this.#config.timeouts.stopDelayMs + this.#config.timeouts.drainMs + 5_000;
    await Promise.all(live.map(async (w) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const killed = new Promise<void>((r) => {
        timer = setTimeout(() => {
          log.warn(`worker ${w.index} (pid ${w.pid}) did not exit in ${graceMs} ms: killing it`);
          w.signal("SIGKILL");
          r();
        }, graceMs);
      });
      await Promise.race([w.exited, killed]);
      await w.exited;
      clearTimeout(timer);
    }));
  }
}
