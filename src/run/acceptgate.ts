/**
 * When the accept loops take the next connection: at once while under limits.max_connections
 * and with descriptors for a client and its backend to spare; otherwise once a session ends, or
 * for descriptors once a periodic re-check finds some (they can free up without a session
 * ending). Pauses are counted by reason and logged once per burst, not once per pause.
 *
 * @module
 */
import type { FdBudget } from "../conn/fdbudget.ts";
import { logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";

const log = logger("proxy");

/** Why the accept loops wait: the connection limit, or descriptors running out. */
export type PauseReason = "max_connections" | "fd_reserve";
/** A burst of accept pauses ends (and "accepting again" is logged) after this long without one. */
const PAUSE_QUIET_MS = 1_000;
/** While paused for descriptors, how often to look again (they can free up without a session). */
const FD_RETRY_MS = 100;

/** Options of {@link AcceptGate}. */
export interface AcceptGateOptions {
  /** Which limit keeps a new client out now, or null when one may come in. */
  full(): PauseReason | null;
  /** limits.max_connections in force, for the log lines. */
  maxConnections(): number;
  /** Counts the pauses (`acceptPauses`). */
  metrics: Metrics;
  /** The descriptor budget (set whenever `full` can say `fd_reserve`). */
  fds: FdBudget | null;
}

/** The accept loops' wait for a free connection slot. */
export class AcceptGate {
  readonly #options: AcceptGateOptions;
  #waiters: (() => void)[] = [];
  /** Why accepting is paused now, or null. */
  #paused: PauseReason | null = null;
  /** The burst of pauses being reported (see #pauseStarted), with its end-of-burst timer. */
  #burst: {
    reason: PauseReason;
    pauses: number;
    quiet: ReturnType<typeof setTimeout> | undefined;
  } | null = null;
  /** While paused for descriptors: re-checks, since they can free up without a session ending. */
  #fdRetry: ReturnType<typeof setTimeout> | undefined;
  #closed = false;

  constructor(options: AcceptGateOptions) {
    this.#options = options;
  }

  /** Resolves when a connection slot is free (immediately when one is). */
  wait(): Promise<void> {
    const full = this.#options.full();
    if (!full) return Promise.resolve();
    if (this.#paused !== full) this.#pauseStarted(full);
    this.#paused = full;
    if (full === "fd_reserve") this.#retryForFds();
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  /** Lets waiters in while there is room (after a session ended, a reload, a stop). */
  wake(): void {
    while (this.#waiters.length > 0 && !this.#options.full()) this.#waiters.shift()!();
    if (this.#waiters.length === 0 && this.#paused) {
      this.#paused = null;
      this.#pauseEnded();
    }
  }

  /** Stops the timers; pauses are no longer reported. Call wake() to let the waiters go. */
  close(): void {
    this.#closed = true;
    clearTimeout(this.#fdRetry);
    clearTimeout(this.#burst?.quiet);
  }

  /**
   * Counts a pause; logs it when it starts a burst. Under steady pressure accepting pauses and
   * resumes once per closing connection: one line per burst, not per pause.
   */
  #pauseStarted(reason: PauseReason): void {
    Metrics.bump(this.#options.metrics.acceptPauses, reason);
    const burst = this.#burst;
    clearTimeout(burst?.quiet);
    if (burst?.reason === reason) {
      burst.pauses++;
      return;
    }
    this.#burst = { reason, pauses: 1, quiet: undefined };
    const fds = this.#options.fds!;
    log.warn(
      reason === "max_connections"
        ? `limits.max_connections (${this.#options.maxConnections()}) reached: ` +
          `not accepting until a connection closes`
        : `file descriptors: ${fds.committed} of the limit of ${fds.limit} in use or held for ` +
          `live connections' backends, ${fds.reserve} kept in reserve: not accepting until ` +
          `connections close (new clients wait in the listen backlog)`,
    );
  }

  /** Accepting resumed: the burst ends (logged) once it has not paused for a while. */
  #pauseEnded(): void {
    const burst = this.#burst;
    if (!burst || this.#closed) return;
    const fds = this.#options.fds;
    burst.quiet = setTimeout(() => {
      this.#burst = null;
      const times = burst.pauses > 1 ? ` (paused ${burst.pauses} times in this burst)` : "";
      log.info(
        burst.reason === "max_connections"
          ? `accepting again: below limits.max_connections${times}`
          : `accepting again: file descriptors to spare (${fds!.open} of ` +
            `${fds!.limit} open)${times}`,
      );
    }, PAUSE_QUIET_MS);
  }

  #retryForFds(): void {
    if (this.#fdRetry !== undefined) return;
    this.#fdRetry = setTimeout(() => {
      this.#fdRetry = undefined;
      this.wake();
      if (this.#paused === "fd_reserve") this.#retryForFds();
    }, FD_RETRY_MS);
  }
}
