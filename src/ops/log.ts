/**
 * Logging: the operator's log (stderr plus a size-rotated file) and the access log (one JSON
 * line per connection, also rotated), both through LogTape.
 *
 * @module
 */
import {
  configure,
  defaultTextFormatter,
  dispose,
  getLogger,
  type Logger,
  type LogRecord,
  type Sink,
} from "@logtape/logtape";
import { getRotatingFileSink } from "@logtape/file";
import type { Config } from "../config/mod.ts";

/** One connection, as written to the access log when it closes. */
export interface AccessEntry {
  time: string;
  client: string;
  listener: string;
  sni: string | null;
  /** TLS listeners: the ALPN protocols the client offered, in its order. */
  alpn?: string[];
  /** TLS listeners: the hello's JA4 and JA3 fingerprints (src/proto/fingerprint.ts). */
  ja4?: string;
  ja3?: string;
  route: string | null;
  backend: string | null;
  /** The connection id sent to the backend (PROXY v2 UNIQUE_ID TLV), when the route sends one. */
  conn_id?: string;
  bytes_up: number;
  bytes_down: number;
  /** QUIC listeners: `quic` (absent for TCP connections). */
  protocol?: "quic";
  /** QUIC listeners: datagrams each way. */
  datagrams_up?: number;
  datagrams_down?: number;
  duration_ms: number;
  close_reason: string;
  mode: "userspace" | "kernel";
  /** The worker process that served it (multi-process mode only). */
  worker?: number;
  error?: string;
}

/** The category every proxy logger lives under. */
export const LOG_ROOT = "sni-proxy";
const ACCESS_ROOT = "sni-proxy-access";

/** A logger for one concern, e.g. `logger("session")`. */
export function logger(name: string): Logger {
  return getLogger([LOG_ROOT, name]);
}

/**
 * A warning that can repeat once per connection (a refused backend address, a lack of
 * descriptors): the first one of each key is logged at once; later ones within `windowMs` are
 * only counted, and summed up in one line when the window ends. A burst costs a line or two,
 * not one per connection. Keys must come from a small set (a route, a cause), never from what a
 * client sends.
 */
export class BurstLog {
  readonly #log: Logger;
  readonly #windowMs: number;
  readonly #open = new Map<string, { count: number; last: string }>();

  constructor(log: Logger, windowMs = 10_000) {
    this.#log = log;
    this.#windowMs = windowMs;
  }

  /** Logs `message`, or counts it when `key` was logged less than a window ago. */
  warn(key: string, message: string): void {
    const burst = this.#open.get(key);
    if (burst) {
      burst.count++;
      burst.last = message;
      return;
    }
    this.#log.warn(message);
    this.#start(key);
  }

  #start(key: string): void {
    const burst = { count: 0, last: "" };
    this.#open.set(key, burst);
    const timer = setTimeout(() => {
      this.#open.delete(key);
      if (burst.count === 0) return;
      this.#log.warn(
        `${burst.count} more like this in the last ${this.#windowMs / 1000} s; the last: ` +
          burst.last,
      );
      this.#start(key);
    }, this.#windowMs);
    Deno.unrefTimer(timer);
  }
}

const encoder = new TextEncoder();

/** An access log is written (by this process, or by the supervisor it forwards to). */
let accessOn = false;

/** stderr, written synchronously so a crash or exit never loses the last lines. */
const stderrSink: Sink = (record: LogRecord) => {
  Deno.stderr.writeSync(encoder.encode(defaultTextFormatter(record)));
};

/** Raised when a log file cannot be opened; the message names the config field and the path. */
export class LogSetupError extends Error {
  override name = "LogSetupError";
}

function fileSink(
  field: string,
  path: string,
  cfg: Config["log"],
  formatter?: (r: LogRecord) => string,
): Sink {
  try {
    const dir = path.slice(0, path.lastIndexOf("/"));
    if (dir) Deno.mkdirSync(dir, { recursive: true });
    return getRotatingFileSink(path, {
      maxSize: cfg.maxFileBytes,
      maxFiles: cfg.maxFiles,
      formatter,
      flushInterval: 500,
      nonBlocking: true,
    });
  } catch (e) {
    throw new LogSetupError(
      `${field}: cannot write ${path}: ${(e as Error).message} (set ${field} to a writable ` +
        `path or false; relative paths resolve against $LOGS_DIRECTORY when set, else the ` +
        `config file's directory)`,
    );
  }
}

/**
 * Sets up the sinks from the config's `log` section. Call once at start.
 * @throws {LogSetupError} when a log file cannot be created or opened.
 */
export async function setupLogging(cfg: Config["log"]): Promise<void> {
  const sinks: Record<string, Sink> = { stderr: stderrSink };
  const proxySinks = ["stderr"];
  if (cfg.file) {
    sinks.file = fileSink("log.file", cfg.file, cfg);
    proxySinks.push("file");
  }
  accessOn = cfg.accessLog !== null;
  if (cfg.accessLog) {
    sinks.access = fileSink(
      "log.access_log",
      cfg.accessLog,
      cfg,
      (r) => JSON.stringify(r.properties) + "\n",
    );
  }
  await configure({
    reset: true,
    sinks,
    loggers: [
      { category: [LOG_ROOT], lowestLevel: cfg.level, sinks: proxySinks },
      { category: [ACCESS_ROOT], lowestLevel: "info", sinks: cfg.accessLog ? ["access"] : [] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

/**
 * A log line a worker process sends to its supervisor, which writes it to the sinks (so one
 * process owns the files and their rotation).
 */
export type ForwardedLog =
  | { t: "log"; ts: number; level: LogRecord["level"]; category: string[]; msg: string }
  | { t: "access"; e: AccessEntry };

/**
 * Worker-process logging: every record (level and above) and every access entry goes to
 * `send` instead of a sink of this process.
 */
export async function setupWorkerLogging(
  level: Config["log"]["level"],
  worker: number,
  send: (line: ForwardedLog) => void,
): Promise<void> {
  const forward: Sink = (r: LogRecord) => {
    const msg = r.message.map((part, i) => i % 2 === 0 ? part : stringify(part)).join("");
    send({ t: "log", ts: r.timestamp, level: r.level, category: r.category.slice(1), msg });
  };
  const access: Sink = (r: LogRecord) => {
    send({ t: "access", e: { ...(r.properties as unknown as AccessEntry), worker } });
  };
  // the supervisor decides whether the lines are written
  accessOn = true;
  await configure({
    reset: true,
    sinks: { forward, access, stderr: stderrSink },
    loggers: [
      { category: [LOG_ROOT], lowestLevel: level, sinks: ["forward"] },
      { category: [ACCESS_ROOT], lowestLevel: "info", sinks: ["access"] },
      { category: ["logtape", "meta"], lowestLevel: "warning", sinks: ["stderr"] },
    ],
  });
}

function stringify(v: unknown): string {
  return typeof v === "string" ? v : Deno.inspect(v);
}

/** Writes a worker's forwarded line to this process's sinks, its category marked `workerN`. */
export function writeForwarded(worker: number, line: ForwardedLog): void {
  if (line.t === "access") {
    accessLogger.info("access", line.e as unknown as Record<string, unknown>);
    return;
  }
  getLogger([LOG_ROOT, `worker${worker}`, ...line.category]).emit({
    timestamp: line.ts,
    level: line.level,
    message: [line.msg],
    rawMessage: line.msg,
    properties: {},
  });
}

const accessLogger = getLogger([ACCESS_ROOT]);
/** Whether access-log lines go anywhere: when not, nothing needs to be kept for them. */
export function accessLogEnabled(): boolean {
  return accessOn;
}

/** Writes one access-log line (a no-op when the access log is off). */
export function writeAccess(entry: AccessEntry): void {
  if (!accessOn) return;
  accessLogger.info("access", entry as unknown as Record<string, unknown>);
}

/** Flushes and closes every sink; call before exit. */
export async function closeLogging(): Promise<void> {
  await dispose();
}
