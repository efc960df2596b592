/**
 * Deadlines for many connections at the cost of one timer: a connection's hello, connect and
 * idle timeouts are the same length for every connection of a table, so deadlines of one length
 * come due in the order they were set. Each length has a first-in, first-out queue with one timer,
 * armed for its oldest deadline; setting a deadline is an append, cancelling one drops its
 * callback (the entry leaves the queue when its time comes, or at once when none is left live).
 * A queue left with nothing live keeps its timer (unreferenced: it keeps no process alive), which
 * then fires once for nothing: a connection that comes and goes before the next one arrives would
 * otherwise cost a timer made and cleared, the most expensive part of a deadline.
 *
 * @module
 */

/** One deadline: {@link cancel} it once what it guards is done. */
export class Deadline {
  /** When it is due (performance.now() ms). */
  readonly at: number;
  #fire: (() => void) | null;
  readonly #queue: DeadlineQueue;

  constructor(at: number, fire: () => void, queue: DeadlineQueue) {
    this.at = at;
    this.#fire = fire;
    this.#queue = queue;
  }

  /** Whether it is still to fire. */
  get live(): boolean {
    return this.#fire !== null;
  }

  /** It will not fire (a no-op once fired or cancelled). */
  cancel(): void {
    if (this.#fire === null) return;
    this.#fire = null;
    this.#queue.cancelled();
  }

  /** Fires it (once); false when it was cancelled. */
  fire(): boolean {
    const f = this.#fire;
    if (f === null) return false;
    this.#fire = null;
    f();
    return true;
  }
}

/** The deadlines of one length, in the order they come due. */
export class DeadlineQueue {
  readonly #ms: number;
  #entries: Deadline[] = [];
  /** Index of the oldest entry still queued. */
  #head = 0;
  /** Entries not fired nor cancelled. */
  #live = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** Due deadlines are being fired (the timer is re-armed after them). */
  #firing = false;

  constructor(ms: number) {
    this.#ms = ms;
  }

  /** Deadlines not fired nor cancelled. */
  get live(): number {
    return this.#live;
  }

  /** Entries held (live, or cancelled and not dropped yet): at most 1024 or 3 per live one. */
  get held(): number {
    return this.#entries.length - this.#head;
  }

  /** Calls `fire` in `ms` (this queue's length) unless the deadline is cancelled first. */
  add(fire: () => void): Deadline {
    const d = new Deadline(performance.now() + this.#ms, fire, this);
    this.#entries.push(d);
    this.#live++;
    if (this.#timer === undefined && !this.#firing) this.#arm(d.at);
    return d;
  }

  /**
   * A deadline was cancelled: with none live, the queue empties and its timer stops; once most
   * entries held are cancelled ones, they are dropped (a long deadline, such as an idle
   * timeout, is mostly cancelled long before it is due).
   */
  cancelled(): void {
    if (--this.#live > 0) {
      const held = this.#entries.length - this.#head;
      if (held > 1024 && held > 3 * this.#live) {
        this.#entries = this.#entries.slice(this.#head).filter((d) => d.live);
        this.#head = 0;
      }
      return;
    }
    this.#entries = [];
    this.#head = 0;
  }

  #arm(at: number): void {
    this.#timer = setTimeout(this.#onTimer, Math.max(0, at - performance.now()));
    Deno.unrefTimer(this.#timer);
  }

  readonly #onTimer = () => this.#due();

  /** Fires what is due, then arms the timer for the next live deadline. */
  #due(): void {
    this.#timer = undefined;
    this.#firing = true;
    try {
      const now = performance.now();
      for (;;) {
        const entries = this.#entries;
        if (this.#head >= entries.length || entries[this.#head].at > now) break;
        const d = entries[this.#head++];
        // counted before it runs: its callback may add or cancel deadlines of this queue
        if (d.live) this.#live--;
        try {
          d.fire();
        } catch (e) {
          console.error(e);
        }
      }
    } finally {
      this.#firing = false;
    }
    this.#rearm();
  }

  /** Drops cancelled entries at the head; arms the timer for the first live one. */
  #rearm(): void {
    const entries = this.#entries;
    while (this.#head < entries.length && !entries[this.#head].live) this.#head++;
    if (this.#head > 1024 && this.#head * 2 > entries.length) {
      this.#entries = entries.slice(this.#head);
      this.#head = 0;
    }
    if (this.#head >= this.#entries.length) {
      this.#entries = [];
      this.#head = 0;
      return;
    }
    if (this.#timer === undefined) this.#arm(this.#entries[this.#head].at);
  }
}

/** The process's queues, one per length. */
const queues = new Map<number, DeadlineQueue>();

/** Calls `fire` in `ms` unless the returned deadline is cancelled first. */
export function deadline(ms: number, fire: () => void): Deadline {
  let q = queues.get(ms);
  if (q === undefined) {
    q = new DeadlineQueue(ms);
    queues.set(ms, q);
  }
  return q.add(fire);
}
