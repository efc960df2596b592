/**
 * The pairing table of the sockmap fast path (`sni_pairs` of bpf/sockmap.bpf.c): which socket
 * is spliced to which, the sockhash the paired sockets are inserted into by fd, and the socket
 * 4-tuples both maps are keyed by.
 * @module
 */

import { BPF_NOEXIST, BpfError } from "../../ffi/libbpf.ts";
import { Errno } from "../../ffi/libc.ts";
import { parseIp } from "../net/ip.ts";
import type { SocketTuple } from "../conn/tcpinfo.ts";
import {
  encodePair,
  encodeSockKey,
  PAIR,
  pairBytes,
  SOCK_KEY,
  SOCKHASH_VALUE_SIZE,
} from "./layout.ts";
import { type EbpfLog, KernelAccelError } from "./loader.ts";

/** One end of a TCP connection (a socket's localAddr / remoteAddr). */
export interface HostPort {
  hostname: string;
  port: number;
}

/** A socket named by its own view of the connection. */
export interface SocketAddrs {
  local: HostPort;
  remote: HostPort;
}

/** A socket of this process: its fd (what the sockhash takes) and its 4-tuple (the keys). */
export interface SpliceSocket extends SocketAddrs {
  fd: number;
  /**
   * How the socket was opened, when the caller knows: an accepted socket's acked count starts
   * at 0, a connected one's at 1 (its SYN), so pair() need not ask the kernel (sock_diag).
   */
  opened?: "accepted" | "connected";
}

/** Bytes redirected in the kernel, per direction of a pair. */
export interface PairCounters {
  /** Received on socket a, redirected to b's egress. */
  aToB: number;
  /** Received on socket b, redirected to a's egress. */
  bToA: number;
}

/** A spliced pair; the opaque handle pair() returns. Holds prebuilt map keys. */
export class SplicePair {
  /** The sockets as given to pair(). */
  readonly a: SpliceSocket;
  readonly b: SpliceSocket;
  /**
   * @internal Both sockets' map keys, a's then b's, in one buffer: one batch call writes or
   * deletes both entries, and a pair lives as long as its connection (one allocation, not two).
   */
  readonly keys: Uint8Array<ArrayBuffer>;
  /** @internal a's key (a view of `keys`) */
  readonly keyA: Uint8Array;
  /** @internal */
  readonly keyB: Uint8Array;
  /** @internal 1 for a socket whose acked count includes its SYN (actively opened), else 0. */
  readonly synOffset = { a: 0, b: 0 };
  /** @internal */
  constructor(a: SpliceSocket, b: SpliceSocket, tupleA: SocketTuple, tupleB: SocketTuple) {
    this.a = a;
    this.b = b;
    this.keys = new Uint8Array(2 * SOCK_KEY.size);
    this.keyA = encodeSockKey(tupleA, this.keys.subarray(0, SOCK_KEY.size));
    this.keyB = encodeSockKey(tupleB, this.keys.subarray(SOCK_KEY.size));
  }

  /** @internal Socket a's 4-tuple, read from its key (its addresses are views of the key). */
  get tupleA(): SocketTuple {
    return tupleOfKey(this.keyA);
  }

  /** @internal */
  get tupleB(): SocketTuple {
    return tupleOfKey(this.keyB);
  }
}

/** The 4-tuple a map key was encoded from; the addresses are views of `key`. */
function tupleOfKey(key: Uint8Array): SocketTuple {
  const v = new DataView(key.buffer, key.byteOffset, key.byteLength);
  return {
    family: v.getUint32(SOCK_KEY.family, true) as SocketTuple["family"],
    localPort: v.getUint32(SOCK_KEY.localPort, true),
    remotePort: v.getUint32(SOCK_KEY.remotePort, true),
    localIp: key.subarray(SOCK_KEY.localIp, SOCK_KEY.localIp + 16),
    remoteIp: key.subarray(SOCK_KEY.remoteIp, SOCK_KEY.remoteIp + 16),
  };
}

/**
 * The 4-tuple of a socket from its addresses. IPv4-mapped IPv6 addresses (dual-stack
 * listeners) become IPv4, matching what the kernel programs store.
 * @throws {TypeError} for a hostname that is not an IP literal or a port out of range.
 */
export function socketTuple(s: SocketAddrs): SocketTuple {
  const l = parseIp(s.local.hostname);
  const r = parseIp(s.remote.hostname);
  if (!l || !r) {
    throw new TypeError(`not an IP socket address: ${s.local.hostname} / ${s.remote.hostname}`);
  }
  if (l.family !== r.family) {
    throw new TypeError(`address family mismatch: ${s.local.hostname} / ${s.remote.hostname}`);
  }
  for (const p of [s.local.port, s.remote.port]) {
    if (!Number.isInteger(p) || p < 1 || p > 65535) throw new TypeError(`bad port ${p}`);
  }
  return {
    family: l.family,
    localIp: l.bytes,
    localPort: s.local.port,
    remoteIp: r.bytes,
    remotePort: s.remote.port,
  };
}

/** `local<->remote`, for messages. */
export function describeSocket(s: SocketAddrs): string {
  const f = (
    h: HostPort,
  ) => (h.hostname.includes(":") ? `[${h.hostname}]:${h.port}` : `${h.hostname}:${h.port}`);
  return `${f(s.local)}<->${f(s.remote)}`;
}

/** The element operations the table needs, whether the map is owned or opened from a pin. */
export interface ElementMap {
  readonly fd: number;
  update(key: Uint8Array, value: Uint8Array, flags?: bigint): void;
  lookup(key: Uint8Array, out: Uint8Array): boolean;
  delete(key: Uint8Array): boolean;
  /** Writes `count` elements (packed keys and values) in one call. */
  updateBatch(keys: Uint8Array, values: Uint8Array, count: number): void;
  /** Deletes `count` packed keys in one call, up to the first absent one; returns how many. */
  deleteBatch(keys: Uint8Array, count: number): number;
  keys(): Generator<Uint8Array>;
}

/**
 * The pairing map and the sockhash: one pairing entry per spliced socket, naming its peer and
 * counting what the verdict program redirected from it, and the socket itself in the sockhash.
 */
export class PairTable {
  readonly #sockhash: ElementMap;
  readonly #pairs: ElementMap;
  readonly #log: EbpfLog;
  readonly #pairBuf = new Uint8Array(PAIR.size);
  /** Both entries' values of a pair, a's then b's. */
  readonly #bothBuf = new Uint8Array(2 * PAIR.size);
  readonly #cookieBuf = new Uint8Array(SOCKHASH_VALUE_SIZE);
  readonly #cookieView = new DataView(this.#cookieBuf.buffer);
  readonly #fdBuf = new Uint8Array(SOCKHASH_VALUE_SIZE);
  readonly #fdView = new DataView(this.#fdBuf.buffer);
  /** Not before this time (ms) may a full map be swept again: a sweep walks the whole map. */
  #nextSweep = 0;

  constructor(sockhash: ElementMap, pairs: ElementMap, log: EbpfLog) {
    this.#sockhash = sockhash;
    this.#pairs = pairs;
    this.#log = log;
  }

  /** The cookie of the socket keyed `key` in the sockhash, or null when it is not in it. */
  cookie(key: Uint8Array): bigint | null {
    if (!this.#sockhash.lookup(key, this.#cookieBuf)) return null;
    return this.#cookieView.getBigUint64(0, true);
  }

  /**
   * Writes both pairing entries of `p` (a's bytes count as upstream), then inserts b and a
   * into the sockhash; on failure nothing stays. The entries come first, so a socket redirects
   * from its first byte in the map; b (the backend, which has not yet been sent the hello, so
   * has nothing to say) goes in before a, so a failed insert never takes out a socket that may
   * hold bytes for userspace (leaving the map drops what it queued).
   * @throws {KernelAccelError} `map_full` when a map is full (the pairing map even after a
   * sweep), `socket_gone` when a socket is no longer established.
   */
  insert(p: SplicePair): void {
    let inserted = 0;
    try {
      this.#writeBoth(p);
      this.#insertSocket(p.keyB, p.b);
      inserted++;
      this.#insertSocket(p.keyA, p.a);
    } catch (e) {
      if (inserted) this.#sockhash.delete(p.keyB);
      this.removePairing(p);
      throw e;
    }
  }

  /**
   * Deletes both pairing entries and both sockets' sockhash entries of `p` (those already gone,
   * e.g. a socket reset by its peer, are skipped).
   */
  remove(p: SplicePair): void {
    for (const key of [p.keyA, p.keyB]) {
      this.#pairs.delete(key);
      this.#sockhash.delete(key);
    }
  }

  /**
   * Deletes both pairing entries of `p` only, for sockets about to be closed: a socket leaves the
   * sockhash by itself as it closes (the kernel's sock_map_close unlinks it), so deleting its
   * entry first would be a syscall per socket for nothing.
   */
  removePairing(p: SplicePair): void {
    // one call for both; it stops at an absent entry (swept meanwhile): b's is tried alone then
    if (this.#pairs.deleteBatch(p.keys, 2) === 0) this.#pairs.delete(p.keyB);
  }

  /** The redirected-bytes counter of the entry `key`, 0 when it is gone. */
  bytes(key: Uint8Array): number {
    if (!this.#pairs.lookup(key, this.#pairBuf)) return 0;
    return pairBytes(this.#pairBuf);
  }

  /** Entries in the map; walks it. */
  count(): number {
    let n = 0;
    for (const _ of this.#pairs.keys()) n++;
    return n;
  }

  /** The socket `s` into the sockhash under `key`, by its fd. */
  #insertSocket(key: Uint8Array, s: SpliceSocket): void {
    this.#fdView.setBigUint64(0, BigInt(s.fd), true);
    try {
      this.#sockhash.update(key, this.#fdBuf, BPF_NOEXIST);
    } catch (e) {
      const errno = e instanceof BpfError ? e.errno : 0;
      if (errno === Errno.E2BIG || errno === Errno.ENOMEM) {
        throw new KernelAccelError(
          "map_full",
          "the eBPF sockhash is full",
          "raise ebpf.maps.sockets (or limits.max_connections); this connection stays in userspace mode",
        );
      }
      // only an established socket may enter: one the peer closed or reset meanwhile may not
      if (errno === Errno.EOPNOTSUPP) {
        throw new KernelAccelError(
          "socket_gone",
          `socket ${describeSocket(s)} is no longer established`,
          "the connection is closing; it stays in userspace mode",
        );
      }
      throw e;
    }
  }

  /**
   * Writes both pairing entries of `p` in one call (a's bytes count as upstream). A full map
   * (E2BIG, or ENOMEM on preallocation) is swept of entries whose socket is gone (left by a
   * worker that was killed) once, then refused with `map_full` (the caller removes what was
   * written).
   */
  #writeBoth(p: SplicePair): void {
    const both = this.#bothBuf;
    both.set(encodePair(this.#pairBuf, p.keyB, true));
    both.set(encodePair(this.#pairBuf, p.keyA, false), PAIR.size);
    for (let attempt = 0;; attempt++) {
      try {
        this.#pairs.updateBatch(p.keys, both, 2);
        return;
      } catch (e) {
        const full = e instanceof BpfError && (e.errno === Errno.E2BIG || e.errno === Errno.ENOMEM);
        if (!full) throw e;
        if (attempt === 0 && this.#sweepStale() > 0) continue;
        throw new KernelAccelError(
          "map_full",
          "the eBPF pairing map is full",
          "raise ebpf.maps.pairs (or limits.max_connections); this connection stays in userspace mode",
        );
      }
    }
  }

  /**
   * Deletes pairing entries whose socket is not in the sockhash (left by a worker that was
   * killed: its sockets closed and left the sockhash by themselves); returns how many. It may
   * also catch a pair another process is making (entries written, sockets not yet in): that
   * pair's bytes then pass to its relay in userspace, which forwards them; nothing is lost.
   */
  #sweepStale(): number {
    const now = performance.now();
    if (now < this.#nextSweep) return 0;
    this.#nextSweep = now + 1000;
    let removed = 0;
    const stale: Uint8Array[] = [];
    for (const key of this.#pairs.keys()) {
      if (!this.#sockhash.lookup(key, this.#cookieBuf)) stale.push(key.slice());
    }
    for (const key of stale) if (this.#pairs.delete(key)) removed++;
    if (removed) this.#log("info", `eBPF maps full: removed ${removed} entries of closed sockets`);
    return removed;
  }
}
