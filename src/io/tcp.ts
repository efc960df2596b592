/**
 * TCP sockets the proxy owns: listening sockets that accept in batches, accepted and connected
 * sockets watched edge-triggered on the process's {@link EventLoop}.
 *
 * A socket is added to the loop once, for input, output and the peer's FIN (edge-triggered), so
 * no epoll_ctl is needed while it lives; it keeps what epoll said (`readable`, `writable`) until
 * a call finds otherwise (EAGAIN, or a short read or write). Calls return numbers (bytes, 0 at
 * EOF, -errno), never throw, and cost one syscall each.
 *
 * @module
 */
import {
  AF_INET,
  AF_INET6,
  closeFd,
  E,
  EPOLLERR,
  EPOLLET,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  EPOLLPRI,
  EPOLLRDHUP,
  getIntOption,
  IPPROTO_IPV6,
  IPPROTO_TCP,
  IPV6_V6ONLY,
  lastErrno,
  MSG_NOSIGNAL,
  rcOrErrno,
  setIntOption,
  setLingerZero,
  SHUT_WR,
  SO_ERROR,
  SO_REUSEADDR,
  SO_REUSEPORT,
  SOCK_CLOEXEC,
  SOCK_NONBLOCK,
  SOCK_STREAM,
  SOL_SOCKET,
  sys,
  TCP_NODELAY,
} from "../../ffi/socket.ts";
import { strerror } from "../../ffi/libc.ts";
import type { EventLoop, IoHandler } from "./loop.ts";
import {
  decodeSockaddr,
  encodeSockaddr,
  isV6,
  localAddrOf,
  type NetAddr,
  SOCKADDR_SIZE,
} from "./sockaddr.ts";

/** A failed socket call, shaped like Deno's errors: `code` (`ECONNREFUSED`) and the os error. */
export class SocketError extends Error {
  readonly errno: number;
  readonly code: string;
  constructor(op: string, errno: number, code: string) {
    super(`${op}: ${strerror(errno)} [${code}] (os error ${errno})`);
    this.name = errno === E.ECONNREFUSED
      ? "ConnectionRefused"
      : errno === E.ECONNRESET
      ? "ConnectionReset"
      : "SocketError";
    this.errno = errno;
    this.code = code;
  }
}

const ERRNO_CODES: Record<number, string> = Object.fromEntries(
  Object.entries(E).map(([name, code]) => [code, name]),
);

/** The error of a failed `op` with errno `errno` (positive). */
export function socketError(op: string, errno: number): SocketError {
  return new SocketError(op, errno, ERRNO_CODES[errno] ?? `errno ${errno}`);
}

/** What each connected socket is watched for, once, for its whole life. */
export const CONN_EVENTS = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLPRI | EPOLLET;

const addrBuf = new Uint8Array(SOCKADDR_SIZE);
const addrLen = new Uint8Array(4);
const addrLenView = new DataView(addrLen.buffer);

const localOf = (fd: number) => localAddrOf(fd, "tcp");

/** Bits of a {@link TcpSocket}'s state: one number, not seven fields (two sockets a connection). */
const READABLE = 1;
const WRITABLE = 2;
const PEER_CLOSED = 4;
const URGENT = 8;
const FAILED = 16;
const CLOSED = 32;
const BULK = 64;

/** A connected TCP socket: accepted from a listener, or connected to a backend. */
export class TcpSocket implements IoHandler {
  readonly fd: number;
  readonly remoteAddr: NetAddr;
  readonly #loop: EventLoop;
  #localAddr: NetAddr | null;
  /** READABLE, WRITABLE...: what epoll said and what calls found since. */
  #state = 0;
  #handler: ((events: number) => void) | null = null;
  #waiter: ((events: number) => void) | null = null;

  constructor(loop: EventLoop, fd: number, remote: NetAddr, local: NetAddr | null = null) {
    this.#loop = loop;
    this.fd = fd;
    this.remoteAddr = remote;
    this.#localAddr = local;
  }

  #set(bit: number, on: boolean): void {
    this.#state = on ? this.#state | bit : this.#state & ~bit;
  }

  /** epoll said there is input (or EOF, or an error) and no read has found none since. */
  get readable(): boolean {
    return (this.#state & READABLE) !== 0;
  }
  set readable(on: boolean) {
    this.#set(READABLE, on);
  }

  /** epoll said there is room to write and no write has been refused since. */
  get writable(): boolean {
    return (this.#state & WRITABLE) !== 0;
  }
  set writable(on: boolean) {
    this.#set(WRITABLE, on);
  }

  /** The peer's FIN has arrived (EPOLLRDHUP): a short read reached the EOF. */
  get peerClosed(): boolean {
    return (this.#state & PEER_CLOSED) !== 0;
  }
  set peerClosed(on: boolean) {
    this.#set(PEER_CLOSED, on);
  }

  /** Urgent data arrived (EPOLLPRI). */
  get urgent(): boolean {
    return (this.#state & URGENT) !== 0;
  }
  set urgent(on: boolean) {
    this.#set(URGENT, on);
  }

  /** epoll reported an error (a failed connect, a reset). */
  get failed(): boolean {
    return (this.#state & FAILED) !== 0;
  }
  set failed(on: boolean) {
    this.#set(FAILED, on);
  }

  /**
   * The socket carries bulk (its relay says so once a transfer is under way): its events are
   * served after the round's others. A connection's first bytes (a TLS handshake) are not bulk.
   */
  get bulk(): boolean {
    return (this.#state & BULK) !== 0;
  }
  set bulk(on: boolean) {
    this.#set(BULK, on);
  }

  /** The local end (asked of the kernel the first time). */
  get localAddr(): NetAddr {
    this.#localAddr ??= localOf(this.fd) ?? { transport: "tcp", hostname: "0.0.0.0", port: 0 };
    return this.#localAddr;
  }

  /** The loop the socket is watched on. */
  get loop(): EventLoop {
    return this.#loop;
  }

  /** Closed by this process. */
  get closed(): boolean {
    return (this.#state & CLOSED) !== 0;
  }

  onIo(events: number): void {
    let st = this.#state;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) st |= READABLE;
    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR)) st |= WRITABLE;
    if (events & (EPOLLRDHUP | EPOLLHUP)) st |= PEER_CLOSED;
    if (events & EPOLLPRI) st |= URGENT;
    if (events & EPOLLERR) st |= FAILED;
    this.#state = st;
    if (this.#handler) this.#handler(events);
    else if (this.#waiter) {
      const w = this.#waiter;
      this.#waiter = null;
      w(events);
    }
  }

  /** Who gets the socket's events now (null: {@link nextEvent}'s waiter). */
  get handler(): ((events: number) => void) | null {
    return this.#handler;
  }

  /**
   * Who gets the socket's events from now on (a relay): called synchronously with them. Null:
   * events wake {@link nextEvent} again.
   */
  setHandler(handler: ((events: number) => void) | null): void {
    this.#handler = handler;
  }

  /** Resolves with the next events of the socket (0 when it is closed meanwhile). */
  nextEvent(): Promise<number> {
    if (this.#state & CLOSED) return Promise.resolve(0);
    return new Promise((resolve) => {
      this.#waiter = resolve;
    });
  }

  /** recv(2) into `buf` (up to `len`, a BigInt): bytes read, 0 at EOF, or -errno. */
  recv(buf: Uint8Array, len: bigint = BigInt(buf.length)): number {
    // a closed fd's number may already belong to another connection
    if (this.#state & CLOSED) return -E.EBADF;
    // never past the buffer: the kernel would write where `len` says
    if (Number(len) > buf.length) len = BigInt(buf.length);
    const n = Number(sys().recv(this.fd, buf, len, 0));
    if (n < 0) {
      const err = lastErrno();
      if (err === E.EAGAIN) this.#state &= ~READABLE;
      return -err;
    }
    // a short read drained the socket: epoll reports the next bytes (edge-triggered)
    if (n < Number(len) && n > 0 && !(this.#state & PEER_CLOSED)) this.#state &= ~READABLE;
    return n;
  }

  /** send(2) of `buf`'s first `n` bytes (all by default), without SIGPIPE: bytes sent, or -errno. */
  send(buf: Uint8Array, n: number = buf.length): number {
    if (this.#state & CLOSED) return -E.EBADF;
    if (n > buf.length) n = buf.length;
    const w = Number(sys().send(this.fd, buf, BigInt(n), MSG_NOSIGNAL));
    if (w < 0) {
      const err = lastErrno();
      if (err === E.EAGAIN) this.#state &= ~WRITABLE;
      return -err;
    }
    if (w < n) this.#state &= ~WRITABLE;
    return w;
  }

  /** Sends the FIN (the peer reads EOF; this side can still read); 0 or -errno. */
  shutdownWrite(): number {
    if (this.#state & CLOSED) return -E.EBADF;
    return rcOrErrno(sys().shutdown(this.fd, SHUT_WR));
  }

  /** Closes with a reset (SO_LINGER 0): the peer never takes a cut stream for a whole one. */
  reset(): void {
    if (this.#state & CLOSED) return;
    setLingerZero(this.fd);
    this.close();
  }

  /** Closes the socket (a FIN, unless reset() was called); a waiter gets 0. */
  close(): void {
    if (this.#state & CLOSED) return;
    this.#state |= CLOSED;
    this.#loop.forget(this.fd);
    closeFd(this.fd);
    this.#handler = null;
    const w = this.#waiter;
    this.#waiter = null;
    w?.(0);
  }

  /** The pending error of the socket (SO_ERROR), 0 for none. */
  pendingError(): number {
    const v = getIntOption(this.fd, SOL_SOCKET, SO_ERROR);
    return v < 0 ? -v : v;
  }

  /** Sets TCP_NODELAY; 0 or -errno. */
  setNoDelay(on = true): number {
    return setIntOption(this.fd, IPPROTO_TCP, TCP_NODELAY, on ? 1 : 0);
  }
}

/** A new non-blocking TCP socket of `hostname`'s family; fd or -errno. */
function tcpSocketFor(hostname: string): number {
  const family = isV6(hostname) ? AF_INET6 : AF_INET;
  return rcOrErrno(sys().socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
}

/**
 * Starts connecting to `hostname:port` (an IP literal): the socket is on the loop, and
 * {@link connected} says how it ends.
 * @throws {SocketError} when the socket cannot be made or the connect fails at once.
 */
export function connectTcp(loop: EventLoop, hostname: string, port: number): TcpSocket {
  // the address is parsed once; the socket takes the family it came out as (an IPv4-mapped
  // address is dialled as IPv4)
  const len = encodeSockaddr(hostname, port, addrBuf);
  if (len === 0) throw socketError(`connect ${hostname}:${port}`, E.EINVAL);
  const family = addrBuf[0];
  const fd = rcOrErrno(sys().socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (fd < 0) throw socketError("socket", -fd);
  setIntOption(fd, IPPROTO_TCP, TCP_NODELAY, 1);
  const rc = rcOrErrno(sys().connect(fd, addrBuf, len));
  if (rc < 0 && rc !== -E.EINPROGRESS) {
    closeFd(fd);
    throw socketError(`connect ${hostname}:${port}`, -rc);
  }
  const sock = new TcpSocket(loop, fd, { transport: "tcp", hostname, port });
  const added = loop.add(fd, CONN_EVENTS, sock);
  if (added < 0) {
    closeFd(fd);
    throw socketError("epoll_ctl", -added);
  }
  return sock;
}

/**
 * Resolves once `sock`'s connect completed; throws its error (ECONNREFUSED...), or a
 * SocketError ECONNABORTED when the socket was closed meanwhile.
 */
export async function connected(sock: TcpSocket): Promise<void> {
  for (;;) {
    if (sock.closed) throw socketError("connect", E.ECONNABORTED);
    const outcome = connectOutcome(sock);
    if (outcome === true) return;
    if (outcome !== null) throw outcome;
    await sock.nextEvent();
  }
}

/**
 * How `sock`'s connect stands by its events so far: true once connected (room to write
 * without an error: no getsockopt needed), its error once failed, null while under way.
 */
export function connectOutcome(sock: TcpSocket): true | SocketError | null {
  if (sock.writable && !sock.failed) return true;
  if (!sock.failed) return null;
  const err = sock.pendingError() || E.ECONNREFUSED;
  return socketError(`connect ${sock.remoteAddr.hostname}:${sock.remoteAddr.port}`, err);
}

/**
 * Writes all of `bytes`, waiting for room as needed (the few writes outside a relay: a
 * refusal, the hello). Throws a SocketError when the peer is gone.
 */
export async function writeAll(sock: TcpSocket, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) {
    const w = sock.send(off === 0 ? bytes : bytes.subarray(off), bytes.length - off);
    if (w >= 0) off += w;
    else if (w !== -E.EAGAIN) throw socketError("send", -w);
    else if ((await sock.nextEvent()) === 0) throw socketError("send", E.ECONNABORTED);
  }
}

/** Options of a listening socket. */
export interface ListenOptions {
  /** Share the address with other sockets (workers, a process taking over). */
  reusePort: boolean;
  /** The accept queue's length. */
  backlog: number;
}

/** A listening socket on the loop; `onAcceptable` is called while connections wait. */
export class TcpListenSocket implements IoHandler {
  readonly fd: number;
  /** The bound address (the real port when 0 was asked). */
  readonly addr: NetAddr;
  readonly #loop: EventLoop;
  readonly #onAcceptable: () => void;
  #paused = true;
  #closed = false;

  /** @throws {SocketError} when the socket cannot be made or bound (EADDRINUSE...). */
  constructor(
    loop: EventLoop,
    hostname: string,
    port: number,
    options: ListenOptions,
    onAcceptable: () => void,
  ) {
    this.#loop = loop;
    this.#onAcceptable = onAcceptable;
    const fd = tcpSocketFor(hostname);
    if (fd < 0) throw socketError("socket", -fd);
    this.fd = fd;
    try {
      this.addr = bindAndListen(fd, hostname, port, options);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  onIo(): void {
    this.#onAcceptable();
  }

  /**
   * Accepts one waiting connection: the socket, on the loop; or -errno (-EAGAIN: none waits,
   * -EMFILE: out of descriptors, the connection stays in the queue).
   */
  accept(): TcpSocket | number {
    addrLenView.setUint32(0, SOCKADDR_SIZE, true);
    const fd = sys().accept4(this.fd, addrBuf, addrLen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) return -lastErrno();
    const remote = decodeSockaddr(addrBuf) ?? { transport: "tcp", hostname: "0.0.0.0", port: 0 };
    const sock = new TcpSocket(this.#loop, fd, remote, this.#wildcard ? null : this.addr);
    const rc = this.#loop.add(fd, CONN_EVENTS, sock);
    if (rc < 0) {
      closeFd(fd);
      return rc;
    }
    return sock;
  }

  get #wildcard(): boolean {
    const h = this.addr.hostname;
    return h === "0.0.0.0" || h === "::";
  }

  /** Starts (again) telling `onAcceptable` about waiting connections. */
  resume(): void {
    if (!this.#paused || this.#closed) return;
    this.#paused = false;
    // level-triggered: told again each round while the queue is not empty
    const rc = this.#loop.add(this.fd, EPOLLIN, this);
    if (rc < 0) throw socketError("epoll_ctl", -rc);
  }

  /** Stops telling `onAcceptable` (connection limit, descriptor shortage): clients queue. */
  pause(): void {
    if (this.#paused || this.#closed) return;
    this.#paused = true;
    this.#loop.forget(this.fd, true);
  }

  /** Closes the socket: connections still in its queue are reset by the kernel. */
  close(): void {
    if (this.#closed) return;
    this.pause();
    this.#closed = true;
    closeFd(this.fd);
  }
}

function bindAndListen(fd: number, hostname: string, port: number, o: ListenOptions): NetAddr {
  setIntOption(fd, SOL_SOCKET, SO_REUSEADDR, 1);
  if (o.reusePort) setIntOption(fd, SOL_SOCKET, SO_REUSEPORT, 1);
  // inherited by every accepted socket: no setsockopt per connection
  setIntOption(fd, IPPROTO_TCP, TCP_NODELAY, 1);
  const v6 = isV6(hostname);
  if (v6) setIntOption(fd, IPPROTO_IPV6, IPV6_V6ONLY, 0);
  // the socket's family decides the address's: an IPv4-mapped one stays IPv6
  const len = encodeSockaddr(hostname, port, addrBuf, v6);
  if (len === 0) throw socketError(`bind ${hostname}`, E.EINVAL);
  let rc = rcOrErrno(sys().bind(fd, addrBuf, len));
  if (rc < 0) throw socketError(`bind ${hostname}:${port}`, -rc);
  rc = rcOrErrno(sys().listen(fd, o.backlog));
  if (rc < 0) throw socketError(`listen ${hostname}:${port}`, -rc);
  return localOf(fd) ?? { transport: "tcp", hostname, port };
}
