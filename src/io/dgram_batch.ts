/**
 * Datagrams in batches: one recvmmsg(2) fills up to {@link DatagramBatch.capacity} slots, one
 * sendmmsg(2) sends the first k of them, so a burst costs two syscalls, not two per datagram.
 *
 * The batch is one off-heap buffer holding the datagram slots, their source addresses, the
 * iovecs and the struct mmsghdr array that points into it (64-bit Linux layout: msghdr 56
 * bytes, mmsghdr 64, iovec 16). The kernel writes each datagram's length and source address;
 * {@link datagram} and {@link source} are views of them, valid until the next call.
 *
 * @module
 */
import { lastErrno, sys } from "../../ffi/socket.ts";
import { SOCKADDR_SIZE } from "./sockaddr.ts";

const MMSGHDR = 64;
const IOVEC = 16;
/** Offsets in struct msghdr (x86_64 and aarch64). */
const NAME = 0;
const NAMELEN = 8;
const IOV = 16;
const IOVLEN = 24;
const CONTROL = 32;
const CONTROLLEN = 40;
/** struct mmsghdr.msg_len. */
const MSGLEN = 56;
/** Room for each datagram's control messages (one IP_PKTINFO or IPV6_PKTINFO). */
const CONTROL_BYTES = 64;

/** Slots of datagrams received or sent together. */
export class DatagramBatch {
  /** Datagrams a call takes at most. */
  readonly capacity: number;
  /** Bytes a slot holds (a longer datagram is cut: MSG_TRUNC). */
  readonly slotBytes: number;
  readonly #bytes: Uint8Array;
  readonly #view: DataView;
  readonly #hdrs: Uint8Array;
  readonly #namesAt: number;
  readonly #destAt: number;
  readonly #controlAt: number;
  readonly #base: bigint;
  #sendMode = false;

  constructor(capacity = 32, slotBytes = 65536) {
    this.capacity = capacity;
    this.slotBytes = slotBytes;
    const data = capacity * slotBytes;
    this.#namesAt = data;
    this.#destAt = this.#namesAt + capacity * 32;
    const iovAt = this.#destAt + 32;
    this.#controlAt = iovAt + capacity * IOVEC;
    const hdrAt = this.#controlAt + capacity * CONTROL_BYTES;
    this.#bytes = new Uint8Array(hdrAt + capacity * MMSGHDR);
    this.#view = new DataView(this.#bytes.buffer);
    this.#hdrs = this.#bytes.subarray(hdrAt);
    this.#base = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(this.#bytes)));
    const v = this.#view;
    for (let i = 0; i < capacity; i++) {
      const iov = iovAt + i * IOVEC;
      v.setBigUint64(iov, this.#base + BigInt(i * slotBytes), true);
      v.setBigUint64(iov + 8, BigInt(slotBytes), true);
      const h = hdrAt + i * MMSGHDR;
      v.setBigUint64(h + IOV, this.#base + BigInt(iov), true);
      v.setBigUint64(h + IOVLEN, 1n, true);
    }
    this.#recvMode();
  }

  /** The hdrs for recvmmsg: each slot's own source address area, whole slots. */
  #recvMode(): void {
    const v = this.#view;
    const hdrAt = this.#hdrs.byteOffset;
    const iovAt = this.#destAt + 32;
    for (let i = 0; i < this.capacity; i++) {
      const h = hdrAt + i * MMSGHDR;
      v.setBigUint64(h + NAME, this.#base + BigInt(this.#namesAt + i * 32), true);
      v.setUint32(h + NAMELEN, SOCKADDR_SIZE, true);
      v.setBigUint64(iovAt + i * IOVEC + 8, BigInt(this.slotBytes), true);
      v.setBigUint64(h + CONTROL, this.#base + BigInt(this.#controlAt + i * CONTROL_BYTES), true);
      v.setBigUint64(h + CONTROLLEN, BigInt(CONTROL_BYTES), true);
    }
    this.#sendMode = false;
  }

  /**
   * recvmmsg(2) of up to `max` datagrams from `fd` without waiting: how many came, or -errno
   * (-EAGAIN: none waits).
   */
  receive(fd: number, max = this.capacity): number {
    if (this.#sendMode) this.#recvMode();
    else {
      // the kernel wrote each source's length: give every slot its full room again
      const v = this.#view;
      const hdrAt = this.#hdrs.byteOffset;
      for (let i = 0; i < max; i++) {
        v.setUint32(hdrAt + i * MMSGHDR + NAMELEN, SOCKADDR_SIZE, true);
        v.setBigUint64(hdrAt + i * MMSGHDR + CONTROLLEN, BigInt(CONTROL_BYTES), true);
      }
    }
    const n = sys().recvmmsg(fd, this.#hdrs, Math.min(max, this.capacity), 0, null);
    return n < 0 ? -lastErrno() : n;
  }

  /** The length of datagram `i` of the last receive. */
  length(i: number): number {
    return Math.min(
      this.#view.getUint32(this.#hdrs.byteOffset + i * MMSGHDR + MSGLEN, true),
      this.slotBytes,
    );
  }

  /** Datagram `i` of the last receive (a view). */
  datagram(i: number): Uint8Array {
    const at = i * this.slotBytes;
    return this.#bytes.subarray(at, at + this.length(i));
  }

  /** The source address of datagram `i` of the last receive (a view of a sockaddr). */
  source(i: number): Uint8Array {
    const len = this.#view.getUint32(this.#hdrs.byteOffset + i * MMSGHDR + NAMELEN, true);
    const at = this.#namesAt + i * 32;
    return this.#bytes.subarray(at, at + Math.min(len, SOCKADDR_SIZE));
  }

  /**
   * The address datagram `i` of the last receive was sent to (from IP_PKTINFO /
   * IPV6_PKTINFO, which the socket must ask for: see udp.ts `wantDestination`), or null.
   */
  destination(i: number): string | null {
    const v = this.#view;
    const h = this.#hdrs.byteOffset + i * MMSGHDR;
    const len = Number(v.getBigUint64(h + CONTROLLEN, true));
    const at = this.#controlAt + i * CONTROL_BYTES;
    const b = this.#bytes;
    for (let c = 0; c + 16 <= len;) {
      const clen = Number(v.getBigUint64(at + c, true));
      const level = v.getInt32(at + c + 8, true);
      const type = v.getInt32(at + c + 12, true);
      const data = at + c + 16;
      if (level === 0 && type === 8 && clen >= 28) {
        return `${b[data + 8]}.${b[data + 9]}.${b[data + 10]}.${b[data + 11]}`;
      }
      if (level === 41 && type === 50 && clen >= 36) return ipv6Text(b.subarray(data, data + 16));
      if (clen < 16) break;
      c += (clen + 7) & ~7;
    }
    return null;
  }

  /**
   * sendmmsg(2) of datagrams `from` to `to - 1` of the last receive, each as received, on `fd`
   * to the sockaddr `dest` (null: a connected socket's peer): how many were sent, or -errno.
   */
  send(fd: number, from: number, to: number, dest: Uint8Array | null): number {
    const v = this.#view;
    const hdrAt = this.#hdrs.byteOffset;
    const iovAt = this.#destAt + 32;
    if (dest) this.#bytes.set(dest, this.#destAt);
    for (let i = from; i < to; i++) {
      const h = hdrAt + i * MMSGHDR;
      v.setBigUint64(iovAt + i * IOVEC + 8, BigInt(this.length(i)), true);
      v.setBigUint64(h + NAME, dest ? this.#base + BigInt(this.#destAt) : 0n, true);
      v.setUint32(h + NAMELEN, dest ? dest.length : 0, true);
      v.setBigUint64(h + CONTROL, 0n, true);
      v.setBigUint64(h + CONTROLLEN, 0n, true);
    }
    this.#sendMode = true;
    const n = sys().sendmmsg(fd, this.#hdrs.subarray(from * MMSGHDR), to - from, 0);
    return n < 0 ? -lastErrno() : n;
  }
}

/** An IPv6 address as text (an IPv4-mapped one as its IPv4 address). */
function ipv6Text(a: Uint8Array): string {
  let mapped = a[10] === 0xff && a[11] === 0xff;
  for (let i = 0; mapped && i < 10; i++) mapped = a[i] === 0;
  if (mapped) return `${a[12]}.${a[13]}.${a[14]}.${a[15]}`;
  const words: string[] = [];
  for (let i = 0; i < 16; i += 2) words.push(((a[i] << 8) | a[i + 1]).toString(16));
  return new URL(`http://[${words.join(":")}]/`).hostname.slice(1, -1);
}
