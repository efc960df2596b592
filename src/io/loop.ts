/**
 * The socket engine's event loop: one epoll instance per process that watches every socket the
 * proxy owns (listening, accepted, backend, pipes of kernel relays), and calls each socket's
 * handler synchronously for its events.
 *
 * Deno's own loop still has to run (timers, DNS, the admin socket, metrics, reloads). While
 * traffic flows (an event in the last 5 ms) the engine waits on the JS thread (`epoll_wait`, a
 * fast FFI call, no promise, blocking at most 1 ms), and every 2 ms it waits off the JS thread
 * once with timeout 0, which gives Deno's loop its turn; when idle it waits off the JS thread
 * (a nonblocking FFI call: one thread hop and one promise per wake). After every round the
 * microtask queue is drained (what the handlers resolved runs before the next poll). A timer the
 * data path waits on need not wait for that turn: {@link EventLoop.sleep} keeps the loop's own
 * clock. A round
 * serves the events of accepts and sessions before those of relays, which are bulk, so a new
 * connection never waits behind bulk transfers.
 *
 * Handlers are found by fd, with a generation number in the event's data: an event that was
 * already fetched for an fd closed (and maybe reused) in the same round is dropped.
 *
 * @module
 */
import {
  closeFd,
  EPOLL_CLOEXEC,
  EPOLL_CTL_ADD,
  EPOLL_CTL_DEL,
  EPOLL_CTL_MOD,
  EPOLL_EVENT_DATA,
  EPOLL_EVENT_SIZE,
  EPOLLIN,
  errnoText,
  rcOrErrno,
  sys,
} from "../../ffi/socket.ts";

/** Something that owns an fd on the loop. */
export interface IoHandler {
  /** The fd's events (EPOLLIN, EPOLLOUT, ...), as epoll reported them. */
  onIo(events: number): void;
  /**
   * Its events move bulk (a relay's): served after the round's other events (accepts, hellos,
   * connects) and the sessions those wake, so a new connection never waits behind bulk.
   */
  readonly bulk?: boolean;
}

/** Bytes the relays may move in one round (then the rest waits for the next round). */
const ROUND_BYTES = 4 << 20;
/** Most events fetched by one epoll_wait. */
const MAX_EVENTS = 64;
/** How long an idle off-thread wait blocks (a stop wakes it at once through the eventfd). */
const IDLE_WAIT_MS = 1000;
/**
 * While events keep coming, Deno's loop (timers, DNS answers, the admin socket) gets a turn at
 * least this often (ms). Each turn is a wait off the JS thread: about five syscalls (the worker's
 * wake and wait, its epoll_wait, its wake of Deno's loop, that loop's epoll_wait) and ~0.1 ms,
 * 0.8 syscalls per new connection under load (strace -c, wrk -c20 `Connection: close`); at 10
 * ms 0.3, but an idle timeout under 200 bulk transfers then fired up to 0.75 s late (2 ms: up to
 * 0.2 s; tests/loop_fairness_test.ts). Only `setImmediate` is cheaper, and it never lets Deno's
 * loop poll its sockets (an admin request waited 100+ ms). The data path's own timers do not
 * wait for it (see {@link EventLoop.sleep}).
 */
const YIELD_EVERY_MS = 2;
/** How long after the last event the loop counts as busy and waits on the JS thread (ms). */
const HOT_MS = 5;
/** How long one wait on the JS thread may block (ms): the delay it can add to Deno's loop. */
const HOT_WAIT_MS = 1;

/** Counts of the loop's work, for tests and the benchmark. */
export interface LoopStats {
  /** epoll_wait calls on the JS thread (timeout 0). */
  polls: number;
  /** epoll_wait calls off the JS thread. */
  waits: number;
  /** Events handed to handlers. */
  events: number;
}

/** One process's epoll and the handlers of its fds. */
export class EventLoop {
  readonly #epfd: number;
  /** eventfd that wakes an off-thread wait (stop). */
  readonly #wakeFd: number;
  readonly #handlers: (IoHandler | undefined)[] = [];
  readonly #gens: number[] = [];
  readonly #ctl = new Uint8Array(EPOLL_EVENT_SIZE);
  readonly #ctlView = new DataView(this.#ctl.buffer);
  readonly #events = new Uint8Array(MAX_EVENTS * EPOLL_EVENT_SIZE);
  readonly #eventsView = new DataView(this.#events.buffer);
  /** The off-thread wait's own buffer: the kernel writes it while JS may poll. */
  readonly #offEvents = new Uint8Array(MAX_EVENTS * EPOLL_EVENT_SIZE);
  readonly #offEventsView = new DataView(this.#offEvents.buffer);
  readonly #onError: (e: unknown) => void;
  #running = false;
  #closed = false;
  #count = 0;
  /** Bytes the relays moved this round. */
  #roundBytes = 0;
  /** Indices of the round's bulk events, served after the others. */
  readonly #held = new Int32Array(MAX_EVENTS);
  /** Work handed to the next round (a relay that used up its share of this one). */
  #later: (() => void)[] = [];
  /** The off-thread wait is under way: later() has to wake it. */
  #waiting = false;
  /** The wake eventfd was written for later() and is not drained yet. */
  #woken = false;
  readonly #wakeBuf = new Uint8Array(8);
  /** Sleeps on the loop's own clock ({@link sleep}): at most one per kernel relay's drain. */
  #sleepers: { at: number; wake: () => void }[] = [];
  /** When the first of them is due (ms, or Infinity). */
  #sleeperAt = Infinity;
  readonly stats: LoopStats = { polls: 0, waits: 0, events: 0 };

  /** `onError`: told about a handler that threw (the loop goes on). */
  constructor(onError: (e: unknown) => void = (e) => console.error(e)) {
    const s = sys();
    this.#epfd = s.epoll_create1(EPOLL_CLOEXEC);
    if (this.#epfd < 0) throw new Error(`epoll_create1: ${errnoText(-rcOrErrno(-1))}`);
    this.#wakeFd = s.eventfd(0, 0o4000 | 0o2000000); // EFD_NONBLOCK | EFD_CLOEXEC
    if (this.#wakeFd < 0 || this.#ctlAdd(this.#wakeFd, EPOLLIN, 0xffffffff, 0) < 0) {
      throw new Error("eventfd for the socket engine failed");
    }
    this.#onError = onError;
  }

  /** fds watched now. */
  get watched(): number {
    return this.#count;
  }

  /** Watches `fd` for `events` (EPOLLET for edge-triggered); 0 or -errno. */
  add(fd: number, events: number, handler: IoHandler): number {
    const gen = ((this.#gens[fd] ?? 0) + 1) >>> 0;
    const rc = this.#ctlAdd(fd, events, fd, gen);
    if (rc < 0) return rc;
    this.#gens[fd] = gen;
    this.#handlers[fd] = handler;
    this.#count++;
    if (!this.#running && !this.#closed) this.#run();
    return 0;
  }

  /** Changes the events `fd` is watched for; 0 or -errno. */
  modify(fd: number, events: number): number {
    return this.#ctl_(EPOLL_CTL_MOD, fd, events, fd, this.#gens[fd] ?? 0);
  }

  /** Gives `fd` a new handler (a session handing its sockets to a relay). */
  setHandler(fd: number, handler: IoHandler): void {
    if (this.#handlers[fd]) this.#handlers[fd] = handler;
  }

  /**
   * Forgets `fd` before it is closed: no event fetched for it is delivered any more. `unwatch`:
   * also take it out of the epoll set (needed only when the fd stays open, e.g. a paused
   * listener; closing the fd removes it from the set by itself).
   */
  forget(fd: number, unwatch = false): void {
    if (!this.#handlers[fd]) return;
    this.#handlers[fd] = undefined;
    this.#gens[fd] = ((this.#gens[fd] ?? 0) + 1) >>> 0;
    this.#count--;
    if (unwatch) this.#ctl_(EPOLL_CTL_DEL, fd, 0, 0, 0);
  }

  /**
   * Calls `work` in the next round, before the loop waits: a handler that stops before EAGAIN
   * (its share of a round used up, so that one busy connection cannot hold the others back)
   * gets no new edge-triggered event, so it asks to be called again.
   */
  later(work: () => void): void {
    this.#later.push(work);
    this.#wake();
  }

  /**
   * Ends an off-thread wait under way: work handed to the loop outside a round (a relay started
   * by a session) would otherwise wait for an event or the idle wait's end.
   */
  #wake(): void {
    if (this.#waiting && !this.#woken) {
      this.#woken = true;
      this.#wakeBuf[0] = 1;
      sys().write(this.#wakeFd, this.#wakeBuf, 8n);
    }
  }

  /**
   * Resolves after `ms`, by the loop's own clock: a round wakes it, so a busy loop need not give
   * Deno's loop a turn for it (a kernel relay's drain poll, every ms at a connection's end).
   * With the loop not running, a plain timer.
   */
  sleep(ms: number): Promise<void> {
    if (!this.#running || this.#closed) return new Promise((r) => setTimeout(r, ms));
    return new Promise((wake) => {
      const at = performance.now() + ms;
      this.#sleepers.push({ at, wake });
      if (at < this.#sleeperAt) this.#sleeperAt = at;
      this.#wake();
    });
  }

  /** Wakes the sleepers due at `now`. */
  #wakeSleepers(now: number): void {
    const due: (() => void)[] = [];
    const left: { at: number; wake: () => void }[] = [];
    let next = Infinity;
    for (const s of this.#sleepers) {
      if (s.at <= now) due.push(s.wake);
      else {
        left.push(s);
        if (s.at < next) next = s.at;
      }
    }
    this.#sleepers = left;
    this.#sleeperAt = next;
    for (const wake of due) wake();
  }

  /** Stops the loop (after the current round); watched fds stay open. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    // a loop that is not running (nothing watched) has no round to end: its fds go now
    if (!this.#running) {
      this.#release();
      return;
    }
    const one = new Uint8Array(8);
    one[0] = 1;
    sys().write(this.#wakeFd, one, 8n);
  }

  #ctlAdd(fd: number, events: number, data: number, gen: number): number {
    return this.#ctl_(EPOLL_CTL_ADD, fd, events, data, gen);
  }

  #ctl_(op: number, fd: number, events: number, data: number, gen: number): number {
    const v = this.#ctlView;
    v.setUint32(0, events >>> 0, true);
    v.setUint32(EPOLL_EVENT_DATA, data >>> 0, true);
    v.setUint32(EPOLL_EVENT_DATA + 4, gen, true);
    return rcOrErrno(sys().epoll_ctl(this.#epfd, op, fd, this.#ctl));
  }

  async #run(): Promise<void> {
    this.#running = true;
    const s = sys();
    let lastYield = performance.now();
    let lastEvent = lastYield;
    try {
      // with nothing watched the loop ends (and with it the off-thread wait that would keep the
      // process alive); the next add() starts it again
      while (!this.#closed && this.#count > 0) {
        const now = performance.now();
        if (now >= this.#sleeperAt) {
          this.#wakeSleepers(now);
          await undefined;
        }
        const yieldDue = now - lastYield >= YIELD_EVERY_MS;
        if (!yieldDue) {
          // while traffic flows, wait on the JS thread (briefly): the next event is near, and an
          // off-thread wait would cost a thread hop and a promise for each
          const hot = now - lastEvent < HOT_MS;
          const pending = this.#later.length > 0;
          this.stats.polls++;
          const wait = pending ? 0 : hot ? HOT_WAIT_MS : 0;
          const n = s.epoll_wait(this.#epfd, this.#events, MAX_EVENTS, wait);
          if (n > 0 || pending) {
            if (n > 0) lastEvent = performance.now();
            this.#round(this.#eventsView, n);
            // what the round's handlers resolved (a relay's end) runs before the next poll
            await undefined;
            continue;
          }
          if (hot) continue;
        }
        // Deno's loop gets its turn: timers, DNS, the admin socket, reloads
        this.stats.waits++;
        const timeout = yieldDue || this.#later.length > 0
          ? 0
          : Math.max(0, Math.min(IDLE_WAIT_MS, Math.ceil(this.#sleeperAt - now)));
        this.#waiting = true;
        const n = await s.epoll_wait_off_thread(this.#epfd, this.#offEvents, MAX_EVENTS, timeout);
        this.#waiting = false;
        lastYield = performance.now();
        if (this.#woken) {
          // drained, or the level-triggered eventfd would end every wait at once
          this.#woken = false;
          s.read(this.#wakeFd, this.#wakeBuf, 8n);
        }
        if (n > 0) lastEvent = lastYield;
        this.#round(this.#offEventsView, Math.max(n, 0));
        await undefined;
      }
    } finally {
      this.#running = false;
      // no round will wake them: now, and a sleep taken again is a plain timer
      if (this.#sleepers.length > 0) this.#wakeSleepers(Infinity);
      if (this.#closed) this.#release();
    }
  }

  /**
   * One round: the events of accepts and sessions (synchronous handlers), then the relays' work
   * carried over from the last round, then this round's bulk events, all within the round's
   * byte budget (see {@link spend}).
   */
  #round(v: DataView, n: number): void {
    this.#roundBytes = 0;
    const held = n > 0 ? this.#dispatch(v, n) : 0;
    this.#runLater();
    if (held > 0) this.#dispatchHeld(v, held);
  }

  /**
   * Counts `bytes` a relay just moved against the round's budget. Once it is used up
   * ({@link exhausted}), relays stop and ask to be called again ({@link later}): a round's length
   * is bounded however many transfers run, so new connections are served every few ms.
   */
  spend(bytes: number): void {
    this.#roundBytes += bytes;
  }

  /** The round's byte budget is used up: relays wait for the next round. */
  get exhausted(): boolean {
    return this.#roundBytes >= ROUND_BYTES;
  }

  #runLater(): void {
    if (this.#later.length === 0) return;
    const work = this.#later;
    this.#later = [];
    for (const w of work) {
      try {
        w();
      } catch (e) {
        this.#onError(e);
      }
    }
  }

  /** Closes the epoll instance and the wake eventfd. */
  #release(): void {
    closeFd(this.#wakeFd);
    closeFd(this.#epfd);
  }

  /**
   * Serves the round's events but the bulk ones, which it holds back (their indices in
   * `#held`); returns how many it held.
   */
  #dispatch(v: DataView, n: number): number {
    this.stats.events += n;
    let held = 0;
    for (let i = 0; i < n; i++) {
      const handler = this.#handlerOf(v, i);
      if (!handler) continue;
      if (handler.bulk) this.#held[held++] = i;
      else this.#serve(handler, v, i);
    }
    return held;
  }

  /** Serves the bulk events {@link #dispatch} held back (those whose fd is still the same). */
  #dispatchHeld(v: DataView, held: number): void {
    for (let k = 0; k < held; k++) {
      const i = this.#held[k];
      const handler = this.#handlerOf(v, i);
      if (handler) this.#serve(handler, v, i);
    }
  }

  /** The handler of event `i`, or null: the wake eventfd, or an fd closed since it was fetched. */
  #handlerOf(v: DataView, i: number): IoHandler | null {
    const at = i * EPOLL_EVENT_SIZE;
    const fd = v.getUint32(at + EPOLL_EVENT_DATA, true);
    const handler = this.#handlers[fd];
    if (!handler || v.getUint32(at + EPOLL_EVENT_DATA + 4, true) !== this.#gens[fd]) return null;
    return handler;
  }

  #serve(handler: IoHandler, v: DataView, i: number): void {
    try {
      handler.onIo(v.getUint32(i * EPOLL_EVENT_SIZE, true));
    } catch (e) {
      this.#onError(e);
    }
  }
}

let processLoop: EventLoop | null = null;

/** The process's event loop (one epoll for all its sockets), made on first use. */
export function eventLoop(): EventLoop {
  processLoop ??= new EventLoop();
  return processLoop;
}

/** Sets the process loop's error sink (the proxy's logger). */
export function setLoopErrorSink(onError: (e: unknown) => void): void {
  processLoop ??= new EventLoop(onError);
}
