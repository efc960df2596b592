/**
 * Userspace relay: copies bytes both ways between a client and its backend until both
 * directions end, with half-close, idle timeout and reset handling.
 *
 * Each direction is a read()/write() loop over one reused buffer. Deno's `readable`/`pipeTo`
 * is not used: it closes the whole socket at EOF (no half-close) and is slower on small
 * messages.
 *
 * @module
 */

import { writeAll } from "../net/bytes.ts";

/** Why a relay ended. */
export type RelayEnd =
  | "done"
  | "idle_timeout"
  | "client_reset"
  | "backend_reset"
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

/** First buffer of each direction; idle connections keep only this much. */
const INITIAL_BUFFER = 2048;
/** A direction's buffer grows (x4) up to this while reads keep filling it. */
const MAX_BUFFER = 64 * 1024;

/** Hooks for a relay whose bytes are (mostly) spliced in the kernel. */
export interface SpliceHooks {
  /**
   * Resolves once the receiving socket of a direction (`up`: client → backend) has taken every
   * byte the kernel redirected to it, so whatever userspace does to that socket next comes after
   * those bytes. Called at EOF, before the half-close is passed on (shutting down earlier loses
   * bytes still in the kernel's redirect queue), and before writing bytes that a spliced socket
   * delivered to userspace: a socket leaves the sockmap when it closes (e.g. FIN_WAIT2 →
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

/** What a session needs of a relay, userspace or spliced. */
export interface ByteRelay {
  /** Relays until both directions are done (or the relay is stopped); closes both sockets. */
  run(): Promise<RelayEnd>;
  /** Ends the relay now with `reason` (e.g. shutdown); both sockets are closed. */
  stop(reason: RelayEnd): void;
  /** The error behind a reset or error end, for the log. */
  readonly error: unknown;
  /** Bytes client → backend this relay copied itself (not the kernel's). */
  readonly bytesUp: number;
  /** Bytes backend → client this relay copied itself. */
  readonly bytesDown: number;
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
  #timer: ReturnType<typeof setTimeout> | undefined;

  constructor(idleMs: number, splice: SpliceHooks | null, onIdle: () => void) {
    this.#idleMs = idleMs;
    this.#splice = splice;
    this.#onIdle = onIdle;
  }

  /** Starts the timer. */
  start(): void {
    this.#arm(this.#idleMs);
  }

  /** Bytes moved now. */
  touch(): void {
    this.#lastActive = Date.now();
  }

  /** Stops the timer for good. */
  clear(): void {
    clearTimeout(this.#timer);
  }

  #arm(delay: number): void {
    this.#timer = setTimeout(() => {
      if (this.#splice) {
        const spliced = this.#splice.splicedBytes();
        if (spliced !== this.#splicedSeen) {
          this.#splicedSeen = spliced;
          this.#lastActive = Date.now();
        }
      }
      const idleFor = Date.now() - this.#lastActive;
      if (idleFor >= this.#idleMs) this.#onIdle();
      else this.#arm(this.#idleMs - idleFor);
    }, delay);
  }
}

/** A running relay between `client` and `backend`. Both conns are closed when it ends. */
export class Relay implements ByteRelay {
  readonly #client: Deno.Conn;
  readonly #backend: Deno.Conn;
  readonly #splice: SpliceHooks | null;
  readonly #idle: IdleTimer;
  #clientBuffer: Uint8Array | null;
  #end: RelayEnd | null = null;
  #error: unknown = null;
  /** Bytes client → backend copied by this relay. */
  bytesUp = 0;
  /** Bytes backend → client copied by this relay. */
  bytesDown = 0;

  /**
   * `clientBuffer`: a buffer to read the client with (the one the hello was read into), so a
   * new connection allocates one buffer less.
   */
  constructor(
    client: Deno.Conn,
    backend: Deno.Conn,
    idleMs: number,
    splice?: SpliceHooks,
    clientBuffer?: Uint8Array,
  ) {
    this.#clientBuffer = clientBuffer ?? null;
    this.#client = client;
    this.#backend = backend;
    this.#splice = splice ?? null;
    this.#idle = new IdleTimer(idleMs, this.#splice, () => this.#finish("idle_timeout", null));
  }

  /** The error behind a reset or error end, for the log. */
  get error(): unknown {
    return this.#error;
  }

  /** Relays until both directions are done (or the relay is stopped); closes both conns. */
  async run(): Promise<RelayEnd> {
    this.#idle.start();
    await Promise.all([
      this.#pump(this.#client, this.#backend, true),
      this.#pump(this.#backend, this.#client, false),
    ]);
    this.#finish("done", null);
    return this.#end!;
  }

  /** Ends the relay now with `reason` (e.g. shutdown); both conns are closed. */
  stop(reason: RelayEnd): void {
    this.#finish(reason, null);
  }

  #finish(reason: RelayEnd, error: unknown): void {
    if (this.#end !== null) return;
    this.#end = reason;
    this.#error = error;
    this.#idle.clear();
    this.#splice?.release();
    closeQuietly(this.#client);
    closeQuietly(this.#backend);
  }

  /** drainKernel for direction `up`; false (the relay ended) when it did not drain. */
  async #drain(up: boolean, atEof: boolean): Promise<boolean> {
    const userspace = up ? this.bytesUp : this.bytesDown;
    if (await this.#splice!.drainKernel(up, userspace, atEof, () => this.#idle.touch())) {
      return true;
    }
    this.#finish("drain_stalled", new Error("the kernel's queue toward a socket did not drain"));
    return false;
  }

  async #pump(src: Deno.Conn, dst: Deno.Conn, up: boolean): Promise<void> {
    let buf = (up && this.#clientBuffer) || new Uint8Array(INITIAL_BUFFER);
    this.#clientBuffer = null;
    let full = false;
    for (;;) {
      let n: number | null;
      try {
        n = await src.read(buf);
      } catch (e) {
        this.#finish(up ? "client_reset" : "backend_reset", e);
        return;
      }
      if (this.#end !== null) return;
      if (n === null && this.#splice && !this.#splice.eofIsReal(up)) {
        // a false EOF of a spliced socket: wait a moment (it may repeat) and read again
        await new Promise((r) => setTimeout(r, 1));
        continue;
      }
      if (n === null) {
        // EOF: pass the half-close on; the other direction keeps flowing until it ends too
        try {
          if (this.#splice && !(await this.#drain(up, true))) return;
          await (dst as Deno.TcpConn).closeWrite();
        } catch {
          // the peer is already gone; its own direction reports that
        }
        return;
      }
      this.#idle.touch();
      if (this.#splice && !(await this.#drain(up, false))) return;
      if (this.#end !== null) return;
      try {
        await writeAll(dst, buf.subarray(0, n));
      } catch (e) {
        this.#finish(up ? "backend_reset" : "client_reset", e);
        return;
      }
      if (up) this.bytesUp += n;
      else this.bytesDown += n;
      // grow only after two full reads in a row: a TLS handshake flight fills the small buffer
      // once, a bulk transfer keeps filling it; idle connections keep the small one
      if (n === buf.length) {
        if (full && buf.length < MAX_BUFFER) {
          buf = new Uint8Array(Math.min(buf.length * 4, MAX_BUFFER));
          full = false;
        } else full = true;
      } else full = false;
    }
  }
}

/** Closes a conn, ignoring "already closed". */
export function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch {
    // already closed
  }
}
