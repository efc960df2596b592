/**
 * Userspace relay: copies bytes both ways between a client and its backend until both
 * directions end, with half-close, idle timeout and reset handling.
 *
 * The sockets are the proxy's own (src/io/): the relay is a handler of their events, with no
 * promise per chunk.
 *
 * @module
 */

import { E } from "../../ffi/socket.ts";
import { socketError, type TcpSocket } from "../io/tcp.ts";
import { type Deadline, deadline } from "../io/deadlines.ts";

/** Why a relay ended. */
export type RelayEnd =
  | "done"
  | "idle_timeout"
  | "client_reset"
  | "backend_reset"
  /** The backend did not take the session's first bytes within connect_ms (kernel relays). */
  | "backend_timeout"
  | "shutdown"
  | "drain_stalled"
  | "error";

/**
 * Whether the proxy itself cut the stream (idle, drain deadline, error...), as opposed to its
 * natural end or a peer's reset: such a stream ends with a reset on both sides, never a FIN a
 * peer could take for its end.
 */
export function cutByProxy(reason: RelayEnd): boolean {
  return reason !== "done" && reason !== "client_reset" && reason !== "backend_reset";
}

/** Hooks for a relay whose bytes are (mostly) spliced in the kernel. */
export interface SpliceHooks {
  /**
   * Resolves once the receiving socket of a direction (`up`: client -> backend) has taken every
   * byte the kernel redirected to it, so whatever userspace does to that socket next comes after
   * those bytes. Called at EOF, before the half-close is passed on (shutting down earlier loses
   * bytes still in the kernel's redirect queue), and before writing bytes that a spliced socket
   * delivered to userspace: a socket leaves the sockmap when it closes (e.g. FIN_WAIT2 ->
   * TIME_WAIT with its last data and FIN in one segment), and that data then reaches the reader
   * instead of the redirect; written at once it could overtake redirected bytes still queued.
   * `userspaceBytes`: what this relay wrote that way so far, not counting bytes written before
   * the relay started. Resolves true once drained; false when the relay must end instead: the
   * receiving socket took no byte for `ebpf.drain_timeout_ms` (logged, with counts), the session
   * ended or the socket is gone. `progress` is called whenever the receiving socket takes bytes.
   */
  drainKernel(
    up: boolean,
    userspaceBytes: number,
    atEof: boolean,
    progress: () => void,
  ): Promise<boolean>;

  /**
   * Whether the EOF a read just returned is real (the socket has the peer's FIN). A socket in
   * a sockmap can wake its reader with nothing to read when bytes were redirected away, and
   * the read then returns 0; such a false EOF must not half-close the other side.
   */
  eofIsReal(up: boolean): boolean;

  /** Bytes spliced so far (both ways), so the idle timer sees traffic it never reads. */
  splicedBytes(): number;
  /**
   * Called once, just before the sockets are closed: remove the pairing while both 4-tuples
   * are still taken, so a new connection reusing one never meets a stale entry.
   */
  release(): void;
}

/** Where one direction of a {@link Relay} stands when it hands its pair over. */
export interface DirectionState {
  /** Bytes read from the source so far (the pending ones included). */
  bytes: number;
  /** Bytes read but not yet written to the destination (null: none). */
  pending: Uint8Array | null;
  /** The source's EOF was read. */
  eof: boolean;
  /** The EOF was passed on. */
  done: boolean;
  /** This direction's read filled the buffer: it carries bulk. */
  bulk: boolean;
}

/** Where a {@link Relay} stands when it hands its pair over: each direction's state. */
export interface RelayState {
  /** Client → backend. */
  up: DirectionState;
  /** Backend → client. */
  down: DirectionState;
}

/**
 * Takes a pair from a {@link Relay} once a direction carries bulk (kernel mode's splice(2)
 * relay): a connection that never does costs what it costs in userspace mode.
 */
export interface BulkHandover {
  /** A relay that carries on from `state` (not yet run: the caller runs it). */
  relayBulk(client: TcpSocket, backend: TcpSocket, state: RelayState): ByteRelay;
}

/** What a session needs of a relay, userspace or spliced. */
export interface ByteRelay {
  /**
   * Relays until both directions are done (or the relay is stopped), closes both sockets, then
   * calls `onEnd` once, in a microtask (never inside the call that ended the relay). A callback,
   * not a promise: an idle connection holds no promise and no reaction.
   */
  run(onEnd: (end: RelayEnd) => void): void;
  /** Ends the relay now with `reason` (e.g. shutdown); both sockets are closed. */
  stop(reason: RelayEnd): void;
  /** The error behind a reset or error end, for the log. */
  readonly error: unknown;
  /** Bytes client -> backend this relay copied itself (not the kernel's). */
  readonly bytesUp: number;
  /** Bytes backend -> client this relay copied itself. */
  readonly bytesDown: number;
  /** One direction has ended (its EOF passed on) while the other still flows. */
  readonly halfClosed: boolean;
  /**
   * The session's first bytes (the hello, after any PROXY header), which a sockmap relay writes
   * itself, are not all in the backend's socket yet (false for relays that never write them).
   */
  readonly firstPending: boolean;
}

/**
 * The idle timeout of a relay: fires `onIdle` once nothing moved for `idleMs`, counting bytes the
 * kernel spliced (read from `splice` when the timer is due: no per-chunk work for them).
 */
export class IdleTimer {
  readonly #idleMs: number;
  readonly #splice: SpliceHooks | null;
  readonly #onIdle: () => void;
  #splicedSeen = 0;
  #lastActive = Date.now();
  /** The first check, in the queue every relay of this idle length shares. */
  #deadline: Deadline | null = null;
  /** A later check (the connection was active since the last), on a timer of its own. */
  #timer: ReturnType<typeof setTimeout> | undefined;
  readonly #check = () => this.#due();

  constructor(idleMs: number, splice: SpliceHooks | null, onIdle: () => void) {
    this.#idleMs = idleMs;
    this.#splice = splice;
    this.#onIdle = onIdle;
  }

  /** Starts the timer. */
  start(): void {
    this.#deadline = deadline(this.#idleMs, this.#check);
  }

  /** Bytes moved now. */
  touch(): void {
    this.#lastActive = Date.now();
  }

  /** Stops the timer for good. */
  clear(): void {
    this.#deadline?.cancel();
    this.#deadline = null;
    if (this.#timer !== undefined) clearTimeout(this.#timer);
  }

  #due(): void {
    this.#deadline = null;
    if (this.#splice) {
      const spliced = this.#splice.splicedBytes();
      if (spliced !== this.#splicedSeen) {
        this.#splicedSeen = spliced;
        this.#lastActive = Date.now();
      }
    }
    const idleFor = Date.now() - this.#lastActive;
    if (idleFor >= this.#idleMs) this.#onIdle();
    else this.#timer = setTimeout(this.#check, this.#idleMs - idleFor);
  }
}

/** How long a reset that came after its side's EOF waits for the other way to end by itself. */
const LATE_RESET_MS = 250;

/** The relays' one read buffer: a chunk is read into it and written on at once, synchronously. */
const chunk = new Uint8Array(64 * 1024);
const CHUNK_LEN = BigInt(chunk.length);
/**
 * Reads one direction may do per round of the loop (256 KiB; and none once the round's byte
 * budget is used up, see EventLoop.spend): a bulk transfer whose peers keep up
 * would otherwise hold the loop, and new connections would wait behind it.
 */
const READS_PER_ROUND = 4;

/** One direction of a {@link Relay}. */
class Direction {
  readonly up: boolean;
  readonly src: TcpSocket;
  readonly dst: TcpSocket;
  /** Bytes read but refused by `dst` so far (a copy; null when none wait). */
  pending: Uint8Array | null = null;
  /** The source's EOF was read. */
  eof = false;
  /** The EOF was passed on (`dst` half-closed). */
  done = false;
  /** Bytes written to `dst`. */
  bytes = 0;

  constructor(up: boolean, src: TcpSocket, dst: TcpSocket) {
    this.up = up;
    this.src = src;
    this.dst = dst;
  }
}

/**
 * The userspace relay between `client` and `backend`: each socket event moves what can be moved
 * at once, synchronously (read into the one shared buffer, write on; what the peer refuses is
 * kept until it has room, and its source is not read meanwhile), so an idle connection holds no
 * buffer and no chunk costs a promise. A FIN is passed on after every byte before it; a reset
 * of either side resets the other; a stream the proxy cuts is reset on both sides.
 */
export class Relay implements ByteRelay {
  readonly #client: TcpSocket;
  readonly #backend: TcpSocket;
  readonly #up: Direction;
  readonly #down: Direction;
  readonly #idle: IdleTimer;
  #end: RelayEnd | null = null;
  #error: unknown = null;
  #onEnd: ((end: RelayEnd) => void) | null = null;
  /** The check of a reset that came after its side's EOF was passed on (see #pump). */
  #lateReset: Deadline | null = null;
  /** The failed call and its errno behind a reset end (0: none). */
  #failedOp = "";
  #errno = 0;
  /** A direction used up its share of a round: #move is called again in the next one. */
  #resumeQueued = false;
  /** The session wrote the first bytes before this relay started. */
  readonly firstPending = false;
  readonly #resume = () => {
    this.#resumeQueued = false;
    this.#move();
  };
  /** Who takes the pair once a direction carries bulk (null: nobody, or taken already). */
  #bulkHandover: BulkHandover | null;
  /** The direction whose read just filled the buffer, with a taker for bulk. */
  #bulkDir: Direction | null = null;
  /** The relay that carries on since the handover (null: this one relays). */
  #next: ByteRelay | null = null;

  /**
   * `bulk`: who takes the pair once a direction carries bulk (a read fills the buffer);
   * null: this relay copies to the end.
   */
  constructor(
    client: TcpSocket,
    backend: TcpSocket,
    idleMs: number,
    bulk: BulkHandover | null = null,
  ) {
    this.#client = client;
    this.#backend = backend;
    this.#up = new Direction(true, client, backend);
    this.#down = new Direction(false, backend, client);
    this.#idle = new IdleTimer(idleMs, null, () => this.#finish("idle_timeout", null));
    this.#bulkHandover = bulk;
  }

  /** The error behind a reset or error end, for the log (made when asked: most are never). */
  get error(): unknown {
    if (this.#next) return this.#next.error;
    if (this.#error === null && this.#errno !== 0) {
      this.#error = socketError(this.#failedOp, this.#errno);
    }
    return this.#error;
  }

  /** Bytes client -> backend copied by this relay. */
  get bytesUp(): number {
    return this.#next ? this.#next.bytesUp : this.#up.bytes;
  }

  get halfClosed(): boolean {
    return this.#next ? this.#next.halfClosed : this.#up.done !== this.#down.done;
  }

  /** Bytes backend -> client copied by this relay. */
  get bytesDown(): number {
    return this.#next ? this.#next.bytesDown : this.#down.bytes;
  }

  /** Relays until both directions are done (or the relay is stopped); see {@link ByteRelay.run}. */
  run(onEnd: (end: RelayEnd) => void): void {
    if (this.#end !== null) return endLater(onEnd, this.#end);
    this.#onEnd = onEnd;
    // past the round's byte budget a direction queues itself for the next round (#pump)
    const onIo = () => this.#move();
    this.#client.setHandler(onIo);
    this.#backend.setHandler(onIo);
    this.#idle.start();
    // either socket may have input already (what followed the hello, the backend's answer)
    this.#move();
  }

  /** Ends the relay now with `reason` (e.g. shutdown); both sockets are closed. */
  stop(reason: RelayEnd): void {
    if (this.#next) this.#next.stop(reason);
    else this.#finish(reason, null);
  }

  /** Asks to move on in the next round (once). */
  #queueResume(): void {
    if (this.#resumeQueued) return;
    this.#resumeQueued = true;
    this.#client.loop.later(this.#resume);
  }

  #move(): void {
    this.#pump(this.#up);
    this.#pump(this.#down);
  }

  /** Moves what `d` can move now, up to its share of the round. */
  #pump(d: Direction): void {
    const loop = this.#client.loop;
    for (let reads = 0; this.#end === null && this.#next === null; reads++) {
      if (reads === READS_PER_ROUND || (loop.exhausted && d.pending === null)) {
        this.#queueResume();
        return;
      }
      if (d.pending !== null) {
        if (!d.dst.writable) return;
        const w = d.dst.send(d.pending);
        if (w < 0) {
          if (w !== -E.EAGAIN) this.#reset(d, false, -w);
          return;
        }
        d.bytes += w;
        this.#idle.touch();
        if (w < d.pending.length) {
          d.pending = d.pending.subarray(w);
          return;
        }
        d.pending = null;
      }
      if (d.eof) {
        this.#passEof(d);
        // a reset of a source whose EOF was passed on reaches no read (the other way may be
        // silent): its pending error says so. Given a moment first: a client that closed with
        // bytes unread (curl after its response) is reset by its kernel while the backend's own
        // end is already on its way, and that stream ended whole
        if (this.#end === null && d.src.failed && this.#lateReset === null) {
          this.#lateReset = deadline(LATE_RESET_MS, () => {
            const err = this.#end === null ? d.src.pendingError() : 0;
            if (err) this.#reset(d, true, err);
          });
        }
        return;
      }
      if (!d.src.readable) return;
      const n = d.src.recv(chunk, CHUNK_LEN);
      if (n > 0) {
        this.#forward(d, n);
        if (this.#bulkDir !== null && this.#end === null) return this.#handOver();
        // a short read after the peer's FIN took the last bytes: the EOF needs no read of its
        // own (after a reset, epoll said error too: the next read reports it; a read also stops
        // short at a TCP urgent mark, with bytes after it: after urgent data, read on)
        if (n < chunk.length && d.src.peerClosed && !d.src.failed && !d.src.urgent) d.eof = true;
      } else if (n === 0) {
        // a socket reset after its FIN reads 0: its pending error tells them apart
        const err = d.src.failed ? d.src.pendingError() : 0;
        if (err) this.#reset(d, true, err);
        else d.eof = true;
      } else if (n !== -E.EAGAIN) this.#reset(d, true, -n);
    }
  }

  /** Writes the `n` bytes just read for `d`; what `dst` refuses waits in `pending`. */
  #forward(d: Direction, n: number): void {
    this.#idle.touch();
    this.#client.loop.spend(n);
    // a full read is bulk: from now on this pair's events wait behind new connections'
    if (n === chunk.length) {
      if (!this.#client.bulk) this.#client.bulk = this.#backend.bulk = true;
      // a reset being checked (#lateReset) is seen through here
      if (this.#bulkHandover !== null && this.#lateReset === null) this.#bulkDir = d;
    }
    const w = d.dst.send(chunk, n);
    if (w === n) {
      d.bytes += n;
      return;
    }
    if (w < 0 && w !== -E.EAGAIN) {
      this.#reset(d, false, -w);
      return;
    }
    const sent = Math.max(w, 0);
    d.bytes += sent;
    d.pending = chunk.slice(sent, n);
  }

  /**
   * Hands the pair to the bulk relay, which carries on from where this one stands: its end is
   * this relay's end, and its counts and error are read through this one.
   */
  #handOver(): void {
    const state = (d: Direction): DirectionState => ({
      bytes: d.bytes + (d.pending?.length ?? 0),
      pending: d.pending,
      eof: d.eof,
      done: d.done,
      bulk: d === this.#bulkDir,
    });
    const taker = this.#bulkHandover!;
    this.#bulkHandover = null;
    this.#idle.clear();
    const next = taker.relayBulk(this.#client, this.#backend, {
      up: state(this.#up),
      down: state(this.#down),
    });
    this.#next = next;
    next.run((reason) => {
      this.#end = reason;
      this.#onEnd?.(reason);
    });
  }

  /** Half-closes `d.dst` (once); ends the relay when both directions are through. */
  #passEof(d: Direction): void {
    if (d.done) return;
    d.done = true;
    d.dst.shutdownWrite();
    if (this.#up.done && this.#down.done) this.#finish("done", null);
  }

  /** A reset (or another error) of `d`'s source (`atSource`) or destination. */
  #reset(d: Direction, atSource: boolean, errno: number): void {
    const clientSide = atSource === d.up;
    this.#failedOp = atSource ? "recv" : "send";
    this.#errno = errno;
    this.#finish(clientSide ? "client_reset" : "backend_reset", null);
  }

  #finish(reason: RelayEnd, error: unknown): void {
    if (this.#end !== null) return;
    this.#end = reason;
    this.#error = error;
    this.#idle.clear();
    this.#lateReset?.cancel();
    // a peer's reset, or a cut by the proxy, reaches the other side as a reset, never a FIN;
    // the side that was reset is closed already, for the kernel: a plain close will do
    if (reason === "done") {
      this.#client.close();
      this.#backend.close();
    } else {
      if (reason === "client_reset") this.#client.close();
      else this.#client.reset();
      if (reason === "backend_reset") this.#backend.close();
      else this.#backend.reset();
    }
    if (this.#onEnd) endLater(this.#onEnd, reason);
  }
}

/** Tells `onEnd` the relay's end in a microtask, as a settled promise would. */
export function endLater(onEnd: (end: RelayEnd) => void, end: RelayEnd): void {
  queueMicrotask(() => onEnd(end));
}

/** Closes a socket or conn, ignoring "already closed". */
export function closeQuietly(conn: { close(): void }): void {
  try {
    conn.close();
  } catch {
    // already closed
  }
}
