/**
 * The readiness line of `--ready-fd N`: once every listener serves (with workers: once every
 * worker does), one line of JSON on descriptor N saying where, then N is closed. A service
 * manager or a test learns that the proxy serves, and on which ports, without reading the log; a
 * start that fails leaves N unwritten (the process exits 1 and says why on stderr). Under
 * systemd (`Type=notify`, `$NOTIFY_SOCKET` set) the same moment is sent as `READY=1`.
 *
 * @module
 */
import {
  pointAtDevNull,
  sendUnixDatagram,
  setCloseOnExec,
  writableFd,
  writeAllFd,
} from "../../ffi/fdio.ts";
import { strerror } from "../../ffi/libc.ts";
import type { ListenerConfig } from "../config/mod.ts";

/** A listener as the ready line reports it: where it is bound, with the real port. */
export interface ReadyListener {
  /** The bound IP address, without brackets (`127.0.0.1`, `::1`). */
  address: string;
  port: number;
  protocol: ListenerConfig["protocol"];
  /** The route table it serves. */
  table: string;
}

/** The ready line, as written (one line of JSON). */
export interface ReadyLine {
  ready: true;
  /** The process that was started (the supervisor with workers). */
  pid: number;
  /** In config order. */
  listeners: ReadyListener[];
  /** The metrics endpoint's bound `host:port`, or null without `metrics`. */
  metrics: string | null;
  /** The admin socket's path, or null without `admin`. */
  admin: string | null;
  /** How bytes are relayed: "kernel" (`ebpf.sockmap_enabled` in force) or "userspace". */
  mode: RelayMode;
  /** The worker processes' pids (`workers` > 1), empty with one process. */
  workers: number[];
}

/** Where a proxy relays the bytes of its connections. */
export type RelayMode = "kernel" | "userspace";

/** What the ready line is made from: the listeners as bound and the metrics endpoint. */
export interface Serving {
  /** The listeners' configs, each with the port it is bound to. */
  readonly listening: ListenerConfig[];
  /** The metrics endpoint's bound `host:port`, or null. */
  readonly metricsAddress: string | null;
  /** How bytes are relayed (as the `ready:` log line says it too). */
  readonly mode: RelayMode;
  /** The worker processes' pids, empty with one process. */
  readonly workerPids: number[];
}

/** The ready line of `serving` with the admin socket at `admin`. */
export function readyLine(serving: Serving, admin: string | null): ReadyLine {
  return {
    ready: true,
    pid: Deno.pid,
    listeners: serving.listening.map((l) => ({
      address: l.hostname.replace(/^\[|\]$/g, ""),
      port: l.port,
      protocol: l.protocol,
      table: l.table,
    })),
    metrics: serving.metricsAddress,
    admin,
    mode: serving.mode,
    workers: serving.workerPids,
  };
}

/** Raised for a `--ready-fd` that cannot be used (a usage error: exit 2). */
export class ReadyFdError extends Error {
  override name = "ReadyFdError";
}

/**
 * The descriptor of `--ready-fd`, checked at start, written once when ready. Written with
 * write(2) on the descriptor itself: reopening /dev/fd/N would check the pipe's owner again,
 * which a proxy started under another user (setpriv, su) is not.
 */
export class ReadyFd {
  readonly fd: number;
  #written = false;

  private constructor(fd: number) {
    this.fd = fd;
  }

  /**
   * Checks descriptor `text` (as given on the command line) for the ready line. Stdin (0) and
   * stderr (2, the log) are refused. A descriptor above 2 is marked close-on-exec, so worker
   * processes do not hold it open after it is closed here.
   * @throws {ReadyFdError} when `text` is not such a number or the descriptor is not open for
   * writing.
   */
  static open(text: string): ReadyFd {
    const fd = Number(text);
    if (!/^\d+$/.test(text) || fd === 0 || fd === 2 || !Number.isSafeInteger(fd)) {
      throw new ReadyFdError(
        `--ready-fd ${text}: expected a descriptor number other than 0 (stdin) and 2 (the log)`,
      );
    }
    const writable = writableFd(fd);
    if (typeof writable === "number") {
      throw new ReadyFdError(`--ready-fd ${fd}: ${strerror(-writable)}`);
    }
    if (!writable) throw new ReadyFdError(`--ready-fd ${fd}: not open for writing`);
    if (fd > 2) setCloseOnExec(fd);
    return new ReadyFd(fd);
  }

  /** Writes `line` (once; later calls do nothing) and closes the descriptor. */
  announce(line: ReadyLine): void {
    if (this.#written) return;
    this.#written = true;
    try {
      const rc = writeAllFd(this.fd, new TextEncoder().encode(JSON.stringify(line) + "\n"));
      if (rc < 0) throw new Error(`--ready-fd ${this.fd}: ${strerror(-rc)}`);
    } finally {
      this.#closeFd();
    }
  }

  /**
   * Closes descriptor N by pointing it at /dev/null: its reader sees the end, and a later open
   * cannot take the number over (when N is 1, whatever is printed goes nowhere). Deno keeps a
   * duplicate of stdout of its own: a pipe's other descriptors here go the same way, unless
   * stderr writes to that pipe too (then it does not end here anyway).
   */
  #closeFd(): void {
    pointAtDevNull(pipeAliases(this.fd));
  }
}

/** `fd` and the other descriptors of this process on its pipe (but for one stderr shares). */
function pipeAliases(fd: number): number[] {
  const target = linkOf(fd);
  if (!target?.startsWith("pipe:") || target === linkOf(2)) return [fd];
  return [...Deno.readDirSync("/proc/self/fd")].map((e) => Number(e.name))
    .filter((n) => linkOf(n) === target);
}

/** What /proc says descriptor `fd` is (`pipe:[123]`, a path), or null when it is not open. */
function linkOf(fd: number): string | null {
  try {
    return Deno.readLinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return null;
  }
}

/**
 * Tells systemd the service is ready (`READY=1` on `$NOTIFY_SOCKET`, for `Type=notify`); does
 * nothing when it is not set. Returns why it failed, or null.
 */
export function notifySystemd(): string | null {
  const path = Deno.env.get("NOTIFY_SOCKET");
  if (!path) return null;
  const rc = sendUnixDatagram(path, new TextEncoder().encode("READY=1"));
  return rc < 0 ? `NOTIFY_SOCKET ${path}: ${strerror(-rc)}` : null;
}
