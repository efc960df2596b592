/**
 * Loader and control of the eBPF splice fast path (bpf/sockmap.bpf.c).
 *
 * KernelAccel.open() loads the object, attaches the sk_skb verdict program to the sockhash and
 * pins the maps under a dir of this instance's own (its workers open them there). A routed
 * session then calls pair() with both sockets (fd and addresses): their pairing entries are
 * written and the sockets inserted into the sockhash by fd; from then on what arrives on one
 * socket is redirected inside the kernel to the other. unpair() takes both out again, and a
 * socket that closes leaves the sockhash by itself (the kernel's sock_map_close), so a session
 * that closes its sockets at once deletes only the pairing entries (release()).
 *
 * Nothing is machine-wide (no cgroup program, no shared pins): two instances on one host, or
 * an old and a new one during a restart, never see each other's sockets or maps.
 * @module
 */
import type { BpfMap } from "../../ffi/libbpf.ts";
import { possibleCpus } from "../../ffi/libbpf.ts";
import { setSocketBuffer } from "../../ffi/libc.ts";
import { SockDiag, type TcpSocketInfo } from "../conn/tcpinfo.ts";
import { encodeSockKey, instancePinDir, SOCKMAP_MAPS } from "./layout.ts";
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
  type SpliceSocket,
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
import {
  type KernelStats,
  readKernelStats,
  type SocketCounts,
  watchFill,
} from "./sockmap_stats.ts";

export { KernelAccelError, socketTuple, SplicePair };
export type {
  DrainOptions,
  DrainResult,
  KernelAccelOptions,
  KernelStats,
  PairCounters,
  SocketAddrs,
  SpliceSocket,
};
export type { HostPort } from "./sockmap_pairs.ts";

/** Log sink of the loader (same levels as the proxy's logger). */
export type KernelLog = EbpfLog;

/**
 * The eBPF splice fast path. The process that {@link KernelAccel.open}s it loads, attaches
 * and pins the program and maps (one set per proxy instance); its worker processes
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
  readonly #buffers: { sndbuf: number; rcvbuf: number };
  /** The sockets this process inserted into the sockhash, failed to, and has in it now. */
  readonly #sockets: SocketCounts = {
    inserted: 0,
    insertFailures: 0,
    setsockoptFailures: 0,
    live: 0,
  };
  /** The pin dir in use, or null when not pinning. */
  readonly pinDir: string | null;
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
    buffers?: { sndbuf?: number; rcvbuf?: number };
  }) {
    this.#owner = init.owner;
    this.#sockhash = init.sockhash;
    this.#table = new PairTable(init.sockhash, init.pairs, init.log);
    this.#stats = init.stats;
    this.#opened = init.opened ?? [];
    this.#log = init.log;
    this.#diag = init.diag;
    this.#buffers = { sndbuf: init.buffers?.sndbuf ?? 0, rcvbuf: init.buffers?.rcvbuf ?? 0 };
    this.pinDir = init.pinDir;
    this.#statsBuf = new Uint8Array(init.stats?.valueBufferSize ?? 0);
  }

  /**
   * Use the fast path another process of this instance (the supervisor) loaded and pinned
   * under `pinDir` (see open()): opens the pinned sockhash and pairing maps. `share` is this
   * process's part of the maps (1 / workers): the fill warning is about it.
   * @throws {KernelAccelError} when the pins are missing or of another layout.
   */
  static attach(
    log: KernelLog,
    pinDir: string,
    opts: { share?: number; sndbuf?: number; rcvbuf?: number } = {},
  ): KernelAccel {
    const { sockhash, pairs } = openPinnedMaps(pinDir);
    let accel: KernelAccel;
    try {
      accel = new KernelAccel({
        owner: null,
        sockhash,
        pairs,
        stats: null,
        opened: [sockhash, pairs],
        log,
        diag: SockDiag.open(),
        pinDir,
        buffers: opts,
      });
    } catch (e) {
      sockhash.close();
      pairs.close();
      throw e;
    }
    const capacity = Math.max(1, Math.floor(sockhash.info.maxEntries * (opts.share ?? 1)));
    accel.#fillTimer = watchFill(capacity, () => accel.#sockets.live, log);
    return accel;
  }

  /**
   * Load, attach and pin the fast path.
   * @throws {KernelAccelError} naming the cause and the fix; nothing stays attached then.
   */
  static async open(options: KernelAccelOptions): Promise<KernelAccel> {
    const log = options.log;
    const pinDir = options.pinDir === undefined ? instancePinDir() : options.pinDir;
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
      buffers: options,
    });
    log(
      "info",
      `eBPF sockmap fast path attached (pins ${
        pinDir ?? "none"
      }, maps.sockets ${options.maxSockets}, maps.pairs ${options.maxPairs})`,
    );
    accel.#fillTimer = watchFill(options.maxSockets, () => accel.#sockets.live, log);
    return accel;
  }

  /** True when the socket is in the sockhash (paired and not yet unpaired or closed). */
  isTracked(s: SocketAddrs): boolean {
    return this.#table.cookie(encodeSockKey(socketTuple(s))) !== null;
  }

  /**
   * Splice a and b: from now on what arrives on a goes out of b and vice versa, in the kernel.
   * Both must be established TCP sockets of this process. Bytes already received before this
   * call stay readable by userspace. Call it before userspace writes the ClientHello to the
   * backend. Sets `sndbuf`/`rcvbuf` (when configured) on both first.
   * @throws {KernelAccelError} when a socket is gone or no longer established (`socket_gone`),
   * or a map is full (`map_full`); nothing stays in the maps then, and the caller keeps
   * relaying in userspace.
   */
  pair(a: SpliceSocket, b: SpliceSocket): SplicePair {
    const p = new SplicePair(a, b, socketTuple(a), socketTuple(b));
    // acked + write queue counts the SYN of an actively opened socket once it is acked (a
    // connected socket's snd_una starts at its ISN, an accepted one's past it): known from how
    // the socket was opened, or learnt now, while nothing was written, so waitDrained compares
    // exactly. A socket no longer established is refused by the sockhash insert below
    for (const side of ["a", "b"] as const) {
      const opened = (side === "a" ? a : b).opened;
      if (opened) {
        p.synOffset[side] = opened === "connected" ? 1 : 0;
        continue;
      }
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
    this.#setBuffers(a.fd, b.fd);
    try {
      this.#table.insert(p);
    } catch (e) {
      this.#sockets.insertFailures++;
      throw e;
    }
    this.#sockets.inserted += 2;
    this.#sockets.live += 2;
    return p;
  }

  /** SO_SNDBUF/SO_RCVBUF on both sockets, when configured: they bound the kernel's memory. */
  #setBuffers(...fds: number[]): void {
    const { sndbuf, rcvbuf } = this.#buffers;
    for (const fd of fds) {
      if (sndbuf && setSocketBuffer(fd, "send", sndbuf) < 0) this.#sockets.setsockoptFailures++;
      if (rcvbuf && setSocketBuffer(fd, "receive", rcvbuf) < 0) {
        this.#sockets.setsockoptFailures++;
      }
    }
  }

  /** Bytes redirected so far, each way (0 for a side whose entry is gone). */
  counters(p: SplicePair): PairCounters {
    return { aToB: this.#table.bytes(p.keyA), bToA: this.#table.bytes(p.keyB) };
  }

  /**
   * Remove both pairing entries and both sockets from the sockhash; later traffic goes to
   * userspace. Returns the final counters. Call when the session ends, after the drains: a
   * socket leaving the sockhash drops what the kernel still queued for it.
   */
  unpair(p: SplicePair): PairCounters {
    const c = this.counters(p);
    this.#table.remove(p);
    this.#sockets.live -= 2;
    return c;
  }

  /**
   * Removes the pairing entries of `p` for sockets the caller closes right away (each leaves
   * the sockhash by itself as it closes: no delete per socket). `final`: the counters when the
   * caller already knows them (both directions drained at their EOF), which spares reading
   * them. Returns the final counters.
   */
  release(p: SplicePair, final: PairCounters | null = null): PairCounters {
    const c = final ?? this.counters(p);
    this.#table.removePairing(p);
    this.#sockets.live -= 2;
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

  /**
   * The verdict program's counters summed over CPUs (zero in a worker: its supervisor reads
   * them), with this process's socket counts.
   */
  stats(): KernelStats {
    return readKernelStats(this.#stats, this.#statsBuf, this.#sockets);
  }

  /** Entries in the pairing map (2 per spliced session); walks the map, for tests/diagnostics. */
  pairCount(): number {
    return this.#table.count();
  }

  /**
   * Detach the program, remove the pins and free the maps. Spliced sockets fall back to normal
   * delivery. Idempotent.
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

  /** The sockhash map fd (for bpf_prog_query in tests/diagnostics). */
  get sockhashFd(): number {
    return this.#sockhash.fd;
  }

  /** Number of possible CPUs the per-CPU counters are spread over. */
  static possibleCpus(): number {
    return possibleCpus();
  }
}
