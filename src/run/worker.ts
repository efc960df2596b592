/**
 * A worker process of multi-process mode (`workers` > 1; the supervisor is src/run/supervisor.ts):
 * the whole proxy on listeners shared with SO_REUSEPORT, attached to the pinned eBPF maps. It
 * sends its log lines, access entries, counters, admin answers and offences (`ebpf.xdp.block`,
 * batched: see offences.ts) to the supervisor over its stdout, as {@link WorkerLine}s, and
 * answers the supervisor's requests on its stdin; when the supervisor is gone (stdin closes) it
 * drains and exits.
 *
 * @module
 */
import { type AdminRequest, type AdminResult } from "../ops/admin.ts";
import { type Config, ConfigError, type ListenerConfig, loadConfig } from "../config/mod.ts";
import { lines } from "../net/bytes.ts";
import { runUntilStopped } from "./lifecycle.ts";
import { type ForwardedLog, logger, setupWorkerLogging } from "../ops/log.ts";
import { type MetricsSnapshot } from "../ops/metrics.ts";
import { Proxy, type WorkerRole } from "./proxy.ts";
import { type OffenceLine, OffenceReporter } from "./offences.ts";

/** The environment variable through which the supervisor tells a process it is a worker. */
export const WORKER_ENV = "SNI_PROXY_WORKER";

/** What the supervisor passes to a worker (as JSON in SNI_PROXY_WORKER). */
export interface WorkerSpec extends WorkerRole {
  /** The listeners' ports as the supervisor resolved them (a config port 0 gets a real one). */
  ports: number[];
  /**
   * false: the config asks for the pinned DNS cache but the supervisor found it unusable here
   * (and said so once): use an in-process cache without trying. Absent: as the config says.
   */
  pinnedDns?: boolean;
}

/** This process's worker spec, or null when it was not started as a worker. */
export function workerSpec(): WorkerSpec | null {
  const text = Deno.env.get(WORKER_ENV);
  if (!text) return null;
  const spec = JSON.parse(text) as WorkerSpec;
  // the workers' own children (none today) must not take themselves for workers
  Deno.env.delete(WORKER_ENV);
  return spec;
}

/**
 * A worker's config: the supervisor's ports, its share of limits.max_connections and of the
 * per-source limits (the kernel spreads one source's connections over the workers), and no
 * pinned DNS cache where the supervisor found none usable.
 */
export function workerConfig(config: Config, spec: WorkerSpec): Config {
  const share = (n: number) => Math.ceil(n / spec.count);
  const perSource = config.limits.perSource;
  return {
    ...config,
    ebpf: spec.pinnedDns === false ? { ...config.ebpf, dnsCacheEnabled: false } : config.ebpf,
    listeners: config.listeners.map((l, i) => withPort(l, spec.ports[i] ?? l.port)),
    limits: {
      ...config.limits,
      maxConnections: share(config.limits.maxConnections),
      maxLingering: share(config.limits.maxLingering),
      perSource: perSource && {
        maxConnections: perSource.maxConnections && share(perSource.maxConnections),
        newPerSecond: perSource.newPerSecond && perSource.newPerSecond / spec.count,
        burst: share(perSource.burst),
      },
    },
  };
}

/** `l` bound to `port` (its address says the port too). */
export function withPort(l: ListenerConfig, port: number): ListenerConfig {
  if (l.port === port) return l;
  const host = l.hostname.includes(":") ? `[${l.hostname}]` : l.hostname;
  return { ...l, port, address: `${host}:${port}` };
}

/** Lines a worker sends on its stdout. */
export type WorkerLine =
  | ForwardedLog
  | { t: "ready"; pid: number }
  | { t: "stats"; id: number; s: MetricsSnapshot }
  | { t: "admin"; id: number; s: AdminResult | { error: string } }
  | OffenceLine;

const encoder = new TextEncoder();

/** Writes one JSON line to stdout (the pipe to the supervisor), whole. */
function send(line: unknown): void {
  const bytes = encoder.encode(JSON.stringify(line) + "\n");
  let off = 0;
  while (off < bytes.length) off += Deno.stdout.writeSync(bytes.subarray(off));
}

/**
 * Runs this process as worker `spec.index`: the proxy on shared listeners until SIGTERM/SIGINT
 * or until the supervisor goes away. Returns the exit code.
 */
export async function runWorker(spec: WorkerSpec, configPath: string): Promise<number> {
  let config: Config;
  try {
    config = await loadConfig(configPath);
  } catch (e) {
    const lines = e instanceof ConfigError ? e.errors : [(e as Error).message];
    for (const line of lines) console.error(`worker ${spec.index}: ${configPath}: ${line}`);
    return 1;
  }
  await setupWorkerLogging(config.log.level, spec.index, send);
  // ebpf is restart-only: what the config says now holds for this process's life
  const offences = config.ebpf.enabled && config.ebpf.xdp?.block
    ? new OffenceReporter({ send })
    : null;
  let proxy: Proxy | null = null;
  return await runUntilStopped({
    start: async () => (proxy = await Proxy.start(workerConfig(config, spec), spec, offences)),
    configPath,
    adapt: (c) => workerConfig(c, spec),
    log: logger("worker"),
    onStarted: (stop) => {
      send({ t: "ready", pid: Deno.pid });
      answerSupervisor(proxy!, () => stop("supervisor gone"));
    },
  });
}

/** Answers the supervisor's requests on stdin; calls `gone` at EOF (the supervisor died). */
function answerSupervisor(proxy: Proxy, gone: () => void): void {
  (async () => {
    for await (const line of lines(Deno.stdin.readable)) {
      const req = JSON.parse(line) as { t: string; id: number; req?: AdminRequest };
      if (req.t === "stats") send({ t: "stats", id: req.id, s: proxy.metrics.snapshot() });
      else if (req.t === "admin") {
        let r: AdminResult | { error: string };
        try {
          r = proxy.admin(req.req!);
        } catch (e) {
          r = { error: (e as Error).message };
        }
        send({ t: "admin", id: req.id, s: r });
      }
    }
  })().catch(() => {}).finally(gone);
}
