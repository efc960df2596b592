/**
 * Descriptor helpers over libc for the process's own plumbing (the ready line of `--ready-fd`,
 * systemd's notify socket): access mode and close-on-exec of an fd, whole writes, pointing fds
 * at /dev/null, one datagram to a UNIX socket. No proxy logic lives here.
 * @module
 */

import { cString, Errno, errno, libc, O_CLOEXEC, SOCK_CLOEXEC } from "./libc.ts";

const F_GETFL = 3;
const F_SETFD = 2;
const FD_CLOEXEC = 1;
const O_ACCMODE = 3;
const O_WRONLY = 1;
const O_RDWR = 2;

/** Whether `fd` is open for writing: true, false (read-only), or -errno (not open: -EBADF). */
export function writableFd(fd: number): boolean | number {
  const flags = libc().fcntl(fd, F_GETFL, 0);
  if (flags < 0) return -errno();
  return (flags & O_ACCMODE) === O_WRONLY || (flags & O_ACCMODE) === O_RDWR;
}

/** Marks `fd` close-on-exec (child processes do not inherit it); 0 or -errno. */
export function setCloseOnExec(fd: number): number {
  return libc().fcntl(fd, F_SETFD, FD_CLOEXEC) < 0 ? -errno() : 0;
}

/** write(2) of all of `bytes` to `fd` (a blocking one), retrying EINTR/EAGAIN; 0 or -errno. */
export function writeAllFd(fd: number, bytes: Uint8Array): number {
  for (let off = 0; off < bytes.length;) {
    const n = Number(libc().write(fd, bytes.subarray(off), BigInt(bytes.length - off)));
    if (n < 0) {
      const code = errno();
      if (code === Errno.EINTR || code === Errno.EAGAIN) continue;
      return -code;
    }
    off += n;
  }
  return 0;
}

/** Points each of `fds` at /dev/null (their readers see the end; the numbers stay taken). */
export function pointAtDevNull(fds: readonly number[]): void {
  const devNull = libc().open(cString("/dev/null"), O_WRONLY | O_CLOEXEC, 0);
  if (devNull < 0) return;
  for (const fd of fds) libc().dup3(devNull, fd, fd > 2 ? O_CLOEXEC : 0);
  libc().close(devNull);
}

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
/** sizeof(struct sockaddr_un): sa_family_t, then sun_path[108]. */
const SOCKADDR_UN_BYTES = 110;

/**
 * Sends one datagram to the UNIX socket at `path` (a leading @ names one in the abstract
 * namespace); 0, or -errno (-ENAMETOOLONG: the path does not fit a sockaddr_un).
 */
export function sendUnixDatagram(path: string, message: Uint8Array): number {
  const name = new TextEncoder().encode(path.startsWith("@") ? `\0${path.slice(1)}` : path);
  if (name.length >= SOCKADDR_UN_BYTES - 2) return -Errno.ENAMETOOLONG;
  const addr = new Uint8Array(SOCKADDR_UN_BYTES);
  new DataView(addr.buffer).setUint16(0, AF_UNIX, true);
  addr.set(name, 2);
  const c = libc();
  const fd = c.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -errno();
  try {
    const sent = c.sendto(fd, message, BigInt(message.length), 0, addr, 2 + name.length);
    return sent < 0 ? -errno() : 0;
  } finally {
    c.close(fd);
  }
}
