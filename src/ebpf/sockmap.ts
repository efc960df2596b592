/**
 * Loader and control of the eBPF splice fast path (bpf/sockmap.bpf.c).
 *
 * KernelAccel.open() loads the object, attaches the sk_skb verdict program to the sockhash,
 * moves this process into a cgroup v2 dir and attaches the sock_ops program there, so every TCP
 * socket this process establishes afterwards (accepted or connected) lands in the sockhash.
 * A routed session then calls pair() with both sockets' addresses; from then on what arrives on
 * one socket is redirected inside the kernel to the other.
 *
 * Sockets belong to the cgroup of the process that created them, and accepted sockets inherit
 * their listener's: listeners must be created after open(), or their connections are not
 * tracked (pair() then throws, and the session stays in userspace).
 * @module
 */
import type { BpfMap } from "../../ffi/libbpf.ts";
import { possibleCpus } from "../../ffi/libbpf.ts";
import { SockDiag, type TcpSocketInfo } from "../conn/tcpinfo.ts";
import { encodeSockKey, PIN_DIR, SOCKMAP_MAPS } from "./layout.ts";
import { type EbpfLog, KernelAccelError } from "./loader.ts";
import { type DrainOptions, type DrainResult, waitDrained } from "./sockmap_drain.ts";
import {
  describeSocket,
  type ElementMap,
  type PairCounters,
  PairTable,
  type SocketAddrs,
  socketTuple,
  SplicePair,
} from "./sockmap_pairs.ts";
import {
  checkOptions,
  checkSupport,
  type KernelAccelOptions,
  loadSockmap,
  openPinnedMaps,
  type Owner,
  releaseSockmap,
} from "./sockmap_setup.ts";
import { type KernelStats, readKernelStats, watchFill } from "./sockmap_stats.ts";

export { KernelAccelError, socketTuple, SplicePair };
export type {
  DrainOptions,
  DrainResult,
  KernelAccelOptions,
  KernelStats,
  PairCounters,
  SocketAddrs,
};
export type { HostPort } from "./sockmap_pairs.ts";

/** Log sink of the loader (same levels as the proxy's logger). */
export type KernelLog = EbpfLog;

/**
 * The eBPF splice fast path. The process that {@link KernelAccel.open}s it loads, attaches
 * and pins the programs (one per machine); worker processes started from it (so in its cgroup)
 * {@link KernelAccel.attach} to the pinned maps. close() undoes what the instance did.
 */
export class KernelAccel {
  readonly #owner: Owner | null;
  readonly #sockhash: ElementMap;
  readonly #table: PairTable;
  readonly #stats: BpfMap | null;
  /** Maps this instance opened from pins (closed by close()). */
  readonly #opened: { close(): void }[];
  readonly #log: KernelLog;
  readonly #diag: SockDiag;
  /** The pin dir in use, or null when not pinning. */
  readonly pinDir: string | null;
  /** The cgroup v2 dir the sock_ops program is attached to. */
  readonly cgroupDir: string;
  readonly #statsBuf: Uint8Array;
  #fillTimer: ReturnType<typeof setInterval> | undefined;
  #closed = false;
  static #open = false;

  private constructor(init: {
    owner: Owner | null;
    sockhash: ElementMap;
    pairs: ElementMap;
    stats: BpfMap | null;
    opened?: { close(): void }[];
    log: KernelLog;
    diag: SockDiag;
    pinDir: string | null;
  }) {
    this.#owner = init.owner;
    this.#sockhash = init.sockhash;
    this.#table = new PairTable(init.sockhash, init.pairs, init.log);
    this.#stats = init.stats;
    this.#opened = init.opened ?? [];
    this.#log = init.log;
    this.#diag = init.diag;
    this.pinDir = init.pinDir;
    this.cgroupDir = init.owner?.cgroupDir ?? "";
    this.#statsBuf = new Uint8Array(init.stats?.valueBufferSize ?? 0);
  }

  /**
   * Use the fast path another process of this proxy loaded and pinned (see open()): opens the
   * pinned sockhash and pairing maps. The calling process must already be in the cgroup the
   * sock_ops program is attached to (a worker inherits it from the process that spawned it).
   * @throws {KernelAccelError} when the pins are missing or of another layout.
   */
  static attach(log: KernelLog, pinDir: string = PIN_DIR): KernelAccel {
    const { sockhash, pairs } = openPinnedMaps(pinDir);
    try {
      return new KernelAccel({
        owner: null,
        sockhash,
        pairs,
        stats: null,
        opened: [sockhash, pairs],
        log,
        diag: SockDiag.open(),
        pinDir,
      });
    } catch (e) {
      sockhash.close();
      pairs.close();
      throw e;
    }
  }

  /**
   * Load, attach and pin the fast path and move this process into its cgroup.
   * @throws {KernelAccelError} naming the cause and the fix; nothing stays attached then.
   */
  static async open(options: KernelAccelOptions): Promise<KernelAccel> {
    const log = options.log;
    const pinDir = options.pinDir === undefined ? PIN_DIR : options.pinDir;
    checkOptions(options);
    if (KernelAccel.#open) {
      throw new KernelAccelError(
        "already_open",
        "the eBPF fast path is already open in this process",
        "close() the first KernelAccel before opening another",
      );
    }
    await checkSupport();
    const diag = SockDiag.open();
    let owner: Owner;
    try {
      owner = await loadSockmap(options, pinDir);
    } catch (e) {
      diag.close();
      throw e;
    }
    KernelAccel.#open = true;
    const accel = new KernelAccel({
      owner,
      sockhash: owner.obj.map(SOCKMAP_MAPS.sockhash),
      pairs: owner.obj.map(SOCKMAP_MAPS.pairs),
      stats: owner.obj.map(SOCKMAP_MAPS.stats),
      log,
      diag,
      pinDir,
    });
    log(
      "info",
      `eBPF sockmap fast path attached (cgroup ${owner.cgroupDir}, pins ${
        pinDir ?? "none"
      }, maps.sockets ${options.maxSockets}, maps.pairs ${options.maxPairs})`,
    );
    accel.#fillTimer = watchFill(options.maxSockets, () => accel.stats().socketsLive, log);
    return accel;
  }

  /** True when the socket is in the sockhash (the sock_ops program saw it established). */
  isTracked(s: SocketAddrs): boolean {
    return this.#table.cookie(encodeSockKey(socketTuple(s))) !== null;
  }

  /**
   * Splice a and b: from now on what arrives on a goes out of b and vice versa, in the kernel.
   * Bytes already received before this call stay readable by userspace. Call it before
   * userspace writes the ClientHello to the backend.
   * @throws {KernelAccelError} when a socket is not tracked (created before open(), or the
   * sockhash was full), gone, or the pairing map is full (`map_full`); the caller keeps relaying
   * in userspace.
   */
  pair(a: SocketAddrs, b: SocketAddrs): SplicePair {
    const p = new SplicePair(a, b, socketTuple(a), socketTuple(b));
    for (const [side, key, s] of [["a", p.keyA, a], ["b", p.keyB, b]] as const) {
      const cookie = this.#table.cookie(key);
      if (cookie === null) {
        throw new KernelAccelError(
          "socket_not_tracked",
          `socket ${describeSocket(s)} is not in the sockhash`,
          "it was established before the fast path was attached, or the sockhash was full " +
            "(ebpf.maps.sockets); it stays in userspace mode",
        );
      }
      p.cookies[side] = cookie;
    }
    // acked + write queue counts the SYN of an actively opened socket once it is acked; learn
    // that offset now, while nothing was written, so waitDrained compares exactly
    for (const side of ["a", "b"] as const) {
      const info = this.#diag.query(side === "a" ? p.tupleA : p.tupleB);
      if (!info) {
        throw new KernelAccelError(
          "socket_gone",
          `socket ${describeSocket(side === "a" ? a : b)} no longer exists`,
          "the connection closed before it could be spliced",
        );
      }
      p.synOffset[side] = info.bytesAcked + info.writeQueue === 1 ? 1 : 0;
    }
    this.#table.insert(p);
    return p;
  }

  /** Bytes redirected so far, each way (0 for a side whose entry is gone). */
  counters(p: SplicePair): PairCounters {
    return { aToB: this.#table.bytes(p.keyA), bToA: this.#table.bytes(p.keyB) };
  }

  /**
   * Remove both pairing entries; later traffic goes to userspace. Returns the final counters.
   * Call when the session ends (bytes already redirected are delivered regardless).
   */
  unpair(p: SplicePair): PairCounters {
    const c = this.counters(p);
    this.#table.remove(p);
    return c;
  }

  /**
   * TCP info of a socket by 4-tuple (sock_diag), or null when it no longer exists.
   */
  tcpInfo(s: SocketAddrs): TcpSocketInfo | null {
    return this.#diag.query(socketTuple(s));
  }

  /**
   * Wait until the socket `toward` ("a" or "b") has taken every byte meant for it: what the
   * kernel redirected to it (the peer's counter) plus `userspaceBytes`, all bytes userspace
   * wrote to it over the connection's life (ClientHello included). Redirected bytes pass through
   * an asynchronous queue, so closing or shutting down the socket before this loses data.
   * `until: "queued"` (default) means in the socket's TCP write queue or acked (safe to
   * closeWrite()/close()); `"acked"` waits for the peer's ACK. Gives up only after `timeoutMs`
   * without progress (the socket taking no byte; `progress` is called on each), or when `signal`
   * is aborted: a slow reader that keeps reading is waited for.
   * Call it before closeWrite() of the target socket (an acked FIN would count as a byte).
   * `sourceFinal` (default true): the source is at EOF, so also wait until its receive queue
   * is empty; false when userspace is about to write bytes it read mid-stream.
   */
  waitDrained(
    p: SplicePair,
    toward: "a" | "b",
    userspaceBytes: number,
    opts: DrainOptions = {},
  ): Promise<DrainResult> {
    const table = this.#table;
    const from = { diag: this.#diag, redirected: (key: Uint8Array) => table.bytes(key) };
    return waitDrained(from, p, toward, userspaceBytes, opts);
  }

  /** The kernel programs' counters summed over CPUs. */
  stats(): KernelStats {
    return readKernelStats(this.#stats, this.#statsBuf);
  }

  /** Entries in the pairing map (2 per spliced session); walks the map, for tests/diagnostics. */
  pairCount(): number {
    return this.#table.count();
  }

  /**
   * Detach both programs, remove the pins, move the process back to its original cgroup and
   * free the maps. Spliced sockets fall back to normal delivery. Idempotent.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    clearInterval(this.#fillTimer);
    this.#diag.close();
    for (const m of this.#opened) m.close();
    const owner = this.#owner;
    if (!owner) return;
    KernelAccel.#open = false;
    await releaseSockmap(owner, this.pinDir, this.#log);
  }

  /** The cgroup dir fd the sock_ops program is attached to (-1 in an attached worker). */
  get cgroupFd(): number {
    return this.#owner?.cgroupFd ?? -1;
  }

  /** The sockhash map fd (for bpf_prog_query in tests/diagnostics). */
  get sockhashFd(): number {
    return this.#sockhash.fd;
  }

  /** Number of possible CPUs the per-CPU counters are spread over. */
  static possibleCpus(): number {
    return possibleCpus();
  }
}
