/**
 * Taking a pair's sockets out of Deno's event loop, and the process's own epoll that watches
 * them instead (waited on off the JS thread), for the relays whose bytes the kernel moves
 * (src/conn/spliced.ts: sockmap; src/conn/piped.ts: splice(2)).
 *
 * Deno has no supported API for a conn's fd or its epoll instance. The fd of an accepted conn is
 * its internal `Deno.internal.fd` property; a connected one has none, so its fd is searched for
 * around a hint. An fd is trusted only when it passes the caller's check (the sockhash's socket
 * cookie, or the conn's ports), and Deno's epoll instance is the one whose /proc fdinfo lists
 * the client's fd. When any of that fails the pair stays with the userspace relay.
 *
 * @module
 */
import { Epoll, epollDelete, EPOLLET, errnoName, lowestFreeFd, recvFd } from "../../ffi/libc.ts";
import { logger } from "../ops/log.ts";

const log = logger("detach");

/** A pair's conns and their fds, out of Deno's epoll set. */
export interface DetachedPair {
  client: Deno.TcpConn;
  backend: Deno.TcpConn;
  clientFd: number;
  backendFd: number;
}

/** The symbol Deno keys a conn's fd by: the runtime's, so looked up once per process. */
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

/** How many fds around a hint {@link findFd} tries (each try is one getsockopt or two). */
const FD_SEARCH_SPAN = 4096;

/**
 * The fd the backend socket of a connect started right now will most likely get: the lowest
 * free one (no other fd is opened in between on this thread). Taken right before Deno.connect,
 * it lets {@link detachSockets} find that socket's fd at the first try.
 */
export function backendFdHint(): number {
  return lowestFreeFd();
}

/** The fd of this process that passes `isIt`, searched outwards from `near`; or null. */
function findFd(isIt: (fd: number) => boolean, near: number): number | null {
  if (isIt(near)) return near;
  for (let d = 1; d <= FD_SEARCH_SPAN / 2; d++) {
    if (isIt(near + d)) return near + d;
    if (near - d >= 0 && isIt(near - d)) return near - d;
  }
  return null;
}

/** Deno's epoll instance: its runtime has one per process, so it is found once. */
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

/** How a candidate fd is checked to be the client's or the backend's socket. */
export interface SocketCheck {
  client(fd: number): boolean;
  backend(fd: number): boolean;
}

/**
 * Takes a pair's sockets out of Deno's epoll set, so their traffic no longer wakes the process,
 * and returns their fds; or returns why it cannot (nothing changed then). The conns stay open
 * (closing one would shut its socket down) and must see no further read or write: the relay
 * serves the fds and closes the conns.
 */
export function detachSockets(
  client: Deno.TcpConn,
  backend: Deno.TcpConn,
  check: SocketCheck,
  backendFdHint: number,
): DetachedPair | string {
  const clientFd = denoFd(client);
  if (clientFd === null) return "this Deno exposes no socket fd";
  if (!check.client(clientFd)) return "the fd Deno reports is not the client's socket";
  // Deno keeps no fd for the conns Deno.connect makes: find the backend socket's, from the hint
  // outwards (or the client's fd: both were opened moments apart)
  const known = denoFd(backend);
  const backendFd = known !== null && check.backend(known)
    ? known
    : findFd(check.backend, backendFdHint >= 0 ? backendFdHint : clientFd);
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

/** The most one {@link FdWatcher.recv} reads. */
const READ_BUFFER_BYTES = 64 * 1024;

/** An epoll instance for detached sockets, waited on off the JS thread, and who gets each event. */
export class FdWatcher {
  #epoll: Epoll | null = null;
  /**
   * What {@link recv} reads into. One is enough because it never leaves this class: handlers
   * get a copy, so no await can let another connection's read overwrite their bytes.
   */
  readonly #readBuffer = new Uint8Array(READ_BUFFER_BYTES);
  readonly #handlers = new Map<number, (events: number) => void>();
  #nextId = 1;
  #running = false;

  /**
   * One recv(2) of `fd` (up to 64 KiB): a copy of the bytes read, or the result of
   * {@link recvFd} when it read none (0: EOF, -errno).
   */
  recv(fd: number): Uint8Array | number {
    const n = recvFd(fd, this.#readBuffer);
    return n > 0 ? this.#readBuffer.slice(0, n) : n;
  }

  /**
   * Calls `onEvent(events)` whenever `fd` reports one of `events` (edge-triggered: the handler
   * must read or write until EAGAIN).
   */
  watch(fd: number, events: number, onEvent: (events: number) => void): number {
    this.#epoll ??= new Epoll();
    const id = this.#nextId++;
    this.#epoll.add(fd, events | EPOLLET, id);
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
        await this.#epoll!.wait(WAIT_MS, (id, events) => {
          // one failing handler must not cost the others their (edge-triggered) events
          try {
            this.#handlers.get(id)?.(events);
          } catch (e) {
            log.error(`a detached-socket handler failed: ${(e as Error).message}`);
          }
        });
      }
    } catch (e) {
      // their sessions then end by their idle timeout; new ones start the watcher again
      log.error(`the detached-socket watcher stopped: ${(e as Error).message}`);
    } finally {
      this.#running = false;
    }
  }
}

/**
 * The process's watcher of detached sockets: one per process, as each one's wait holds a thread
 * of Deno's blocking pool for as long as it watches anything.
 */
export const watcher: FdWatcher = new FdWatcher();
