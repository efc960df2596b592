/**
 * The relay of a spliced pair, outside Deno's event loop.
 *
 * Once the kernel redirects a pair's bytes, userspace only has to see each socket's EOF, a reset,
 * and the rare bytes the kernel hands to userspace instead (a socket leaving the sockmap as it
 * closes). Watched for write space too, the sockets would wake the process for every change of
 * it that the kernel's redirects cause (tens of thousands a second under load), so the relay
 * watches them (on the proxy's own epoll, src/io/) for input, EOF and errors only.
 *
 * @module
 */
import {
  EAGAIN,
  EINTR,
  Errno,
  errnoName,
  sendFd,
  shutdownWrite,
  socketError,
  strerror,
  tcpState,
} from "../../ffi/libc.ts";
import { EPOLLIN, EPOLLRDHUP } from "../../ffi/socket.ts";
import { type FdWatcher, socketOf, type SocketPair } from "../io/watch.ts";
import { afterPeerFin } from "./tcpinfo.ts";
import { type ByteRelay, endLater, IdleTimer, type RelayEnd, type SpliceHooks } from "./relay.ts";

/** One socket of the pair and the direction it is the source of. */
interface Side {
  fd: number;
  /** The source of the client -> backend direction. */
  up: boolean;
  id: number;
  /** Its EOF was read: from now on only a reset matters. */
  eof: boolean;
  /** Its EOF was passed on (the peer socket half-closed). */
  passed: boolean;
  /** An event is being served; another one arriving meanwhile sets `again`. */
  busy: boolean;
  again: boolean;
  /** Re-read after a false EOF (a sockmap socket can read 0 bytes without the peer's FIN). */
  retry: ReturnType<typeof setTimeout> | undefined;
  retryMs: number;
}

/** What a {@link SplicedRelay} is made with. */
export interface SplicedRelayOptions {
  /** The idle timeout (`timeouts.idle_ms`). */
  idleMs: number;
  /** The session's side of the kernel pairing. */
  hooks: SpliceHooks;
  /** What to write to the backend first (the hello, after any PROXY header). */
  first: Uint8Array;
  /** Watches the detached sockets; the relay reads them into its read buffer. */
  watcher: FdWatcher;
}

/**
 * Relay of a spliced pair whose sockets were taken out of Deno's epoll set ({@link detachSockets}):
 * the kernel moves the bytes; this passes on EOF (after the peer socket took every redirected
 * byte), ends on a reset, writes what the kernel handed to userspace, and closes both conns.
 */
export class SplicedRelay implements ByteRelay {
  readonly #pair: SocketPair;
  readonly #hooks: SpliceHooks;
  readonly #watcher: FdWatcher;
  readonly #idle: IdleTimer;
  readonly #client: Side;
  readonly #backend: Side;
  #first: Uint8Array | null;
  /** The first bytes are not all in the backend's socket yet. */
  #firstPending = true;
  #end: RelayEnd | null = null;
  #error: unknown = null;
  #onEnd: ((end: RelayEnd) => void) | null = null;
  bytesUp = 0;
  bytesDown = 0;

  constructor(pair: SocketPair, options: SplicedRelayOptions) {
    const { idleMs, hooks, first, watcher } = options;
    this.#pair = pair;
    this.#first = first;
    this.#hooks = hooks;
    this.#watcher = watcher;
    this.#idle = new IdleTimer(idleMs, hooks, () => this.#finish("idle_timeout", null));
    const side = (fd: number, up: boolean): Side => ({
      fd,
      up,
      id: 0,
      eof: false,
      passed: false,
      busy: false,
      again: false,
      retry: undefined,
      retryMs: 1,
    });
    this.#client = side(pair.clientFd, true);
    this.#backend = side(pair.backendFd, false);
  }

  get error(): unknown {
    return this.#error;
  }

  get halfClosed(): boolean {
    return this.#client.passed !== this.#backend.passed;
  }

  get firstPending(): boolean {
    return this.#firstPending;
  }

  run(onEnd: (end: RelayEnd) => void): void {
    if (this.#end !== null) return endLater(onEnd, this.#end);
    this.#onEnd = onEnd;
    this.#idle.start();
    try {
      for (const s of [this.#client, this.#backend]) {
        // a socket that is already readable or at EOF reports that at once
        // no EPOLLOUT: the write-space wakeups the kernel's redirects cause are what this avoids
        s.id = this.#watcher.watch(s.fd, EPOLLIN | EPOLLRDHUP, () => this.#onEvent(s));
      }
    } catch (e) {
      this.#finish("error", e);
      return;
    }
    // the hello is the session's bytes, not the relay's: not counted in bytesUp
    const first = this.#first!;
    this.#first = null;
    // most often taken whole at once: no promise for it then
    const sent = sendFd(this.#backend.fd, first);
    if (sent === first.length) this.#firstPending = false;
    else {
      this.#write(this.#backend, sent > 0 ? first.subarray(sent) : first, false).then(
        () => this.#firstPending = false,
        (e) => this.#finish("error", e),
      );
    }
  }

  stop(reason: RelayEnd): void {
    this.#finish(reason, null);
  }

  #onEvent(s: Side): void {
    if (this.#end !== null) return;
    if (s.busy) {
      s.again = true;
      return;
    }
    s.busy = true;
    this.#serve(s).catch((e) => this.#finish("error", e)).finally(() => {
      s.busy = false;
      // an event that came after the last read but before this point is served now: with
      // edge-triggered epoll it would not come again
      if (s.again) this.#onEvent(s);
    });
  }

  async #serve(s: Side): Promise<void> {
    const peer = s === this.#client ? this.#backend : this.#client;
    do {
      s.again = false;
      clearTimeout(s.retry);
      if (s.eof) {
        // after EOF only a reset matters (the other direction may still be flowing), and epoll
        // reports it as an error
        if (!socketOf(this.#pair, s.fd).failed) return;
        const err = socketError(s.fd);
        if (err) this.#reset(s, err);
        return;
      }
      for (;;) {
        if (this.#end !== null) return;
        const got = this.#watcher.recv(s.fd);
        if (typeof got !== "number") {
          s.retryMs = 1;
          this.#idle.touch();
          // bytes the kernel passed to userspace must not overtake redirected ones
          if (!(await this.#drain(s, false))) return;
          if (!(await this.#write(peer, got))) return;
          continue;
        }
        if (got === 0) {
          if (!this.#realEof(s)) {
            if (this.#end !== null) return;
            s.retry = setTimeout(() => this.#onEvent(s), s.retryMs);
            s.retryMs = Math.min(s.retryMs * 2, 100);
            break;
          }
          await this.#passEof(s, peer);
          break; // an event that came meanwhile (a reset) is served by the EOF branch
        }
        if (got === -EINTR) continue;
        if (got === -EAGAIN) break;
        this.#reset(s, -got);
        return;
      }
    } while (s.again && this.#end === null);
  }

  /**
   * After a read of 0 bytes: true for the peer's FIN. False for a reset (the relay ended) and
   * for a false EOF (a sockmap socket can read 0 bytes without the peer's FIN; read again
   * later). epoll said which, mostly: a socket that reported the FIN (EPOLLRDHUP) and no error
   * costs no syscall here.
   */
  #realEof(s: Side): boolean {
    const sock = socketOf(this.#pair, s.fd);
    // a reset socket in a sockmap reads 0 bytes too: its pending error tells them apart
    if (sock.failed || !sock.peerClosed) {
      const err = socketError(s.fd);
      if (err) {
        this.#reset(s, err);
        return false;
      }
    }
    if (sock.peerClosed) return true;
    // a 0-byte read of a sockmap socket is an EOF only after the peer's FIN
    const state = tcpState(s.fd);
    return state < 0 || afterPeerFin(state);
  }

  /** `from` is at EOF: once its peer took every redirected byte, half-close the peer. */
  async #passEof(from: Side, to: Side): Promise<void> {
    from.eof = true;
    if (!(await this.#drain(from, true))) return;
    // the relay may have ended while the drain's answer came back (a reset of the other side):
    // its sockets are closed then, and their fd numbers may be a new connection's already
    if (this.#end !== null) return;
    // fails only when the peer is gone already; its own events report that
    shutdownWrite(to.fd);
    from.passed = true;
    if (to.passed) this.#finish("done", null);
  }

  /** drainKernel for the direction `from` is the source of; false: the relay ended. */
  async #drain(from: Side, atEof: boolean): Promise<boolean> {
    const userspace = from.up ? this.bytesUp : this.bytesDown;
    if (await this.#hooks.drainKernel(from.up, userspace, atEof, () => this.#idle.touch())) {
      return this.#end === null;
    }
    this.#finish("drain_stalled", new Error("the kernel's queue toward a socket did not drain"));
    return false;
  }

  /** Writes all of `bytes` to `to` (and counts them); false when the relay ended meanwhile. */
  async #write(to: Side, bytes: Uint8Array, count = true): Promise<boolean> {
    let off = 0;
    let delay = 1;
    while (off < bytes.length) {
      if (this.#end !== null) return false;
      const n = sendFd(to.fd, bytes.subarray(off));
      if (n >= 0) {
        off += n;
        continue;
      }
      if (n === -EINTR) continue;
      if (n !== -EAGAIN) {
        this.#reset(to, -n);
        return false;
      }
      // the socket's send buffer is full: this path is rare, so poll rather than watch EPOLLOUT
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 50);
    }
    if (!count) return true;
    if (to.up) this.bytesDown += bytes.length;
    else this.bytesUp += bytes.length;
    return true;
  }

  #reset(s: Side, code: number): void {
    if (code === Errno.ECONNRESET || code === Errno.EPIPE) this.#resetFd = s.fd;
    this.#finish(
      s.up ? "client_reset" : "backend_reset",
      new Error(`${errnoName(code)}: ${strerror(code)}`),
    );
  }

  /** The socket its peer reset (ECONNRESET, EPIPE): closed for the kernel already. */
  #resetFd = -1;

  #finish(reason: RelayEnd, error: unknown): void {
    if (this.#end !== null) return;
    this.#end = reason;
    this.#error = error;
    this.#idle.clear();
    this.#hooks.release();
    for (const s of [this.#client, this.#backend]) {
      clearTimeout(s.retry);
      if (s.id) this.#watcher.unwatch(s.id, s.fd);
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
