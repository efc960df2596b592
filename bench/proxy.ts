/**
 * The proxy under test, started as `deno run ... main.ts --config GENERATED` with one listener
 * on a free port and one route (`localhost`) to the benchmark's nginx. Each proxy mode the
 * bench measures is one {@link ProxyMode}: its name (the table column) and its `ebpf` config.
 *
 * @module
 */
import { spawn, stop } from "./procs.ts";
import type { ReadyLine } from "../src/run/ready.ts";
import { DUPLEX_NAME } from "./starve.ts";

const ROOT = new URL("..", import.meta.url).pathname;

/** One proxy configuration to measure: a column of the table. */
export interface ProxyMode {
  /** Column name. */
  name: "userspace" | "kernel" | "sockmap" | "workers";
  /** The mode the proxy must report in its ready line (default: the name). */
  reports?: "userspace" | "kernel";
  /** The `ebpf` section of the generated config. */
  ebpf: Record<string, unknown>;
  /** `workers` of the generated config (default 1: the table compares one proxy process). */
  workers?: number;
  /** Checks or builds what the mode needs; returns why it cannot run, or null. */
  prepare?: () => Promise<string | null>;
}

/** The proxy modes, in table order: userspace first (the reference for later columns). */
export const PROXY_MODES: ProxyMode[] = [
  { name: "userspace", ebpf: { enabled: false } },
  // userspace mode in one process per CPU (a supervisor and its workers)
  {
    name: "workers",
    reports: "userspace",
    ebpf: { enabled: false },
    workers: navigator.hardwareConcurrency,
  },
  // kernel mode as shipped: splice(2) through pipes, with flow control
  { name: "kernel", ebpf: { enabled: true, sockmap_enabled: true, splice_mode: "pipe" } },
  // kernel mode with the eBPF sockmap redirect (opt-in: no backpressure)
  {
    name: "sockmap",
    reports: "kernel",
    ebpf: { enabled: true, sockmap_enabled: true, splice_mode: "sockmap" },
    prepare: () => needBpfObject("sockmap.bpf.o"),
  },
];

/**
 * Checks that the proxy can load the eBPF object `file` of bpf/: root, and the object built
 * (running ./build.sh when it is not). Returns why not, or null.
 */
export async function needBpfObject(file: string): Promise<string | null> {
  if (Deno.uid() !== 0) return "needs root (CAP_BPF, CAP_NET_ADMIN)";
  try {
    await Deno.stat(`${ROOT}bpf/${file}`);
    return null;
  } catch { /* not built yet */ }
  const o = await new Deno.Command("bash", { args: [`${ROOT}build.sh`], stdin: "null" })
    .output();
  if (o.success) return null;
  return `./build.sh failed: ${new TextDecoder().decode(o.stderr).trim().split("\n")[0]}`;
}

/** The backends every column routes to. */
export interface Backends {
  /** nginx (TLS), the route `localhost` */
  port: number;
  /** the starvation test's duplex server, the route {@link DUPLEX_NAME} (absent: no route) */
  duplexPort?: number;
}

/** The routes of a column: `localhost` → nginx, {@link DUPLEX_NAME} → the duplex server. */
export function routeList(b: Backends): { name: string; port: number }[] {
  return [
    { name: "localhost", port: b.port },
    ...(b.duplexPort ? [{ name: DUPLEX_NAME, port: b.duplexPort }] : []),
  ];
}

/** A running proxy. */
export interface Proxy {
  port: number;
  /** The deno process running main.ts (the one whose RSS and CPU are measured). */
  pid: number;
  /** All its processes: pid, and its workers when it has any (their CPU is added up). */
  pids: number[];
  /** The metrics endpoint's `host:port` (null: the config has none). */
  metrics?: string | null;
  /** Its log so far. */
  log?(): string;
  stop(): Promise<void>;
}

/** How long the proxy may take from spawn to its ready line. */
const READY_TIMEOUT_MS = 30_000;

/**
 * Starts the proxy in `mode` in front of `backends`; resolves once it is ready. Kernel-mode
 * proxies keep their eBPF state per instance, so other proxies on the machine do not matter.
 */
export async function startProxy(
  dir: string,
  backends: Backends,
  mode: ProxyMode,
): Promise<Proxy> {
  return launchProxy(await writeConfig(dir, backends, mode), mode);
}

/**
 * Starts one proxy process with the config file `path` and waits for its ready line
 * (`--ready-fd 1`), which must report `mode`'s mode.
 */
export async function launchProxy(path: string, mode: ProxyMode): Promise<Proxy> {
  const proc = spawn(Deno.execPath(), {
    // the same flags as `deno task start` (a small V8 young generation and no code cache keep
    // idle RSS down)
    args: [
      "run",
      "-A",
      "--unstable-net",
      "--no-code-cache",
      "--v8-flags=--max-semi-space-size=4",
      `${ROOT}main.ts`,
      "--config",
      path,
      "--ready-fd",
      "1",
    ],
    stdout: "piped",
    stderr: "piped",
    // as `deno task start`: no update check (the CA bundle and an HTTP client in the process)
    env: { DENO_NO_UPDATE_CHECK: "1" },
  });
  const log = keepLog(proc.stderr);
  const ready = await waitReady(proc, log, mode);
  return {
    port: ready.listeners[0].port,
    pid: proc.pid,
    pids: [proc.pid, ...ready.workers],
    metrics: ready.metrics,
    log: log.text,
    stop: () => stop(proc, "SIGTERM"),
  } satisfies Proxy;
}

/** Writes the proxy's config for `mode` into `dir`; returns its path. */
async function writeConfig(dir: string, backends: Backends, mode: ProxyMode): Promise<string> {
  const config = {
    workers: mode.workers ?? 1,
    listeners: [{ address: "127.0.0.1:0" }],
    routes: routeList(backends).map((r) => ({
      match: r.name,
      backends: [`127.0.0.1:${r.port}`],
    })),
    timeouts: { drain_ms: 1000 },
    limits: { max_connections: 20000 },
    log: { level: "info", file: false, access_log: false },
    ebpf: mode.ebpf,
  };
  const path = `${dir}/proxy-${mode.name}.json`;
  await Deno.writeTextFile(path, JSON.stringify(config, null, 2));
  return path;
}

/** The proxy's log as it comes: kept for error messages, its warnings shown as they come. */
function keepLog(stderr: ReadableStream<Uint8Array>): { text: () => string } {
  let text = "";
  (async () => {
    for await (const chunk of stderr.pipeThrough(new TextDecoderStream())) {
      if (text.length < 1 << 20) text += chunk;
      for (const line of chunk.split("\n")) {
        if (/\[(WRN|ERR|FTL)\]/.test(line)) console.error(`    proxy: ${line}`);
      }
    }
  })().catch(() => {});
  return { text: () => text };
}

/**
 * The proxy's ready line. Kills the proxy and throws (with its log) if it exits first, runs in
 * another mode than `mode`'s, or is not ready within {@link READY_TIMEOUT_MS}.
 */
async function waitReady(
  proc: Deno.ChildProcess,
  log: { text: () => string },
  mode: ProxyMode,
): Promise<ReadyLine> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`no ready line within ${READY_TIMEOUT_MS} ms`)),
        READY_TIMEOUT_MS,
      );
    });
    // the proxy closes the descriptor after the line: stdout ends there
    const out = await Promise.race([new Response(proc.stdout).text(), timeout]);
    if (!out.trim()) throw new Error(`it exited (${(await proc.status).code})`);
    const ready = JSON.parse(out) as ReadyLine;
    if (ready.mode !== (mode.reports ?? mode.name)) {
      // the proxy says why in a warning: "eBPF fast path unavailable, userspace mode in use: …"
      const why = log.text().split("\n").filter((l) => l.includes("[WRN]") || l.includes("[ERR]"))
        .map((l) => l.replace(/^.*?\[(WRN|ERR)\] \S+ /, "")).join("; ");
      throw new Error(`it runs in ${ready.mode} mode, not ${mode.reports ?? mode.name}: ${why}`);
    }
    return ready;
  } catch (e) {
    await stop(proc, "SIGKILL");
    throw new Error(
      `proxy (${mode.name}) did not start: ${(e as Error).message}\n--- its log:\n${log.text()}`,
    );
  } finally {
    clearTimeout(timer);
  }
}
