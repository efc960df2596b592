/**
 * The process's file-descriptor budget, and which errors mean "out of a local resource".
 *
 * Every connection takes two descriptors: the client's, then its backend's. Accepting up to the
 * limit leaves accepted clients without a descriptor for their backend: their connects fail with
 * EMFILE and, taken for backend failures, would mark healthy backends down. So the accept loop
 * takes a new client only while the descriptors in use, plus one for the backend of every live
 * connection that has none yet, plus the new client's two, stay a reserve below the soft
 * RLIMIT_NOFILE. The other clients wait in the listen backlog until connections close.
 *
 * Counting the open descriptors (/proc/self/fd) costs a syscall per descriptor, so it is done
 * only near the limit, and not more often than every 50 ms (or ten times what the last count
 * took). In between, the budget follows the sessions (one descriptor each, two once connected),
 * and the reserve takes what else opens meanwhile (DNS sockets, health checks, metrics requests).
 *
 * @module
 */
import { openFileLimit } from "../../ffi/libc.ts";

/** errno values of failures that are this host's, not the far end's. */
const LOCAL_ERRNOS: Record<number, string> = {
  12: "ENOMEM",
  23: "ENFILE",
  24: "EMFILE",
  99: "EADDRNOTAVAIL",
  105: "ENOBUFS",
};
const LOCAL_CODES = new Set(Object.values(LOCAL_ERRNOS));

/**
 * The errno name (`EMFILE`) when `e`, or an error it was caused by (a DNS query's socket, say),
 * failed for lack of a local resource: descriptors, buffers, memory, source ports. Null for any
 * other failure.
 */
export function localResourceError(e: unknown): string | null {
  let x = e;
  for (let depth = 0; x instanceof Error && depth < 4; depth++, x = x.cause) {
    const code = (x as { code?: unknown }).code;
    if (typeof code === "string" && LOCAL_CODES.has(code)) return code;
    const os = /\(os error (\d+)\)/.exec(x.message);
    if (os && LOCAL_ERRNOS[Number(os[1])]) return LOCAL_ERRNOS[Number(os[1])];
  }
  return null;
}

/** What to do about a {@link localResourceError}, for log lines. */
export function localResourceHint(code: string): string {
  switch (code) {
    case "EMFILE":
      return "Raise the descriptor limit (LimitNOFILE, ulimit -n) or lower limits.max_connections.";
    case "ENFILE":
      return "The system-wide descriptor table is full: raise fs.file-max.";
    case "EADDRNOTAVAIL":
      return "Out of source ports: widen net.ipv4.ip_local_port_range, " +
        "set net.ipv4.tcp_tw_reuse=1.";
    default:
      return "The kernel is short of memory for sockets.";
  }
}

const MIN_COUNT_INTERVAL_MS = 50;

/** Tracks the descriptors in use against the soft limit; see the module comment. */
export class FdBudget {
  /** The soft RLIMIT_NOFILE. */
  readonly limit: number;
  /** Descriptors kept free beyond every live connection's two. */
  readonly reserve: number;
  /** Descriptors no session holds, at the last count. */
  #other = 0;
  #sessions = 0;
  #backends = 0;
  /** Refused clients in their lingering close (src/conn/linger.ts): one descriptor each. */
  #lingering = 0;
  #countedAt = -Infinity;
  #countMs = 0;

  private constructor(limit: number) {
    this.limit = limit;
    // 1/32 of the limit, at least 32 (a quarter of a limit below 128, which must still serve)
    this.reserve = Math.min(1024, Math.max(Math.min(32, limit >> 2), Math.ceil(limit / 32)));
  }

  /**
   * The budget of this process, or a text saying why there is none (the limit or the count
   * cannot be read; the caller logs it and accepts without the check).
   */
  static open(): FdBudget | string {
    let limit: number;
    try {
      limit = openFileLimit();
    } catch (e) {
      return `cannot read the descriptor limit: ${(e as Error).message}`;
    }
    if (limit === Infinity) return "no descriptor limit (RLIMIT_NOFILE unlimited)";
    const budget = new FdBudget(limit);
    const failed = budget.#count(true);
    return failed ? `cannot count open descriptors in /proc/self/fd: ${failed}` : budget;
  }

  /** A client was accepted (its session holds one descriptor). */
  sessionStarted(): void {
    this.#sessions++;
  }

  /** A session ended: its client descriptor is closed. */
  sessionEnded(): void {
    this.#sessions--;
  }

  /** A session connected its backend (a second descriptor). */
  backendOpened(): void {
    this.#backends++;
  }

  /** That backend descriptor is closed. */
  backendClosed(): void {
    this.#backends--;
  }

  /** A refused client's descriptor is kept while it lingers (its session has ended). */
  lingerStarted(): void {
    this.#lingering++;
  }

  /** That descriptor is closed. */
  lingerEnded(): void {
    this.#lingering--;
  }

  /** Descriptors open now: as of the last count, plus the sessions' changes since. */
  get open(): number {
    return this.#other + this.#sessions + this.#backends + this.#lingering;
  }

  /** Descriptors open, plus one for each live session's backend that is not connected yet. */
  get committed(): number {
    return this.#other + 2 * this.#sessions + this.#lingering;
  }

  /** Whether one more client (two descriptors) fits with the reserve to spare. */
  hasRoom(): boolean {
    // far from the limit: no syscall
    if (this.committed + 2 + 2 * this.reserve <= this.limit) return true;
    this.#count(false);
    return this.committed + 2 + this.reserve <= this.limit;
  }

  /** Counts the open descriptors now (for the metrics endpoint); throttled like near the limit. */
  recount(): void {
    this.#count(false);
  }

  /** Counts /proc/self/fd unless counted lately (or `force`); returns an error text or null. */
  #count(force: boolean): string | null {
    const start = performance.now();
    if (!force && start - this.#countedAt < Math.max(MIN_COUNT_INTERVAL_MS, 10 * this.#countMs)) {
      return null;
    }
    let n = -1; // the directory's own descriptor, open while it is read
    try {
      for (const _ of Deno.readDirSync("/proc/self/fd")) n++;
    } catch (e) {
      if (!localResourceError(e)) return (e as Error).message;
      // not even a descriptor to count them with: full
      n = this.limit;
    }
    this.#countedAt = performance.now();
    this.#countMs = this.#countedAt - start;
    this.#other = Math.max(0, n - this.#sessions - this.#backends - this.#lingering);
    return null;
  }
}
