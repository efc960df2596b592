/**
 * A connected pair of the proxy's own sockets, and the watcher the kernel relays (splice(2) and
 * sockmap) serve them through: it points the sockets' events at the relay and changes what they
 * are watched for (a sockmap pair must not wake the process for write space).
 *
 * @module
 */
import { EPOLLERR, EPOLLET, EPOLLHUP, EPOLLIN } from "../../ffi/socket.ts";
import type { EventLoop } from "./loop.ts";
import { CONN_EVENTS, type TcpSocket } from "./tcp.ts";

/** A session's client and backend sockets, and their fds. */
export interface SocketPair {
  client: TcpSocket;
  backend: TcpSocket;
  clientFd: number;
  backendFd: number;
}

/** The pair of `client` and `backend`. */
export function socketPair(client: TcpSocket, backend: TcpSocket): SocketPair {
  return { client, backend, clientFd: client.fd, backendFd: backend.fd };
}

/** The socket of `pair` with fd `fd`. */
export function socketOf(pair: SocketPair, fd: number): TcpSocket {
  return fd === pair.clientFd ? pair.client : pair.backend;
}

/** How a kernel relay watches its pair's fds. */
export interface FdWatcher {
  /** Calls `onEvent(events)` for `fd`'s `events` (edge-triggered); returns an id for unwatch. */
  watch(fd: number, events: number, onEvent: (events: number) => void): number;
  /** Stops calling the handler of `fd`. */
  unwatch(id: number, fd: number): void;
  /** One recv(2) of `fd` (up to 64 KiB): a copy of the bytes read, or 0 at EOF, or -errno. */
  recv(fd: number): Uint8Array | number;
}

/** What {@link PairWatcher.recv} reads into: a copy leaves it, so it is never shared. */
const readBuffer = new Uint8Array(64 * 1024);
const READ_LEN = BigInt(readBuffer.length);

/** The {@link FdWatcher} of one pair's sockets on the process's loop. */
export class PairWatcher implements FdWatcher {
  readonly #loop: EventLoop;
  readonly #pair: SocketPair;

  constructor(loop: EventLoop, pair: SocketPair) {
    this.#loop = loop;
    this.#pair = pair;
  }

  watch(fd: number, events: number, onEvent: (events: number) => void): number {
    const sock = socketOf(this.#pair, fd);
    // a socket is on epoll for everything already: only a narrower set needs a call, and not
    // before an event the handler did not ask for comes (most short connections never see
    // one: two epoll_ctl calls spared per connection)
    if ((events | EPOLLET) === CONN_EVENTS) {
      sock.setHandler(onEvent);
      return fd + 1;
    }
    const wanted = events | EPOLLERR | EPOLLHUP;
    let narrowed = false;
    const handler = (ev: number) => {
      if (!narrowed && (ev & ~wanted) !== 0) {
        narrowed = true;
        // a failure leaves the socket watched for more: wakeups for nothing, no harm
        this.#loop.modify(fd, events | EPOLLET);
      }
      if (ev & wanted) onEvent(ev);
    };
    sock.setHandler(handler);
    // input that came before (edge-triggered: reported once, to the previous handler) is
    // served in the next round, as the epoll_ctl would have reported it again
    if (sock.readable) {
      this.#loop.later(() => {
        if (!sock.closed && sock.handler === handler) onEvent(EPOLLIN);
      });
    }
    return fd + 1;
  }

  unwatch(_id: number, fd: number): void {
    socketOf(this.#pair, fd).setHandler(null);
  }

  recv(fd: number): Uint8Array | number {
    const n = socketOf(this.#pair, fd).recv(readBuffer, READ_LEN);
    return n > 0 ? readBuffer.slice(0, n) : n;
  }
}
