/**
 * TCP socket state by 4-tuple through NETLINK_SOCK_DIAG (what `ss -ti` reads), for sockets
 * Deno exposes no fd for. Used to learn when a spliced socket has taken all redirected bytes.
 * @module
 */

import { closeFd, errno, libc, SOCK_CLOEXEC, SyscallError } from "../../ffi/libc.ts";

/** A TCP socket's 4-tuple as seen from that socket. IPv4-mapped IPv6 is stored as IPv4. */
export interface SocketTuple {
  /** 2 (AF_INET) or 10 (AF_INET6). */
  family: 2 | 10;
  /** 16 bytes, network order; IPv4 in the first 4, the rest zero. */
  localIp: Uint8Array;
  localPort: number;
  /** 16 bytes, network order; IPv4 in the first 4, the rest zero. */
  remoteIp: Uint8Array;
  remotePort: number;
}

/**
 * Whether a TCP state (`tcpi_state`) comes after the peer's FIN: CLOSE_WAIT, LAST_ACK, CLOSING,
 * TIME_WAIT or CLOSE. A read of 0 bytes is a real EOF only then: a socket in a sockmap can read
 * 0 bytes while its bytes are being redirected.
 */
export function afterPeerFin(state: number): boolean {
  return state === 6 || state === 7 || state === 8 || state === 9 || state === 11;
}

/** The subset of struct tcp_info + inet_diag_msg the fast path needs. */
export interface TcpSocketInfo {
  /** TCP state (1 ESTABLISHED, 7 CLOSE, 8 CLOSE_WAIT, 4 FIN_WAIT1, ...). */
  state: number;
  /** tcpi_bytes_acked: payload bytes sent and acknowledged by the peer. */
  bytesAcked: number;
  /** tcpi_bytes_received: payload bytes received. */
  bytesReceived: number;
  /** tcpi_bytes_sent: payload bytes sent, retransmissions included (0 on kernels < 4.19). */
  bytesSent: number;
  /** tcpi_notsent_bytes: queued, not yet sent. */
  notsentBytes: number;
  /** idiag_wqueue: write_seq - snd_una, bytes queued in the socket and not yet acked. */
  writeQueue: number;
  /** idiag_rqueue: received bytes not yet read. */
  readQueue: number;
  /** sk_sndbuf in bytes (the kernel doubles what SO_SNDBUF asked for). */
  sndbuf: number;
  /** sk_rcvbuf in bytes (the kernel doubles what SO_RCVBUF asked for). */
  rcvbuf: number;
}

const AF_NETLINK = 16;
const TCP_LISTEN = 10;
const SOCK_RAW = 3;
const NETLINK_SOCK_DIAG = 4;
const SOCK_DIAG_BY_FAMILY = 20;
const NLMSG_ERROR = 2;
const NLM_F_REQUEST = 1;
const MSG_DONTWAIT = 0x40;
const IPPROTO_TCP = 6;
const INET_DIAG_INFO = 2;
const INET_DIAG_SKMEMINFO = 7; // u32[] indexed by SK_MEMINFO_*: RCVBUF = 1, SNDBUF = 3
const NLMSG_HDR = 16;
const REQ_LEN = NLMSG_HDR + 56; // nlmsghdr + inet_diag_req_v2
const DIAG_MSG_LEN = 72; // sizeof(struct inet_diag_msg)
// Offsets in struct tcp_info (linux/tcp.h), checked with offsetof on Linux 6.x headers.
const TCPI_BYTES_ACKED = 120;
const TCPI_BYTES_RECEIVED = 128;
const TCPI_NOTSENT_BYTES = 144;
const TCPI_BYTES_SENT = 200;

/** A NETLINK_SOCK_DIAG socket; query() is synchronous (the kernel answers within send). */
export class SockDiag implements Disposable {
  #fd: number;
  #seq = 1;
  readonly #req = new Uint8Array(REQ_LEN);
  readonly #reqView = new DataView(this.#req.buffer);
  readonly #resp = new Uint8Array(8192);
  readonly #respView = new DataView(this.#resp.buffer);

  private constructor(fd: number) {
    this.#fd = fd;
  }

  /** Open the netlink socket. @throws {SyscallError} */
  static open(): SockDiag {
    const fd = libc().socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
    if (fd < 0) throw new SyscallError("socket(AF_NETLINK, NETLINK_SOCK_DIAG)", errno());
    return new SockDiag(fd);
  }

  /** TCP info of the socket with this exact tuple, or null when no such socket exists. */
  query(t: SocketTuple): TcpSocketInfo | null {
    if (this.#fd < 0) throw new SyscallError("sock_diag query", 9);
    const req = this.#req;
    const v = this.#reqView;
    req.fill(0);
    const seq = this.#seq++;
    v.setUint32(0, REQ_LEN, true); // nlmsg_len (host order: little endian here and below)
    v.setUint16(4, SOCK_DIAG_BY_FAMILY, true);
    v.setUint16(6, NLM_F_REQUEST, true);
    v.setUint32(8, seq, true);
    req[16] = t.family;
    req[17] = IPPROTO_TCP;
    req[18] = (1 << (INET_DIAG_INFO - 1)) | (1 << (INET_DIAG_SKMEMINFO - 1));
    v.setUint32(20, 0xffffffff, true); // all states
    v.setUint16(24, t.localPort, false); // sport, network order
    v.setUint16(26, t.remotePort, false);
    req.set(t.localIp.subarray(0, 16), 28);
    req.set(t.remoteIp.subarray(0, 16), 44);
    v.setUint32(64, 0xffffffff, true); // INET_DIAG_NOCOOKIE
    v.setUint32(68, 0xffffffff, true);
    const lib = libc();
    const sent = lib.send(this.#fd, req, BigInt(REQ_LEN), 0);
    if (sent < 0) throw new SyscallError("sock_diag send", errno());
    for (;;) {
      const n = Number(lib.recv(this.#fd, this.#resp, BigInt(this.#resp.length), MSG_DONTWAIT));
      if (n < 0) throw new SyscallError("sock_diag recv", errno());
      const r = this.#respView;
      if (n < NLMSG_HDR || r.getUint32(8, true) !== seq) continue; // stale reply
      const type = r.getUint16(4, true);
      if (type === NLMSG_ERROR) {
        const err = -r.getInt32(16, true);
        if (err === 2) return null; // ENOENT: no such socket
        throw new SyscallError("sock_diag query", err);
      }
      if (type !== SOCK_DIAG_BY_FAMILY) throw new SyscallError("sock_diag reply type", 71);
      // the kernel may answer with a socket that only matches part of the tuple (the listener
      // on that port once the connection is gone): that is "no such socket"
      const state = this.#resp[17];
      const same = r.getUint16(20, false) === t.localPort &&
        r.getUint16(22, false) === t.remotePort;
      if (state === TCP_LISTEN || !same) return null;
      return this.#parse(Math.min(n, r.getUint32(0, true)));
    }
  }

  #parse(len: number): TcpSocketInfo {
    const r = this.#respView;
    const msg = NLMSG_HDR;
    const info: TcpSocketInfo = {
      state: this.#resp[msg + 1],
      readQueue: r.getUint32(msg + 56, true),
      writeQueue: r.getUint32(msg + 60, true),
      bytesAcked: 0,
      bytesReceived: 0,
      bytesSent: 0,
      notsentBytes: 0,
      sndbuf: 0,
      rcvbuf: 0,
    };
    let off = msg + DIAG_MSG_LEN;
    while (off + 4 <= len) {
      const alen = r.getUint16(off, true);
      const atype = r.getUint16(off + 2, true);
      if (alen < 4) break;
      if (atype === INET_DIAG_INFO) {
        const base = off + 4;
        const avail = alen - 4;
        const u64 = (o: number) => (o + 8 <= avail ? Number(r.getBigUint64(base + o, true)) : 0);
        info.bytesAcked = u64(TCPI_BYTES_ACKED);
        info.bytesReceived = u64(TCPI_BYTES_RECEIVED);
        info.bytesSent = u64(TCPI_BYTES_SENT);
        info.notsentBytes = TCPI_NOTSENT_BYTES + 4 <= avail
          ? r.getUint32(base + TCPI_NOTSENT_BYTES, true)
          : 0;
      }
      if (atype === INET_DIAG_SKMEMINFO && alen >= 4 + 16) {
        info.rcvbuf = r.getUint32(off + 4 + 4, true);
        info.sndbuf = r.getUint32(off + 4 + 12, true);
      }
      off += (alen + 3) & ~3;
    }
    return info;
  }

  /** Close the netlink socket. */
  close(): void {
    if (this.#fd >= 0) closeFd(this.#fd);
    this.#fd = -1;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
