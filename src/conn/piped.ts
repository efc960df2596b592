/**
 * Kernel mode's default relay: splice(2) moves each direction's bytes socket -> pipe -> socket
 * inside the kernel, so payload never enters the process, and TCP flow control works as in
 * userspace mode: what a slow reader does not take stays in the pipe (at most its capacity,
 * `ebpf.pipe_bytes`) and the socket buffers, and the sender is held back by its closed window.
 *
 * The sockets are the proxy's own (src/io/), watched edge-triggered on its epoll: input, EOF and
 * errors on a source, write space on a destination whose pipe could not be emptied. A pair starts
 * in the userspace relay (src/conn/relay.ts), which hands it over, with what it holds, once a
 * read fills its buffer: a connection that never carries bulk runs the userspace code path, with
 * no pipe and no splice call. Here the direction that went bulk splices; the other one is copied
 * (recv/send) until a read fills the copy buffer too. Pipes come from a small pool and go back to
 * it as soon as they are empty, so an idle connection holds none.
 *
 * @module
 */
import {
  closeFd,
  EAGAIN,
  EINTR,
  Errno,
  errnoName,
  makePipe,
  sendFd,
  shutdownWrite,
  socketError,
  spliceFd,
  strerror,
} from "../../ffi/libc.ts";
import { EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLPRI, EPOLLRDHUP } from "../../ffi/socket.ts";
import { type FdWatcher, socketOf, type SocketPair } from "../io/watch.ts";
import type { TcpSocket } from "../io/tcp.ts";
import { eventLoop } from "../io/loop.ts";
import {
  type ByteRelay,
  type DirectionState,
  endLater,
  IdleTimer,
  type RelayEnd,
  type RelayState,
} from "./relay.ts";
import { logger } from "../ops/log.ts";

const log = logger("piped");

/** A pipe: its read and write ends. */
interface Pipe {
  r: number;
  w: number;
}

/** Pipes for the relays of one process: taken while they hold bytes, kept for reuse. */
export class PipePool {
  readonly #free: Pipe[] = [];
  /** The capacity asked for each pipe. */
  readonly bytes: number;
  /** How many empty pipes are kept for reuse (the rest are closed). */
  readonly #keep: number;

  constructor(bytes: number, keep = 64) {
    this.bytes = bytes;
    this.#keep = keep;
  }

  /** An empty pipe, or the error (e.g. EMFILE) when none can be made. */
  take(): Pipe | Error {
    const p = this.#free.pop();
    if (p) return p;
    const made = makePipe(this.bytes);
    if (typeof made === "number") {
      return new Error(`no pipe for splice(2): ${errnoName(-made)}: ${strerror(-made)}`);
    }
    return { r: made[0], w: made[1] };
  }

  /** When the last shortage was logged (ms); one line per burst. */
  #shortageLogged = 0;

  /** Notes that no pipe could be made (logged once per burst of them). */
  shortage(e: Error): void {
    const now = Date.now();
    if (now - this.#shortageLogged < 10_000) return;
    this.#shortageLogged = now;
    log.warn(`kernel mode: ${e.message}; the connections concerned wait until one frees up`);
  }

  /** Gives back a pipe; `empty`: it holds no byte (otherwise it is closed). */
  give(p: Pipe, empty: boolean): void {
    if (empty && this.#free.length < this.#keep) this.#free.push(p);
    else {
      closeFd(p.r);
      closeFd(p.w);
    }
  }
}

/** One direction of a pair. */
interface Direction {
  /** Client -> backend. */
  up: boolean;
  src: number;
  dst: number;
  pipe: Pipe | null;
  /** Bytes in the pipe now. */
  inPipe: number;
  /** Bytes to write to dst before anything spliced (what the handing-over relay held), and how far it got. */
  prefix: Uint8Array | null;
  prefixOff: number;
  /** The source's EOF was read. */
  eof: boolean;
  /** The EOF was passed on (dst shut down for writing). */
  done: boolean;
  /** Payload bytes delivered to dst (the prefix not counted). */
  bytes: number;
  /** The source got TCP urgent data (EPOLLPRI): splice(2) stops at its mark, recv(2) passes it. */
  urgent: boolean;
  /** The source socket (its readiness as epoll last said). */
  srcSocket: TcpSocket;
  /**
   * The direction carries bulk and moves through a pipe; until then it is copied (recv/send:
   * a short read says the socket is drained, where a short splice does not, so small messages
   * cost no extra call).
   */
  spliced: boolean;
}

/** Reads (copies or splices into a pipe) one direction may do per round of the loop. */
const FILLS_PER_ROUND = 2;

/** What a direction's copies are read into (written on at once, synchronously). */
const copyChunk = new Uint8Array(64 * 1024);
const COPY_LEN = BigInt(copyChunk.length);

/**
 * The relay of a pair whose sockets were taken out of Deno's loop, through splice(2). Ends when
 * both directions passed their EOF on ("done"), on a reset of either socket (the other gets a
 * reset too), idle timeout or stop; closes both conns.
 */
export class PipedRelay implements ByteRelay {
  readonly #pair: SocketPair;
  readonly #pool: PipePool;
  readonly #idle: IdleTimer;
  readonly #upDir: Direction;
  readonly #downDir: Direction;
  /** The watcher's ids of the client's and the backend's fd (-1: not watched). */
  #clientWatch = -1;
  #backendWatch = -1;
  readonly #release: () => void;
  readonly #watcher: FdWatcher;
  #end: RelayEnd | null = null;
  #error: unknown = null;
  #onEnd: ((end: RelayEnd) => void) | null = null;

  /**
   * `resume`: where the userspace relay that handed the pair over stood (the session wrote the
   * hello before that relay started): its bytes waiting, EOFs, and which direction carries bulk
   * (that one splices from the start);
   * `release`: called once as the relay ends, before the sockets close; `watcher`: watches the
   * detached sockets, and its read buffer takes the rare bytes read past an urgent mark.
   */
  constructor(
    pair: SocketPair,
    pool: PipePool,
    opts: {
      idleMs: number;
      resume: RelayState;
      release?: () => void;
      watcher: FdWatcher;
    },
  ) {
    this.#pair = pair;
    this.#watcher = opts.watcher;
    this.#pool = pool;
    this.#release = opts.release ?? (() => {});
    this.#idle = new IdleTimer(opts.idleMs, null, () => this.#finish("idle_timeout", null));
    const dir = (up: boolean, src: number, dst: number, at: DirectionState): Direction => ({
      up,
      src,
      dst,
      pipe: null,
      inPipe: 0,
      prefix: at.pending,
      prefixOff: 0,
      eof: at.eof,
      done: at.done,
      bytes: at.bytes,
      urgent: false,
      srcSocket: socketOf(pair, src),
      spliced: at.bulk,
    });
    this.#upDir = dir(true, pair.clientFd, pair.backendFd, opts.resume.up);
    this.#downDir = dir(false, pair.backendFd, pair.clientFd, opts.resume.down);
  }

  /** Bytes client -> backend the relay delivered (the hello not counted). */
  get bytesUp(): number {
    return this.#upDir.bytes;
  }

  /** Bytes backend -> client the relay delivered. */
  get bytesDown(): number {
    return this.#downDir.bytes;
  }

  get error(): unknown {
    if (this.#error === null && this.#errno !== 0) {
      this.#error = new Error(`${errnoName(this.#errno)}: ${strerror(this.#errno)}`);
    }
    return this.#error;
  }

  get halfClosed(): boolean {
    return this.#upDir.done !== this.#downDir.done;
  }

  /** Never: the session wrote the hello before the pair was handed over. */
  get firstPending(): boolean {
    return false;
  }

  run(onEnd: (end: RelayEnd) => void): void {
    if (this.#end !== null) return endLater(onEnd, this.#end);
    this.#onEnd = onEnd;
    this.#idle.start();
    const { clientFd, backendFd } = this.#pair;
    try {
      // a socket that is readable, writable or at EOF already reports that at once
      this.#clientWatch = this.#watch(clientFd);
      this.#backendWatch = this.#watch(backendFd);
    } catch (e) {
      this.#finish("error", e);
      return;
    }
    // carrying on from the relay that handed the pair over: what either way holds moves at once
    this.#pump(this.#upDir);
    this.#pump(this.#downDir);
  }

  stop(reason: RelayEnd): void {
    this.#finish(reason, null);
  }

  #watch(fd: number): number {
    const events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI;
    return this.#watcher.watch(fd, events, (ev) => this.#onEvent(fd, ev));
  }

  #onEvent(fd: number, events: number): void {
    const input = (events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP | EPOLLPRI)) !== 0;
    if (events & EPOLLPRI) (fd === this.#pair.clientFd ? this.#upDir : this.#downDir).urgent = true;
    const output = (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) !== 0;
    const up = this.#upDir;
    const down = this.#downDir;
    if ((input && up.src === fd) || (output && up.dst === fd)) this.#pump(up);
    if ((input && down.src === fd) || (output && down.dst === fd)) this.#pump(down);
    // a reset of a socket whose own direction already ended (it half-closed earlier) reaches
    // no read: its pending error says so
    if ((events & EPOLLERR) && this.#end === null) {
      const own = fd === this.#pair.clientFd ? this.#upDir : this.#downDir;
      if (own.eof) {
        const err = socketError(fd);
        if (err) this.#retry(-err, fd);
      }
    }
  }

  /** A pipe could not be made (descriptors short): try the direction again shortly. */
  #pipeRetry: ReturnType<typeof setTimeout> | undefined;

  /** A direction used up its share of a round: both are pumped again in the next one. */
  #resumeQueued = false;
  readonly #resume = () => {
    this.#resumeQueued = false;
    this.#pump(this.#upDir);
    this.#pump(this.#downDir);
  };

  #queueResume(): void {
    if (this.#resumeQueued) return;
    this.#resumeQueued = true;
    eventLoop().later(this.#resume);
  }

  /**
   * Moves what can be moved now, up to its share of the round; returns at EAGAIN (an event
   * resumes it), EOF or an error.
   */
  #pump(d: Direction): void {
    for (let fills = 0; this.#end === null && !d.done;) {
      if (d.prefix || d.inPipe > 0) {
        // a pipe woken by write space waits for the next round once this one's bytes are spent,
        // as a fill does: up to a pipe's worth per direction would otherwise go out unbudgeted
        if (d.prefix === null && eventLoop().exhausted) return this.#queueResume();
        if (!this.#deliver(d)) return;
        continue;
      }
      if (d.pipe) {
        this.#pool.give(d.pipe, true);
        d.pipe = null;
      }
      if (d.eof) {
        // everything the source sent was delivered: pass the half-close on
        shutdownWrite(d.dst);
        d.done = true;
        if (this.#upDir.done && this.#downDir.done) this.#finish("done", null);
        return;
      }
      // a bulk transfer whose peers keep up would otherwise hold the loop
      if (++fills > FILLS_PER_ROUND || eventLoop().exhausted) return this.#queueResume();
      if (!this.#fill(d)) return;
    }
  }

  /**
   * Writes some of what `d` holds for its destination: its prefix first, then its pipe's bytes.
   * True: go on; false: wait for an event (or the relay ended).
   */
  #deliver(d: Direction): boolean {
    if (d.prefix) {
      const n = sendFd(d.dst, d.prefix.subarray(d.prefixOff));
      if (n <= 0) return this.#retry(n, d.dst);
      d.prefixOff += n;
      if (d.prefixOff === d.prefix.length) d.prefix = null;
      return true;
    }
    const n = spliceFd(d.pipe!.r, d.dst, d.inPipe);
    if (n <= 0) return this.#retry(n, d.dst);
    d.inPipe -= n;
    d.bytes += n;
    this.#idle.touch();
    // counted as they go out (the costly half: the receiver's TCP runs in this call on loopback)
    eventLoop().spend(n);
    return true;
  }

  /**
   * Takes in what the source has: spliced into a pipe, or read past an urgent mark, or its EOF.
   * True: go on; false: wait for an event or a pipe (or the relay ended).
   */
  #fill(d: Direction): boolean {
    if (!d.spliced) return this.#copy(d);
    const pipe = this.#pool.take();
    if (pipe instanceof Error) {
      // a local shortage is no reason to cut a healthy stream: the bytes wait in the socket
      // (TCP holds the sender back) until a descriptor frees up
      this.#pool.shortage(pipe);
      clearTimeout(this.#pipeRetry);
      this.#pipeRetry = setTimeout(() => {
        for (const dir of [this.#upDir, this.#downDir]) this.#pump(dir);
      }, 20);
      return false;
    }
    d.pipe = pipe;
    const n = spliceFd(d.src, pipe.w, this.#pool.bytes);
    if (n > 0) {
      d.inPipe = n;
      this.#idle.touch();
      return true;
    }
    // splice(2) stops at a TCP urgent mark (returning EAGAIN, or 0 once the FIN came), and
    // so does SIOCINQ: the bytes past the mark are read with recv(2), which steps over it as
    // a userspace relay would, and written like the hello. After urgent data (EPOLLPRI), and
    // before any 0 is taken for the end: one recv per direction and connection
    if (n === 0 || (n === -EAGAIN && d.urgent)) {
      const read = this.#readPastMark(d);
      if (read !== null) return read;
    }
    if (n === 0) return this.#atZero(d);
    if (this.#retry(n, d.src)) return true;
    if (d.pipe) {
      this.#pool.give(d.pipe, true);
      d.pipe = null;
    }
    return false;
  }

  /**
   * Copies what the source has (one read): written on at once, what the destination refuses
   * kept as the prefix. A read that fills the buffer is bulk: the direction moves to splice(2).
   * True: go on; false: wait for an event (or the relay ended).
   */
  #copy(d: Direction): boolean {
    const src = d.srcSocket;
    if (!src.readable) return false;
    const n = src.recv(copyChunk, COPY_LEN);
    if (n > 0) {
      this.#idle.touch();
      eventLoop().spend(n);
      d.bytes += n;
      if (n === copyChunk.length) {
        // bulk: spliced from now on, and this pair's events wait behind new connections'
        d.spliced = true;
        this.#pair.client.bulk = this.#pair.backend.bulk = true;
      }
      // a short read after the peer's FIN took the last bytes: the EOF needs no read of its own
      // (after a reset epoll said error too, and a read stops short at an urgent mark: those
      // read again)
      if (n < copyChunk.length && src.peerClosed && !src.failed && !src.urgent && !d.urgent) {
        d.eof = true;
      }
      const w = sendFd(d.dst, n === copyChunk.length ? copyChunk : copyChunk.subarray(0, n));
      if (w === n) return true;
      if (w < 0 && w !== -EAGAIN && w !== -EINTR) return this.#retry(w, d.dst);
      d.prefix = copyChunk.slice(Math.max(w, 0), n);
      d.prefixOff = 0;
      return true;
    }
    if (n === 0) return this.#atZero(d);
    return this.#retry(n, d.src);
  }

  /** A read of 0 bytes: a reset (its pending error) or the EOF. */
  #atZero(d: Direction): boolean {
    // a reset socket reads 0 bytes too: its pending error tells a reset from an EOF (epoll
    // said error then: a clean EOF costs no getsockopt)
    const err = d.srcSocket.failed ? socketError(d.src) : 0;
    if (err) {
      this.#retry(-err, d.src);
      return false;
    }
    d.eof = true;
    return true;
  }

  /**
   * One recv(2) of the source, its (empty) pipe given back when it returns anything: true, bytes
   * read (`d`'s prefix now); false, a reset (the relay ended); null, nothing to read.
   */
  #readPastMark(d: Direction): boolean | null {
    const got = this.#watcher.recv(d.src);
    if (typeof got !== "number") {
      this.#pool.give(d.pipe!, true);
      d.pipe = null;
      d.prefix = got;
      d.prefixOff = 0;
      d.bytes += got.length;
      this.#idle.touch();
      return true;
    }
    if (got < 0 && got !== -EAGAIN && got !== -EINTR) {
      // the read took the socket's pending error (a reset): report it, not an EOF
      this.#pool.give(d.pipe!, true);
      d.pipe = null;
      this.#retry(got, d.src);
      return false;
    }
    return null;
  }

  /** After a failed call on `fd`: true to try again now (EINTR); false to wait or stop. */
  #retry(n: number, fd: number): boolean {
    if (n === -EINTR) return true;
    if (n === -EAGAIN) return false;
    // a reset (or a write to a socket whose peer is gone): the side it happened on
    const clientSide = fd === this.#pair.clientFd;
    if (n === -Errno.ECONNRESET || n === -Errno.EPIPE) this.#resetFd = fd;
    // the error itself is made only if asked for (the access log): most never are
    if (this.#end === null) this.#errno = -n;
    this.#finish(clientSide ? "client_reset" : "backend_reset", null);
    return false;
  }

  /** The errno behind a reset end (0: none). */
  #errno = 0;

  /** The socket its peer reset (ECONNRESET, EPIPE): closed for the kernel already. */
  #resetFd = -1;

  #finish(reason: RelayEnd, error: unknown): void {
    if (this.#end !== null) return;
    this.#end = reason;
    this.#error = error;
    this.#idle.clear();
    clearTimeout(this.#pipeRetry);
    this.#release();
    const { clientFd, backendFd } = this.#pair;
    if (this.#clientWatch >= 0) this.#watcher.unwatch(this.#clientWatch, clientFd);
    if (this.#backendWatch >= 0) this.#watcher.unwatch(this.#backendWatch, backendFd);
    for (const d of [this.#upDir, this.#downDir]) {
      if (d.pipe) this.#pool.give(d.pipe, d.inPipe === 0);
      d.pipe = null;
    }
    // a peer's reset, or a cut by the proxy, reaches the other side as a reset, never a FIN;
    // the socket that was reset is closed already, for the kernel: a plain close will do
    for (const sock of [this.#pair.client, this.#pair.backend]) {
      if (reason === "done" || sock.fd === this.#resetFd) sock.close();
      else sock.reset();
    }
    if (this.#onEnd) endLater(this.#onEnd, reason);
  }
}
