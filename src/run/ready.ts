/**
 * The readiness line of `--ready-fd N`: once every listener serves (with workers: once every
 * worker does), one line of JSON on descriptor N saying where, then N is closed. A service
 * manager or a test learns that the proxy serves, and on which ports, without reading the log; a
 * start that fails leaves N unwritten (the process exits 1 and says why on stderr).
 *
 * @module
 */
import { cString, libc, O_CLOEXEC } from "../../ffi/libc.ts";
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
}

/** What the ready line is made from: the listeners as bound and the metrics endpoint. */
export interface Serving {
  /** The listeners' configs, each with the port it is bound to. */
  readonly listening: ListenerConfig[];
  /** The metrics endpoint's bound `host:port`, or null. */
  readonly metricsAddress: string | null;
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
  };
}

/** Raised for a `--ready-fd` that cannot be used (a usage error: exit 2). */
export class ReadyFdError extends Error {
  override name = "ReadyFdError";
}

const F_SETFD = 2;
const FD_CLOEXEC = 1;
const O_WRONLY = 1;

/** The descriptor of `--ready-fd`, checked and opened at start, written once when ready. */
export class ReadyFd {
  readonly fd: number;
  #file: Deno.FsFile | null;

  private constructor(fd: number, file: Deno.FsFile) {
    this.fd = fd;
    this.#file = file;
  }

  /**
   * Opens descriptor `text` (as given on the command line) for the ready line. Stdin (0) and
   * stderr (2, the log) are refused. A descriptor above 2 is marked close-on-exec, so worker
   * processes do not hold it open after it is closed here.
   * @throws {ReadyFdError} when `text` is not such a number or the descriptor is not open for
   * writing (a pipe, a file or a terminal: `/dev/fd/N` reopens it; a socket cannot be).
   */
  static open(text: string): ReadyFd {
    const fd = Number(text);
    if (!/^\d+$/.test(text) || fd === 0 || fd === 2 || !Number.isSafeInteger(fd)) {
      throw new ReadyFdError(
        `--ready-fd ${text}: expected a descriptor number other than 0 (stdin) and 2 (the log)`,
      );
    }
    let file: Deno.FsFile;
    try {
      file = Deno.openSync(`/dev/fd/${fd}`, { write: true });
    } catch (e) {
      throw new ReadyFdError(`--ready-fd ${fd}: cannot write to it: ${(e as Error).message}`);
    }
    if (fd > 2) libc().fcntl(fd, F_SETFD, FD_CLOEXEC);
    return new ReadyFd(fd, file);
  }

  /** Writes `line` (once; later calls do nothing) and closes the descriptor. */
  announce(line: ReadyLine): void {
    const file = this.#file;
    if (!file) return;
    this.#file = null;
    try {
      const bytes = new TextEncoder().encode(JSON.stringify(line) + "\n");
      for (let off = 0; off < bytes.length;) off += file.writeSync(bytes.subarray(off));
    } finally {
      file.close();
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
    const c = libc();
    const devNull = c.open(cString("/dev/null"), O_WRONLY | O_CLOEXEC, 0);
    if (devNull < 0) return;
    for (const fd of pipeAliases(this.fd)) c.dup3(devNull, fd, fd > 2 ? O_CLOEXEC : 0);
    c.close(devNull);
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
