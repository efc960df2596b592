/**
 * The few libc functions the eBPF fast path needs that Deno has no API for: file descriptors for
 * directories (cgroup attach), mount(2) (cgroup2/bpffs), netlink sockets (sock_diag), errno and
 * vsnprintf (rendering libbpf's va_list log messages), the socket, pipe and splice calls of the
 * kernel relays, getrlimit (the descriptor limit the accept loop
 * keeps clear of), clock_gettime (the clock of XDP block expiries) and malloc_trim (memory back
 * to the system after a burst). Opened lazily on first use.
 * @module
 */

const LIBC_SYMBOLS = {
  __errno_location: { parameters: [], result: "pointer" },
  strerror_r: { parameters: ["i32", "buffer", "usize"], result: "pointer" },
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  sendto: { parameters: ["i32", "buffer", "usize", "i32", "buffer", "u32"], result: "isize" },
  mount: { parameters: ["buffer", "buffer", "buffer", "u64", "pointer"], result: "i32" },
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  vsnprintf: { parameters: ["buffer", "usize", "pointer", "pointer"], result: "i32" },
  if_nametoindex: { parameters: ["buffer"], result: "u32" },
  getrlimit: { parameters: ["i32", "buffer"], result: "i32" },
  clock_gettime: { parameters: ["i32", "buffer"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  getpeername: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  dup3: { parameters: ["i32", "i32", "i32"], result: "i32" },
  splice: { parameters: ["i32", "pointer", "i32", "pointer", "usize", "u32"], result: "isize" },
  malloc_trim: { parameters: ["usize"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The opened libc with its typed symbol table. */
export type Libc = Deno.DynamicLibrary<typeof LIBC_SYMBOLS>["symbols"];

let libcHandle: Deno.DynamicLibrary<typeof LIBC_SYMBOLS> | null = null;

/** libc symbols; opens libc.so.6 on first call. */
export function libc(): Libc {
  libcHandle ??= Deno.dlopen("libc.so.6", LIBC_SYMBOLS);
  return libcHandle.symbols;
}

const CLOCK_MONOTONIC = 1;

/** CLOCK_MONOTONIC in nanoseconds: the clock of the BPF helper bpf_ktime_get_ns(). */
export function monotonicNs(): bigint {
  const ts = new BigInt64Array(2); // struct timespec on 64-bit Linux
  if (libc().clock_gettime(CLOCK_MONOTONIC, new Uint8Array(ts.buffer)) !== 0) {
    throw new Error(`clock_gettime(CLOCK_MONOTONIC): ${strerror(errno())}`);
  }
  return ts[0] * 1_000_000_000n + ts[1];
}

/** errno of the calling thread; read it right after the failing call, before any other call. */
export function errno(): number {
  const p = libc().__errno_location();
  return p === null ? 0 : new Deno.UnsafePointerView(p).getInt32();
}

/** errno values by name (asm-generic/errno*.h, and the kernel-internal ENOTSUPP). */
export const Errno = {
  EPERM: 1,
  ENOENT: 2,
  EINTR: 4,
  E2BIG: 7,
  EBADF: 9,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  ENODEV: 19,
  ENOTDIR: 20,
  EINVAL: 22,
  EMFILE: 24,
  ENOSPC: 28,
  EPIPE: 32,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ENOLINK: 67,
  EOPNOTSUPP: 95,
  ECONNRESET: 104,
  ETIMEDOUT: 110,
  ENOTSUPP: 524,
} as const;

const ERRNO_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Errno).map(([name, code]) => [code, name]),
);

/** Symbolic errno name (`ENOENT`), or `errno N` for ones not listed. */
export function errnoName(code: number): string {
  return ERRNO_NAMES[code] ?? `errno ${code}`;
}

/** libc's message for an errno value (`No such file or directory`). */
export function strerror(code: number): string {
  const buf = new Uint8Array(256);
  // GNU strerror_r returns a pointer to the message (possibly a static string, not buf).
  const p = libc().strerror_r(code, buf, BigInt(buf.length));
  return p === null ? `errno ${code}` : new Deno.UnsafePointerView(p).getCString();
}

/** NUL-terminated UTF-8 copy of a string, for `buffer` parameters taking `const char *`. */
export function cString(s: string): Uint8Array<ArrayBuffer> {
  const bytes = new TextEncoder().encode(s);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

/** An OS-level failure of a libc call, with errno. */
export class SyscallError extends Error {
  /** The call that failed, e.g. `open(/sys/fs/cgroup/x)`. */
  readonly op: string;
  /** Positive errno value. */
  readonly errno: number;
  constructor(op: string, code: number) {
    super(`${op}: ${errnoName(code)}: ${strerror(code)}`);
    this.name = "SyscallError";
    this.op = op;
    this.errno = code;
  }
}

export const O_RDONLY = 0;
export const O_DIRECTORY = 0o200000;
export const O_CLOEXEC = 0o2000000;

/** open(2) a directory read-only (e.g. a cgroup dir to attach programs to); returns the fd. */
export function openDirectory(path: string): number {
  const fd = libc().open(cString(path), O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
  if (fd < 0) throw new SyscallError(`open(${path})`, errno());
  return fd;
}

/** close(2) an fd obtained through FFI. */
export function closeFd(fd: number): void {
  libc().close(fd);
}

/** mount(2) a pseudo filesystem (`cgroup2`, `bpf`) at `target`. */
export function mountFs(fstype: string, target: string): void {
  const rc = libc().mount(cString(fstype), cString(target), cString(fstype), 0n, null);
  if (rc !== 0) throw new SyscallError(`mount -t ${fstype} ${target}`, errno());
}

/**
 * if_nametoindex(3): the index of network interface `name` in this process's network namespace,
 * or 0 when there is none (errno ENODEV).
 */
export function ifNameToIndex(name: string): number {
  return libc().if_nametoindex(cString(name));
}

const RLIMIT_NOFILE = 7;

/**
 * The soft limit on open descriptors (RLIMIT_NOFILE) of this process; Infinity when unlimited.
 * @throws {SyscallError} when getrlimit fails.
 */
export function openFileLimit(): number {
  const buf = new Uint8Array(16); // struct rlimit { rlim_t rlim_cur, rlim_max; }
  if (libc().getrlimit(RLIMIT_NOFILE, buf) !== 0) {
    throw new SyscallError("getrlimit(RLIMIT_NOFILE)", errno());
  }
  const soft = new DataView(buf.buffer).getBigUint64(0, true);
  return soft > BigInt(Number.MAX_SAFE_INTEGER) ? Infinity : Number(soft);
}

// ---------------------------------------------------------------------------------------------
// Sockets by fd, and epoll: a spliced socket pair is watched outside Deno's event loop

/** errno values the socket helpers below hand back (negated) for callers to branch on. */
export const EINTR = Errno.EINTR;
export const EAGAIN = Errno.EAGAIN;

const SOL_SOCKET = 1;
const SO_ERROR = 4;
const SO_LINGER = 13;
const IPPROTO_TCP = 6;
const TCP_INFO = 11;
const SHUT_WR = 1;

/** socket(2) type flag: the socket's fd is close-on-exec. */
export const SOCK_CLOEXEC = 0o2000000;

const MSG_NOSIGNAL = 0x4000;

/** recv(2) from a socket: bytes read, 0 at EOF, or -errno (-EAGAIN: nothing there now). */
export function recvFd(fd: number, buf: Uint8Array): number {
  const n = Number(libc().recv(fd, buf, BigInt(buf.length), 0));
  return n < 0 ? -errno() : n;
}

/** send(2) to a socket without SIGPIPE: bytes written, or -errno (-EPIPE: the peer is gone). */
export function sendFd(fd: number, buf: Uint8Array, flags = 0): number {
  const n = Number(libc().send(fd, buf, BigInt(buf.length), MSG_NOSIGNAL | flags));
  return n < 0 ? -errno() : n;
}

/** send(2) flag: the byte is TCP urgent data. */
export const MSG_OOB = 1;

/** shutdown(2) of a socket's sending side (sends the FIN); 0 or -errno. */
export function shutdownWrite(fd: number): number {
  return libc().shutdown(fd, SHUT_WR) === 0 ? 0 : -errno();
}

const optBuf = new Uint8Array(8);
const optView = new DataView(optBuf.buffer);
const optLen = new Uint8Array(4);
const optLenView = new DataView(optLen.buffer);

function getsockopt(fd: number, level: number, name: number, size: number): boolean {
  optBuf.fill(0);
  optLenView.setUint32(0, size, true);
  return libc().getsockopt(fd, level, name, optBuf, optLen) === 0;
}

const SO_SNDBUF = 7;
const SO_RCVBUF = 8;
const SO_SNDBUFFORCE = 32;
const SO_RCVBUFFORCE = 33;
const intOpt = new Uint8Array(4);
const intOptView = new DataView(intOpt.buffer);

/**
 * Sets a socket's send or receive buffer (the kernel doubles it; autotuning stops), above
 * net.core.[rw]mem_max when privileged (SO_*BUFFORCE); 0 or -errno.
 */
export function setSocketBuffer(fd: number, which: "send" | "receive", bytes: number): number {
  intOptView.setInt32(0, bytes, true);
  const [force, plain] = which === "send"
    ? [SO_SNDBUFFORCE, SO_SNDBUF]
    : [SO_RCVBUFFORCE, SO_RCVBUF];
  if (libc().setsockopt(fd, SOL_SOCKET, force, intOpt, 4) === 0) return 0;
  return libc().setsockopt(fd, SOL_SOCKET, plain, intOpt, 4) === 0 ? 0 : -errno();
}

const lingerZero = new Uint8Array(8); // struct linger { l_onoff = 1, l_linger = 0 }
new DataView(lingerZero.buffer).setInt32(0, 1, true);

let devNull = -1;

/**
 * Resets a socket now (SO_LINGER 0, then its fd is pointed at /dev/null, which closes the
 * socket): the peer gets a reset and what was queued is dropped, so it never mistakes a cut
 * stream for a complete one. Deno's own close of the conn would first send a FIN (it shuts the
 * socket down before closing it); afterwards it closes the /dev/null fd instead. 0 or -errno.
 */
export function resetSocket(fd: number): number {
  if (libc().setsockopt(fd, SOL_SOCKET, SO_LINGER, lingerZero, 8) !== 0) return -errno();
  if (devNull < 0) devNull = libc().open(cString("/dev/null"), O_RDONLY | O_CLOEXEC, 0);
  if (devNull < 0) return -errno();
  return libc().dup3(devNull, fd, O_CLOEXEC) >= 0 ? 0 : -errno();
}

/** The socket's pending error (SO_ERROR, e.g. ECONNRESET), 0 for none; clears it. */
export function socketError(fd: number): number {
  return getsockopt(fd, SOL_SOCKET, SO_ERROR, 4) ? optView.getInt32(0, true) : errno();
}

/** The TCP state of a socket (tcpi_state, the first byte of struct tcp_info), or -1. */
export function tcpState(fd: number): number {
  // a short optlen makes the kernel copy only the first bytes of struct tcp_info
  return getsockopt(fd, IPPROTO_TCP, TCP_INFO, 8) ? optBuf[0] : -1;
}

const addrBuf = new Uint8Array(128);
const addrLen = new Uint8Array(4);
const addrLenView = new DataView(addrLen.buffer);

/** One end of a socket: family 2 or 10 (IPv4-mapped IPv6 folded to 2), 16 address bytes, port. */
export interface SocketEnd {
  family: 2 | 10;
  /** Network order; IPv4 in the first 4 bytes. */
  bytes: Uint8Array;
  port: number;
}

function endOf(call: "getsockname" | "getpeername", fd: number): SocketEnd | null {
  addrLenView.setUint32(0, addrBuf.length, true);
  if (libc()[call](fd, addrBuf, addrLen) !== 0) return null;
  const family = addrBuf[0] | (addrBuf[1] << 8);
  const port = (addrBuf[2] << 8) | addrBuf[3];
  const bytes = new Uint8Array(16);
  if (family === 2) {
    bytes.set(addrBuf.subarray(4, 8)); // sockaddr_in: sin_addr
    return { family: 2, bytes, port };
  }
  if (family !== 10) return null;
  const a = addrBuf.subarray(8, 24); // sockaddr_in6: sin6_addr
  const mapped = a.subarray(0, 10).every((b) => b === 0) && a[10] === 0xff && a[11] === 0xff;
  if (mapped) {
    bytes.set(a.subarray(12, 16));
    return { family: 2, bytes, port };
  }
  bytes.set(a);
  return { family: 10, bytes, port };
}

/** A TCP socket's two ends (getsockname/getpeername), or null when it is no connected socket. */
export function socketEnds(fd: number): { local: SocketEnd; remote: SocketEnd } | null {
  const local = endOf("getsockname", fd);
  const remote = local && endOf("getpeername", fd);
  return local && remote ? { local, remote } : null;
}

/** The local and remote ports of a TCP socket (getsockname/getpeername), or null. */
export function socketPorts(fd: number): { local: number; remote: number } | null {
  const ends = socketEnds(fd);
  return ends && { local: ends.local.port, remote: ends.remote.port };
}

const O_NONBLOCK = 0o4000;
const F_SETPIPE_SZ = 1031;
const pipeFds = new Int32Array(2);

/**
 * A nonblocking pipe of (at least) `bytes` capacity: [read end, write end], or -errno. The
 * capacity is what a splice(2) relay holds between its sockets.
 */
export function makePipe(bytes: number): [number, number] | number {
  if (libc().pipe2(new Uint8Array(pipeFds.buffer), O_NONBLOCK | O_CLOEXEC) !== 0) return -errno();
  const [r, w] = pipeFds;
  // a smaller pipe is still a working one (the limit is fs.pipe-max-size for non-root)
  libc().fcntl(w, F_SETPIPE_SZ, bytes);
  return [r, w];
}

const SPLICE_F_MOVE = 1;
const SPLICE_F_NONBLOCK = 2;

/** splice(2) up to `len` bytes from `from` to `to` (one is a pipe): bytes moved, 0 at EOF, or -errno. */
export function spliceFd(from: number, to: number, len: number): number {
  const n = Number(
    libc().splice(from, null, to, null, BigInt(len), SPLICE_F_MOVE | SPLICE_F_NONBLOCK),
  );
  return n < 0 ? -errno() : n;
}
