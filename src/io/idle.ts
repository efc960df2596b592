/**
 * Idle timeouts without a JS timer each: every live relay has one (tens of thousands of idle
 * connections), and a `setTimeout` costs ~650 B of heap per connection (its Timeout object, the
 * timer list's entries, the callback's closure), re-armed on every expiry. Here the process has
 * one interval that sweeps all watched timeouts; a timeout is an object with a deadline and sits
 * in one Set while it runs.
 *
 * A timeout fires between `idleMs` and `idleMs` + the sweep's tick after the last activity: the
 * tick is an eighth of the shortest `idleMs` watched (10 ms to 1 s), so a 300 s timeout may be
 * up to 1 s late and a 1 s one up to 125 ms. Each sweep costs one comparison per watched timeout.
 *
 * @module
 */

/** Shortest and longest sweep interval (ms). */
const MIN_TICK_MS = 10;
const MAX_TICK_MS = 1000;

/** The timeouts of one process, swept by one interval while any is watched. */
export class IdleSweep {
  readonly #watched = new Set<IdleTimeout>();
  #timer: ReturnType<typeof setInterval> | undefined;
  #tickMs = MAX_TICK_MS;

  /** Timeouts watched now. */
  get size(): number {
    return this.#watched.size;
  }

  /** The sweep's interval now (ms). */
  get tickMs(): number {
    return this.#tickMs;
  }

  /** Watches `t` (again). */
  add(t: IdleTimeout): void {
    this.#watched.add(t);
    const tick = Math.min(MAX_TICK_MS, Math.max(MIN_TICK_MS, Math.floor(t.idleMs / 8)));
    if (this.#timer !== undefined && tick >= this.#tickMs) return;
    // a shorter timeout than any so far: the sweep runs more often until none is watched
    this.#tickMs = Math.min(tick, this.#tickMs);
    clearInterval(this.#timer);
    this.#timer = setInterval(() => this.#sweep(), this.#tickMs);
  }

  /** Stops watching `t`. */
  delete(t: IdleTimeout): void {
    if (!this.#watched.delete(t) || this.#watched.size > 0) return;
    clearInterval(this.#timer);
    this.#timer = undefined;
    this.#tickMs = MAX_TICK_MS;
  }

  #sweep(): void {
    const now = Date.now();
    for (const t of this.#watched) {
      // a timeout that fires is taken out by its own check (deleting while iterating a Set is
      // safe: the iteration goes on with the next entry)
      if (now - t.lastActive >= t.idleMs) t.check(now);
    }
  }
}

let processSweep: IdleSweep | null = null;

/** The process's sweep, made on first use. */
export function idleSweep(): IdleSweep {
  processSweep ??= new IdleSweep();
  return processSweep;
}

/**
 * One idle timeout: fires `onIdle` once nothing moved for `idleMs`. Activity is {@link touch}, or
 * a change of `moved()` (bytes moved where the owner does not see them, e.g. spliced by the
 * kernel), read only when the timeout is due.
 */
export class IdleTimeout {
  readonly idleMs: number;
  /** Date.now() of the last activity seen. */
  lastActive = Date.now();
  readonly #onIdle: () => void;
  readonly #moved: (() => number) | null;
  readonly #sweep: IdleSweep;
  #movedSeen = 0;

  constructor(
    idleMs: number,
    onIdle: () => void,
    moved: (() => number) | null = null,
    sweep: IdleSweep = idleSweep(),
  ) {
    this.idleMs = idleMs;
    this.#onIdle = onIdle;
    this.#moved = moved;
    this.#sweep = sweep;
  }

  /** Starts the timeout (from now). */
  start(): void {
    this.lastActive = Date.now();
    this.#sweep.add(this);
  }

  /** Something moved now. */
  touch(): void {
    this.lastActive = Date.now();
  }

  /** Stops the timeout for good. */
  clear(): void {
    this.#sweep.delete(this);
  }

  /** Called by the sweep once `idleMs` passed since {@link lastActive}. */
  check(now: number): void {
    if (this.#moved) {
      const moved = this.#moved();
      if (moved !== this.#movedSeen) {
        this.#movedSeen = moved;
        this.lastActive = now;
        return;
      }
    }
    this.#sweep.delete(this);
    this.#onIdle();
  }
}
