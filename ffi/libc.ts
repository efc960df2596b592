/**
 * The few libc functions the eBPF fast path needs that Deno has no API for: file descriptors for
 * directories (cgroup attach), mount(2) (cgroup2/bpffs), netlink sockets (sock_diag), errno and
 * vsnprintf (rendering libbpf's va_list log messages). Opened lazily on first use.
 * @module
 */

const LIBC_SYMBOLS = {
  __errno_location: { parameters: [], result: "pointer" },
  strerror_r: { parameters: ["i32", "buffer", "usize"], result: "pointer" },
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  mount: { parameters: ["buffer", "buffer", "buffer", "u64", "pointer"], result: "i32" },
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  send: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  recv: { parameters: ["i32", "buffer", "usize", "i32"], result: "isize" },
  vsnprintf: { parameters: ["buffer", "usize", "pointer", "pointer"], result: "i32" },
  if_nametoindex: { parameters: ["buffer"], result: "u32" },
} as const satisfies Deno.ForeignLibraryInterface;

/** The opened libc with its typed symbol table. */
export type Libc = Deno.DynamicLibrary<typeof LIBC_SYMBOLS>["symbols"];

let libcHandle: Deno.DynamicLibrary<typeof LIBC_SYMBOLS> | null = null;

/** libc symbols; opens libc.so.6 on first call. */
export function libc(): Libc {
  libcHandle ??= Deno.dlopen("libc.so.6", LIBC_SYMBOLS);
  return libcHandle.symbols;
}

/** errno of the calling thread; read it right after the failing call, before any other call. */
export function errno(): number {
  const p = libc().__errno_location();
  return p === null ? 0 : new Deno.UnsafePointerView(p).getInt32();
}

const ERRNO_NAMES: Record<number, string> = {
  1: "EPERM",
  2: "ENOENT",
  4: "EINTR",
  7: "E2BIG",
  9: "EBADF",
  11: "EAGAIN",
  12: "ENOMEM",
  13: "EACCES",
  14: "EFAULT",
  16: "EBUSY",
  17: "EEXIST",
  19: "ENODEV",
  20: "ENOTDIR",
  22: "EINVAL",
  24: "EMFILE",
  28: "ENOSPC",
  38: "ENOSYS",
  95: "EOPNOTSUPP",
  524: "ENOTSUPP",
};

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
