/**
 * The relay of a spliced pair, outside Deno's event loop.
 *
 * Once the kernel redirects a pair's bytes, userspace only has to see each socket's EOF, a reset,
 * and the rare bytes the kernel hands to userspace instead (a socket leaving the sockmap as it
 * closes). Left in Deno's epoll set, the sockets would still wake the process for every
 * write-space change the kernel's redirects cause (tens of thousands a second under load), so
 * the pair's sockets are taken out of Deno's epoll set (the conns stay open: closing one shuts
 * its socket down), and one epoll instance per process, waited on off the JS thread, watches
 * them for input, EOF and errors only.
 *
 * Deno has no supported API for a conn's fd or its epoll instance. The fd of an accepted conn is
 * its internal `Deno.internal.fd` property; a connected one has none, so its fd is searched for.
 * An fd is trusted only when its socket has the cookie the sockhash holds for that 4-tuple, and
 * Deno's epoll instance is the one whose /proc fdinfo lists the client's fd. When any of that
 * fails the pair stays with the userspace {@link Relay}, which handles spliced pairs too.
 *
 * @module
 */
import {
  EAGAIN,
  EINTR,
  Epoll,
  epollDelete,
  EPOLLET,
  EPOLLIN,
  EPOLLRDHUP,
  errnoName,
  lowestFreeFd,
  recvFd,
  resetOnClose,
  sendFd,
  shutdownWrite,
  socketCookie,
  socketError,
  strerror,
  tcpState,
} from "../ffi/libc.ts";
import { afterPeerFin } from "./tcpinfo.ts";
import {
  type ByteRelay,
  closeQuietly,
  IdleTimer,
  type RelayEnd,
  type SpliceHooks,
} from "./relay.ts";
import { logger } from "./log.ts";

const log = logger("spliced");

/** A spliced pair's conns and their fds, out of Deno's epoll set. */
export interface DetachedPair {
  client: Deno.TcpConn;
  backend: Deno.TcpConn;
  clientFd: number;
  backendFd: number;
}

let fdSymbol: symbol | null | undefined;

/** Deno's fd of a conn (an internal property), or null when it has none. */
function denoFd(conn: Deno.TcpConn): number | null {
  if (fdSymbol === undefined) {
    fdSymbol = Object.getOwnPropertySymbols(conn).find((s) =>
      s.description === "Deno.internal.fd"
    ) ?? null;
  }
  if (!fdSymbol) return null;
  const fd = (conn as unknown as Record<symbol, unknown>)[fdSymbol];
  return typeof fd === "number" && fd >= 0 ? fd : null;
}

/** How many fds around a hint {@link findSocketFd} tries (each try is one getsockopt). */
const FD_SEARCH_SPAN = 4096;

/**
 * The fd the backend socket of a connect started right now will most likely get: the lowest
 * free one (no other fd is opened in between on this thread). Taken right before Deno.connect,
 * it lets {@link detachSockets} find that socket's fd at the first try.
 */
export function backendFdHint(): number {
  return lowestFreeFd();
}

/** The fd of this process whose socket has `cookie`, searched outwards from `near`; or null. */
function findSocketFd(cookie: bigint, near: number): number | null {
  if (socketCookie(near) === cookie) return near;
  for (let d = 1; d <= FD_SEARCH_SPAN / 2; d++) {
    if (socketCookie(near + d) === cookie) return near + d;
    if (near - d >= 0 && socketCookie(near - d) === cookie) return near - d;
  }
  return null;
}

let denoEpoll: number | null | undefined;

/** The fd of the epoll instance Deno's runtime registered `fd` with, or null. */
function findDenoEpoll(fd: number): number | null {
  const watches = new RegExp(`^tfd:\\s+${fd}\\s`, "m");
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    const n = Number(entry.name);
    try {
      if (Deno.readLinkSync(`/proc/self/fd/${n}`) !== "anon_inode:[eventpoll]") continue;
      if (watches.test(Deno.readTextFileSync(`/proc/self/fdinfo/${n}`))) return n;
    } catch {
      // closed meanwhile
    }
  }
  return null;
}

/**
 * Takes a spliced pair's sockets out of Deno's epoll set, so their traffic no longer wakes the
 * process, and returns their fds; or returns why it cannot (nothing changed then). The conns
 * stay open (closing one would shut its socket down) and must see no further read or write:
 * the {@link SplicedRelay} serves the fds and closes the conns. `cookies`: the sockets' cookies
 * as the sockhash holds them, which is how each fd is verified to be the paired socket.
 */
export function detachSockets(
  client: Deno.TcpConn,
  backend: Deno.TcpConn,
  cookies: { a: bigint; b: bigint },
  backendFdHint: number,
): DetachedPair | string {
  const clientFd = denoFd(client);
  if (clientFd === null) return "this Deno exposes no socket fd";
  if (socketCookie(clientFd) !== cookies.a) return "the fd Deno reports is not the paired socket";
  // Deno keeps no fd for the conns Deno.connect makes: find the backend socket's by its cookie,
  // from the hint outwards (or the client's fd: both were opened moments apart)
  const backendFd = denoFd(backend) ??
    findSocketFd(cookies.b, backendFdHint >= 0 ? backendFdHint : clientFd);
  if (backendFd === null) return "the backend socket's fd was not found";
  if (denoEpoll === undefined) denoEpoll = findDenoEpoll(clientFd);
  if (denoEpoll === null) return "Deno's epoll instance was not found";
  const del = epollDelete(denoEpoll, clientFd);
  if (del !== 0) return `epoll_ctl(DEL) of the client socket: ${errnoName(-del)}`;
  epollDelete(denoEpoll, backendFd);
  return { client, backend, clientFd, backendFd };
}

/** How long one epoll wait may block; the watcher stops when nothing is watched after one. */
const WAIT_MS = 250;

/** The process's one epoll instance for spliced sockets, and who gets each event. */
class SpliceWatcher {
  #epoll: Epoll | null = null;
  readonly #handlers = new Map<number, () => void>();
  #nextId = 1;
  #running = false;

  /** Calls `onEvent` whenever `fd` may have input, EOF or an error (edge-triggered). */
  watch(fd: number, onEvent: () => void): number {
    this.#epoll ??= new Epoll();
    const id = this.#nextId++;
    // no EPOLLOUT: the write-space wakeups are what this is for avoiding
    this.#epoll.add(fd, EPOLLIN | EPOLLRDHUP | EPOLLET, id);
    this.#handlers.set(id, onEvent);
    if (!this.#running) this.#loop();
    return id;
  }

  /** Stops watching `fd` (before it is closed). */
  unwatch(id: number, fd: number): void {
    if (!this.#handlers.delete(id)) return;
    this.#epoll?.delete(fd);
  }

  async #loop(): Promise<void> {
    this.#running = true;
    try {
      while (this.#handlers.size > 0) {
        await this.#epoll!.wait(WAIT_MS, (id) => this.#handlers.get(id)?.());
      }
    } catch (e) {
      // spliced sessions then end by their idle timeout; new ones start the watcher again
      log.error(`the spliced-socket watcher stopped: ${(e as Error).message}`);
    } finally {
      this.#running = false;
    }
  }
}

const watcher = new SpliceWatcher();

/** One socket of the pair and the direction it is the source of. */
interface Side {
  fd: number;
  /** The source of the client → backend direction. */
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

/** Read buffer of every spliced relay: bytes are copied out of it before anything awaits. */
const scratch = new Uint8Array(64 * 1024);

/**
 * Relay of a spliced pair whose sockets were taken out of Deno's epoll set ({@link detachSockets}):
 * the kernel moves the bytes; this passes on EOF (after the peer socket took every redirected
 * byte), ends on a reset, writes what the kernel handed to userspace, and closes both conns.
 */
export class SplicedRelay implements ByteRelay {
  readonly #pair: DetachedPair;
  readonly #hooks: SpliceHooks;
  readonly #idle: IdleTimer;
  readonly #client: Side;
  readonly #backend: Side;
  #first: Uint8Array | null;
  #end: RelayEnd | null = null;
  #error: unknown = null;
  #done: (end: RelayEnd) => void = () => {};
  bytesUp = 0;
  bytesDown = 0;

  /** `first`: what to write to the backend first (the hello, after any PROXY header). */
  constructor(pair: DetachedPair, idleMs: number, hooks: SpliceHooks, first: Uint8Array) {
    this.#pair = pair;
    this.#first = first;
    this.#hooks = hooks;
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

  run(): Promise<RelayEnd> {
    const ended = new Promise<RelayEnd>((resolve) => this.#done = resolve);
    if (this.#end !== null) return Promise.resolve(this.#end);
    this.#idle.start();
    try {
      for (const s of [this.#client, this.#backend]) {
        // a socket that is already readable or at EOF reports that at once
        s.id = watcher.watch(s.fd, () => this.#onEvent(s));
      }
    } catch (e) {
      this.#finish("error", e);
      return ended;
    }
    // the hello is the session's bytes, not the relay's: not counted in bytesUp
    const first = this.#first!;
    this.#first = null;
    this.#write(this.#backend, first, false).catch((e) => this.#finish("error", e));
    return ended;
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
        // after EOF only a reset matters (the other direction may still be flowing)
        const err = socketError(s.fd);
        if (err) this.#reset(s, err);
        return;
      }
      for (;;) {
        if (this.#end !== null) return;
        const n = recvFd(s.fd, scratch);
        if (n > 0) {
          s.retryMs = 1;
          const bytes = scratch.slice(0, n);
          this.#idle.touch();
          // bytes the kernel passed to userspace must not overtake redirected ones
          if (!(await this.#drain(s, false))) return;
          if (!(await this.#write(peer, bytes))) return;
          this.#hooks.relayed(s.up, s.up ? this.bytesUp : this.bytesDown);
          continue;
        }
        if (n === 0) {
          // a reset socket in a sockmap reads 0 bytes too: its pending error tells them apart
          const err = socketError(s.fd);
          if (err) {
            this.#reset(s, err);
            return;
          }
          // a 0-byte read of a sockmap socket is an EOF only after the peer's FIN
          // and only once every byte the kernel passed to userspace was read
          const state = tcpState(s.fd);
          if (
            (state >= 0 && !afterPeerFin(state)) ||
            this.#hooks.passedPending(s.up, s.up ? this.bytesUp : this.bytesDown)
          ) {
            s.retry = setTimeout(() => this.#onEvent(s), s.retryMs);
            s.retryMs = Math.min(s.retryMs * 2, 100);
            break;
          }
          await this.#passEof(s, peer);
          break; // an event that came meanwhile (a reset) is served by the EOF branch
        }
        if (n === -EINTR) continue;
        if (n === -EAGAIN) {
          // bytes a throttled direction passed to userspace can reach the socket without a
          // wakeup (the kernel moves them from its backlog when the receive buffer has room):
          // while any are due, look again shortly
          if (this.#hooks.passedPending(s.up, s.up ? this.bytesUp : this.bytesDown)) {
            s.retry = setTimeout(() => this.#onEvent(s), s.retryMs);
            s.retryMs = Math.min(s.retryMs * 2, 20);
          }
          break;
        }
        this.#reset(s, -n);
        return;
      }
    } while (s.again && this.#end === null);
  }

  /** `from` is at EOF: once its peer took every redirected byte, half-close the peer. */
  async #passEof(from: Side, to: Side): Promise<void> {
    from.eof = true;
    if (!(await this.#drain(from, true))) return;
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
    this.#finish(
      s.up ? "client_reset" : "backend_reset",
      new Error(`${errnoName(code)}: ${strerror(code)}`),
    );
  }

  #finish(reason: RelayEnd, error: unknown): void {
    if (this.#end !== null) return;
    this.#end = reason;
    this.#error = error;
    this.#idle.clear();
    this.#hooks.release();
    for (const s of [this.#client, this.#backend]) {
      clearTimeout(s.retry);
      if (s.id) watcher.unwatch(s.id, s.fd);
      // a cut stream ends with a reset on both sides, never a FIN a peer could take for the end
      if (reason !== "done") resetOnClose(s.fd);
    }
    // Deno closes the fds (its epoll no longer has them: its removal finds nothing, harmlessly)
    closeQuietly(this.#pair.client);
    closeQuietly(this.#pair.backend);
    this.#done(reason);
  }
}
