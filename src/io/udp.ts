/**
 * UDP sockets the proxy owns, on the process's {@link EventLoop}: a bound socket that receives
 * from many peers (a QUIC listener), and connected ones that talk to one peer (a flow's backend
 * socket). Watched level-triggered for input: the owner reads a batch per report, and what is
 * left is reported again next round, so one busy socket cannot starve the others.
 *
 * Calls return numbers (bytes, or -errno), never throw, and cost one syscall each. Datagrams
 * are received in batches (src/io/dgram_batch.ts, recvmmsg) into one shared buffer, so
 * receiving allocates nothing; they are sent as given: nothing here reads or changes their
 * bytes.
 *
 * @module
 */
import {
  AF_INET,
  AF_INET6,
  closeFd,
  E,
  EPOLLIN,
  getIntOption,
  IPPROTO_IPV6,
  IPV6_V6ONLY,
  lastErrno,
  rcOrErrno,
  setIntOption,
  SO_ERROR,
  SO_RCVBUF,
  SO_RCVBUFFORCE,
  SO_REUSEADDR,
  SO_REUSEPORT,
  SO_SNDBUF,
  SO_SNDBUFFORCE,
  SOCK_CLOEXEC,
  SOCK_DGRAM,
  SOCK_NONBLOCK,
  SOL_SOCKET,
  sys,
} from "../../ffi/socket.ts";
import type { EventLoop, IoHandler } from "./loop.ts";
import { encodeSockaddr, isV6, localAddrOf, type NetAddr, SOCKADDR_SIZE } from "./sockaddr.ts";
import { socketError } from "./tcp.ts";

const addrBuf = new Uint8Array(SOCKADDR_SIZE);

const localOf = (fd: number) => localAddrOf(fd, "udp");

/** Options of a UDP socket. */
export interface UdpOptions {
  /** Share the address with other sockets (workers, a process taking over). */
  reusePort?: boolean;
  /** SO_RCVBUF / SO_SNDBUF in bytes (forced past the sysctl maximum when allowed); 0: default. */
  rcvbuf?: number;
  sndbuf?: number;
}

/** A non-blocking UDP socket on the loop; `onReadable` is called while datagrams wait. */
export class UdpSocket implements IoHandler {
  readonly fd: number;
  /** The local address (the real port when 0 was asked). */
  readonly addr: NetAddr;
  /** The peer of a connected socket; null for a bound one. */
  readonly remote: NetAddr | null;
  readonly #loop: EventLoop;
  #onReadable: (events: number) => void;
  #closed = false;

  constructor(
    loop: EventLoop,
    fd: number,
    remote: NetAddr | null,
    onReadable: (events: number) => void,
  ) {
    this.#loop = loop;
    this.fd = fd;
    this.remote = remote;
    this.addr = localOf(fd) ?? { transport: "udp", hostname: "0.0.0.0", port: 0 };
    this.#onReadable = onReadable;
  }

  /** Closed by this process. */
  get closed(): boolean {
    return this.#closed;
  }

  onIo(events: number): void {
    this.#onReadable(events);
  }

  /** Who is told when datagrams (or an error) wait. */
  setHandler(onReadable: (events: number) => void): void {
    this.#onReadable = onReadable;
  }

  /** Starts watching for datagrams; 0 or -errno. */
  watch(): number {
    return this.#loop.add(this.fd, EPOLLIN, this);
  }

  /** send(2) of `buf`'s first `n` bytes on a connected socket; n or -errno. */
  send(buf: Uint8Array, n: number = buf.length): number {
    if (this.#closed) return -E.EBADF;
    const w = Number(sys().send(this.fd, buf, BigInt(n), 0));
    return w < 0 ? -lastErrno() : w;
  }

  /**
   * Asks for each datagram's destination address (IP_PKTINFO, IPV6_RECVPKTINFO): what a socket
   * bound to a wildcard address needs to know where a client sent to. 0 or -errno.
   */
  wantDestination(): number {
    const v6 = this.addr.hostname.includes(":");
    const rc = setIntOption(this.fd, 0, 8, 1); // IPPROTO_IP, IP_PKTINFO (IPv4 on any socket)
    return v6 ? setIntOption(this.fd, IPPROTO_IPV6, 49, 1) : rc; // IPV6_RECVPKTINFO
  }

  /** The pending error of the socket (SO_ERROR, which reading clears), 0 for none. */
  pendingError(): number {
    const v = getIntOption(this.fd, SOL_SOCKET, SO_ERROR);
    return v < 0 ? -v : v;
  }

  /** Closes the socket (no more reports). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#loop.forget(this.fd);
    closeFd(this.fd);
  }
}

/** A new non-blocking UDP socket of `hostname`'s family; fd or -errno. */
function udpSocketFor(hostname: string): number {
  const family = isV6(hostname) ? AF_INET6 : AF_INET;
  return rcOrErrno(sys().socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
}

/** Sets the buffer sizes asked for: forced first (root), else as far as the sysctl allows. */
function setBuffers(fd: number, o: UdpOptions): void {
  if (o.rcvbuf && setIntOption(fd, SOL_SOCKET, SO_RCVBUFFORCE, o.rcvbuf) < 0) {
    setIntOption(fd, SOL_SOCKET, SO_RCVBUF, o.rcvbuf);
  }
  if (o.sndbuf && setIntOption(fd, SOL_SOCKET, SO_SNDBUFFORCE, o.sndbuf) < 0) {
    setIntOption(fd, SOL_SOCKET, SO_SNDBUF, o.sndbuf);
  }
}

/**
 * A UDP socket bound to `hostname:port` (an IP literal; `::` takes IPv4 too) and watched.
 * @throws {SocketError} when it cannot be made or bound (EADDRINUSE...).
 */
export function bindUdp(
  loop: EventLoop,
  hostname: string,
  port: number,
  options: UdpOptions,
  onReadable: (events: number) => void,
): UdpSocket {
  const fd = openUdp("bind", hostname, port, options, (fd) => {
    setIntOption(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    if (options.reusePort) setIntOption(fd, SOL_SOCKET, SO_REUSEPORT, 1);
    if (isV6(hostname)) setIntOption(fd, IPPROTO_IPV6, IPV6_V6ONLY, 0);
  });
  return watched(loop, fd, null, onReadable);
}

/**
 * A UDP socket connected to `hostname:port` (an IP literal), with a local port of its own, and
 * watched: it receives only that peer's datagrams.
 * @throws {SocketError} when it cannot be made or connected (ENETUNREACH, EMFILE...).
 */
export function connectUdp(
  loop: EventLoop,
  hostname: string,
  port: number,
  options: UdpOptions,
  onReadable: (events: number) => void,
): UdpSocket {
  const fd = openUdp("connect", hostname, port, options, () => {});
  return watched(loop, fd, { transport: "udp", hostname, port }, onReadable);
}

/**
 * A new UDP socket of `hostname`'s family, set up (`prepare`, then the buffers) and bound or
 * connected to `hostname:port`; its fd. The address is encoded for the socket's family.
 * @throws {SocketError} naming the call that failed; the fd is closed then.
 */
function openUdp(
  op: "bind" | "connect",
  hostname: string,
  port: number,
  options: UdpOptions,
  prepare: (fd: number) => void,
): number {
  const fd = udpSocketFor(hostname);
  if (fd < 0) throw socketError("socket", -fd);
  prepare(fd);
  setBuffers(fd, options);
  const len = encodeSockaddr(hostname, port, addrBuf, isV6(hostname));
  const rc = len === 0 ? -E.EINVAL : rcOrErrno(sys()[op](fd, addrBuf, len));
  if (rc < 0) {
    closeFd(fd);
    throw socketError(`${op} udp ${hostname}:${port}`, -rc);
  }
  return fd;
}

function watched(
  loop: EventLoop,
  fd: number,
  remote: NetAddr | null,
  onReadable: (events: number) => void,
): UdpSocket {
  const sock = new UdpSocket(loop, fd, remote, onReadable);
  const rc = sock.watch();
  if (rc < 0) {
    closeFd(fd);
    throw socketError("epoll_ctl", -rc);
  }
  return sock;
}
