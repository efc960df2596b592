/**
 * The libc calls of the socket engine (src/io/): sockets the proxy creates, accepts and connects
 * itself, and the epoll instance that watches them. Every length parameter is a `usize` passed
 * as a BigInt, which keeps Deno's fast call path (a JS number drops a call to the slow one);
 * results come back as numbers, negative errno values on failure (`-EAGAIN`), so no call throws
 * on the hot path. The byte counts of recv/send/read/write (`ssize_t`) are taken as `i32`: the
 * low half of the result register, exact for every length the proxy asks for (< 2 GiB) and for
 * -1, and a number rather than a BigInt allocated per call.
 *
 * @module
 */

const SOCKET_SYMBOLS = {
  __errno_location: { parameters: [], result: "pointer" },
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  accept4: { parameters: ["i32", "buffer", "buffer", "i32"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "i32" },
  recvfrom: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "buffer"], result: "i32" },
  sendto: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "u32"], result: "i32" },
  recvmmsg: { parameters: ["i32", "buffer", "u32", "i32", "pointer"], result: "i32" },
  sendmmsg: { parameters: ["i32", "buffer", "u32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  // the same call on a thread of Deno's pool: the JS thread is free while it blocks
  epoll_wait_off_thread: {
    name: "epoll_wait",
    parameters: ["i32", "buffer", "i32", "i32"],
    result: "i32",
    nonblocking: true,
  },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

type SocketLib = Deno.DynamicLibrary<typeof SOCKET_SYMBOLS>["symbols"];

let lib: SocketLib | null = null;
let errnoView: Deno.UnsafePointerView | null = null;

/** The socket calls; opens libc.so.6 on first use. */
export function sys(): SocketLib {
  if (lib) return lib;
  lib = Deno.dlopen("libc.so.6", SOCKET_SYMBOLS).symbols;
  return lib;
}

/** errno of the JS thread (its location is fixed for the thread, so it is looked up once). */
export function lastErrno(): number {
  errnoView ??= new Deno.UnsafePointerView(sys().__errno_location()!);
  return errnoView.getInt32();
}

/** A result of `rc` for a call returning 0 or -1: 0, or -errno. */
export function rcOrErrno(rc: number): number {
  return rc < 0 ? -lastErrno() : rc;
}

/** errno values the engine branches on. */
export const E = {
  EINTR: 4,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  EPIPE: 32,
  EMSGSIZE: 90,
  EADDRINUSE: 98,
  EADDRNOTAVAIL: 99,
  ENETUNREACH: 101,
  ECONNABORTED: 103,
  ECONNRESET: 104,
  ENOBUFS: 105,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  EHOSTUNREACH: 113,
  EINPROGRESS: 115,
} as const;

const NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(E).map(([name, code]) => [code, name]),
);

/** `ECONNRESET` for 104; `errno N` for a value not listed. */
export function errnoText(code: number): string {
  return NAMES[code] ?? `errno ${code}`;
}

export const AF_INET = 2;
export const AF_INET6 = 10;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_REUSEADDR = 2;
export const SO_ERROR = 4;
export const SO_SNDBUF = 7;
export const SO_RCVBUF = 8;
export const SO_LINGER = 13;
export const SO_REUSEPORT = 15;
/** SO_SNDBUF / SO_RCVBUF past net.core.[rw]mem_max (needs CAP_NET_ADMIN). */
export const SO_SNDBUFFORCE = 32;
export const SO_RCVBUFFORCE = 33;
/** A BPF_PROG_TYPE_SK_REUSEPORT program fd: it picks the socket of the SO_REUSEPORT group. */
export const SO_ATTACH_REUSEPORT_EBPF = 52;
export const IPPROTO_TCP = 6;
export const IPPROTO_IPV6 = 41;
export const TCP_NODELAY = 1;
export const IPV6_V6ONLY = 26;
export const SHUT_WR = 1;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_DONTWAIT = 0x40;

export const EPOLLIN = 0x001;
export const EPOLLPRI = 0x002;
export const EPOLLOUT = 0x004;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
export const EPOLLRDHUP = 0x2000;
export const EPOLLET = 1 << 31;
export const EPOLL_CLOEXEC = 0o2000000;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
/** struct epoll_event is packed (12 bytes) on x86_64 only; 16 bytes with padding elsewhere. */
export const EPOLL_EVENT_SIZE = Deno.build.arch === "x86_64" ? 12 : 16;
/** Where epoll_event.data starts in it. */
export const EPOLL_EVENT_DATA = Deno.build.arch === "x86_64" ? 4 : 8;

const intOpt = new Uint8Array(4);
const intOptView = new DataView(intOpt.buffer);

/** setsockopt(2) of an int option; 0 or -errno. */
export function setIntOption(fd: number, level: number, name: number, value: number): number {
  intOptView.setInt32(0, value, true);
  return rcOrErrno(sys().setsockopt(fd, level, name, intOpt, 4));
}

const optLen = new Uint8Array(4);
const optLenView = new DataView(optLen.buffer);

/** getsockopt(2) of an int option: its value, or -errno. */
export function getIntOption(fd: number, level: number, name: number): number {
  optLenView.setUint32(0, 4, true);
  const rc = sys().getsockopt(fd, level, name, intOpt, optLen);
  return rc < 0 ? -lastErrno() : intOptView.getInt32(0, true);
}

const lingerZero = new Uint8Array(8); // struct linger { l_onoff = 1, l_linger = 0 }
new DataView(lingerZero.buffer).setInt32(0, 1, true);

/** Sets SO_LINGER 0: the close that follows sends a reset and drops what is queued. */
export function setLingerZero(fd: number): number {
  return rcOrErrno(sys().setsockopt(fd, SOL_SOCKET, SO_LINGER, lingerZero, 8));
}

/** close(2); 0 or -errno. */
export function closeFd(fd: number): number {
  return rcOrErrno(sys().close(fd));
}
