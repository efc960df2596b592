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

import {
  BPF_ANY,
  BpfAttachType,
  BpfError,
  type BpfLink,
  type BpfMap,
  BpfMapFd,
  type BpfObject,
  type BpfProgram,
  possibleCpus,
} from "../../ffi/libbpf.ts";
import { closeFd, Errno, openDirectory } from "../../ffi/libc.ts";
import { inRange, SOCKET_BUFFER_BYTES, SOCKMAP_ENTRIES } from "./bounds.ts";
import { parseIp } from "../net/ip.ts";
import { SockDiag, type SocketTuple, type TcpSocketInfo } from "../conn/tcpinfo.ts";
import {
  CGROUP_NAME,
  cgroupPath,
  createCgroup,
  currentCgroup2,
  ensureMounts,
  moveTo,
  refuseIfInUse,
  removeQuietly,
  removeStalePins,
} from "./host.ts";
import {
  encodePair,
  encodeSockKey,
  encodeSockmapConfig,
  KEY_ZERO,
  PAIR,
  pairBytes,
  PIN_DIR,
  PIN_LINK,
  PIN_MAPS,
  SOCK_KEY,
  SOCKHASH_VALUE_SIZE,
  SOCKMAP_MAPS,
  SOCKMAP_STATS_FIELDS,
  SOCKMAP_STATS_SIZE,
} from "./layout.ts";
import {
  checkBpfAccess,
  checkPlatform,
  type EbpfLog,
  KernelAccelError,
  loadError,
  openBpfObject,
  sumPerCpu,
  Undo,
  withLibbpfLog,
} from "./loader.ts";

export { KernelAccelError };

/** Log sink of the loader (same levels as the proxy's logger). */
export type KernelLog = EbpfLog;

/** Options of {@link KernelAccel.open}. */
export interface KernelAccelOptions {
  /** Capacity of the pairing map (2 entries per spliced session). */
  maxPairs: number;
  /** Capacity of the sockhash (every established socket of the proxy takes one). */
  maxSockets: number;
  /** SO_SNDBUF set on every tracked socket (bounds kernel memory); 0/undefined: kernel default. */
  sndbuf?: number;
  /** SO_RCVBUF set on every tracked socket; 0/undefined: kernel default (autotuning). */
  rcvbuf?: number;

  /** bpffs dir for pins (maps, link); default /sys/fs/bpf/sni-proxy; null: do not pin. */
  pinDir?: string | null;
  /**
   * cgroup v2 dir to run in, dedicated to the proxy; default `<cgroup2 mount>/sni-proxy`.
   * Created when missing, removed by close() once empty.
   */
  cgroupDir?: string;
  /** The compiled object's bytes; default: read bpf/sockmap.bpf.o next to this source tree. */
  object?: Uint8Array;
  /**
   * How the verdict program attaches to the sockhash: `stream_verdict` (default, Linux >= 5.10)
   * or `verdict` (BPF_SK_SKB_VERDICT, Linux >= 5.13). Both redirect correctly on 6.x.
   */
  verdictAttach?: "stream_verdict" | "verdict";
  /** Receives loader and libbpf messages. */
  log: KernelLog;
}

/** One side of a TCP connection as Deno reports it (conn.localAddr / conn.remoteAddr). */
export interface HostPort {
  hostname: string;
  port: number;
}

/** A socket named by its own view of the connection. */
export interface SocketAddrs {
  local: HostPort;
  remote: HostPort;
}

/** Bytes redirected in the kernel, per direction of a pair. */
export interface PairCounters {
  /** Received on socket a, redirected to b's egress. */
  aToB: number;
  /** Received on socket b, redirected to a's egress. */
  bToA: number;
}

/** Sum over CPUs of the kernel programs' counters (struct sni_stats). */
export interface KernelStats {
  bytesSpliced: number;
  /** Of bytesSpliced: client → backend (the `a` side of pair() is the client's). */
  bytesUpstream: number;
  /** Of bytesSpliced: backend → client. */
  bytesDownstream: number;
  /** Of packetsSpliced: client → backend / backend → client. */
  packetsUpstream: number;
  packetsDownstream: number;
  packetsSpliced: number;
  redirectFailures: number;
  passed: number;
  socketsInserted: number;
  insertFailures: number;
  setsockoptFailures: number;
  /** Payload-less skbs (a FIN) dropped by the verdict: TCP has already seen the FIN. */
  emptyDropped: number;
  /** Tracked sockets now (inserted less closed): the sockhash's fill, an upper bound of the pairs'. */
  socketsLive: number;
}

/** Result of {@link KernelAccel.waitDrained}. */
export interface DrainResult {
  /** True when the target socket took every expected byte within the time limit. */
  drained: boolean;
  /** Bytes the target socket had to take (redirected + written by userspace). */
  expected: number;
  /** Bytes it had taken at the end (acked, plus still queued unless `until: "acked"`). */
  taken: number;
  /** How long the wait took. */
  waitedMs: number;
  /** The longest time without progress (the socket taking no byte) during the wait. */
  stalledMs: number;
  /** False when the socket no longer exists (closed, reset). */
  socketFound: boolean;
}

/** A spliced pair; the opaque handle pair() returns. Holds prebuilt map keys. */
export class SplicePair {
  /** The sockets as given to pair(). */
  readonly a: SocketAddrs;
  readonly b: SocketAddrs;
  /** @internal */
  readonly keyA: Uint8Array;
  /** @internal */
  readonly keyB: Uint8Array;
  /** @internal */
  readonly tupleA: SocketTuple;
  /** @internal */
  readonly tupleB: SocketTuple;
  /** @internal 1 for a socket whose acked count includes its SYN (actively opened), else 0. */
  readonly synOffset = { a: 0, b: 0 };
  /** The sockets' cookies (SO_COOKIE) as the sockhash holds them: which sockets were paired. */
  readonly cookies = { a: 0n, b: 0n };
  /** @internal */
  constructor(a: SocketAddrs, b: SocketAddrs, tupleA: SocketTuple, tupleB: SocketTuple) {
    this.a = a;
    this.b = b;
    this.tupleA = tupleA;
    this.tupleB = tupleB;
    this.keyA = encodeSockKey(tupleA);
    this.keyB = encodeSockKey(tupleB);
  }
}

const VERDICT_ATTACH_TYPES = {
  stream_verdict: BpfAttachType.SK_SKB_STREAM_VERDICT,
  verdict: BpfAttachType.SK_SKB_VERDICT,
} as const;

/**
 * The 4-tuple of a socket from its Deno addresses. IPv4-mapped IPv6 addresses (dual-stack
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

function describe(s: SocketAddrs): string {
  const f = (
    h: HostPort,
  ) => (h.hostname.includes(":") ? `[${h.hostname}]:${h.port}` : `${h.hostname}:${h.port}`);
  return `${f(s.local)}<->${f(s.remote)}`;
}

/** The element operations KernelAccel needs, whether the map is owned or opened from a pin. */
interface ElementMap {
  readonly fd: number;
  update(key: Uint8Array, value: Uint8Array, flags?: bigint): void;
  lookup(key: Uint8Array, out: Uint8Array): boolean;
  delete(key: Uint8Array): boolean;
  keys(): Generator<Uint8Array>;
}

/** What the process that loaded the programs owns (and undoes in close()). */
interface Owner {
  obj: BpfObject;
  verdict: BpfProgram;
  link: BpfLink;
  cgroupFd: number;
  cgroupMount: string;
  originalCgroup: string;
  verdictType: number;
}

/**
 * The eBPF splice fast path. The process that {@link KernelAccel.open}s it loads, attaches
 * and pins the programs (one per machine); worker processes started from it (so in its cgroup)
 * {@link KernelAccel.attach} to the pinned maps. close() undoes what the instance did.
 */
export class KernelAccel {
  readonly #owner: Owner | null;
  readonly #sockhash: ElementMap;
  readonly #pairs: ElementMap;
  readonly #stats: BpfMap | null;
  /** Maps this instance opened from pins (closed by close()). */
  readonly #opened: BpfMapFd[];
  readonly #log: KernelLog;
  readonly #diag: SockDiag;
  /** The pin dir in use, or null when not pinning. */
  readonly pinDir: string | null;
  /** The cgroup v2 dir the sock_ops program is attached to. */
  readonly cgroupDir: string;
  readonly #pairBuf = new Uint8Array(PAIR.size);
  readonly #cookieBuf = new Uint8Array(SOCKHASH_VALUE_SIZE);
  readonly #cookieView = new DataView(this.#cookieBuf.buffer);
  readonly #statsBuf: Uint8Array;
  #closed = false;
  static #open = false;

  private constructor(init: {
    owner: Owner | null;
    sockhash: ElementMap;
    pairs: ElementMap;
    stats: BpfMap | null;
    opened?: BpfMapFd[];
    log: KernelLog;
    diag: SockDiag;
    pinDir: string | null;
    cgroupDir: string;
  }) {
    this.#owner = init.owner;
    this.#sockhash = init.sockhash;
    this.#pairs = init.pairs;
    this.#stats = init.stats;
    this.#opened = init.opened ?? [];
    this.#log = init.log;
    this.#diag = init.diag;
    this.pinDir = init.pinDir;
    this.cgroupDir = init.cgroupDir;
    this.#statsBuf = new Uint8Array(init.stats?.valueBufferSize ?? 0);
  }

  /**
   * Use the fast path another process of this proxy loaded and pinned (see open()): opens the
   * pinned sockhash and pairing maps. The calling process must already be in the cgroup the
   * sock_ops program is attached to (a worker inherits it from the process that spawned it).
   * @throws {KernelAccelError} when the pins are missing or of another layout.
   */
  static attach(log: KernelLog, pinDir: string = PIN_DIR): KernelAccel {
    const opened: BpfMapFd[] = [];
    const openMap = (name: string, keySize: number, valueSize: number): BpfMapFd => {
      let m: BpfMapFd;
      try {
        m = BpfMapFd.openPinned(`${pinDir}/${name}`);
      } catch (e) {
        throw new KernelAccelError(
          "no_pins",
          `cannot open the pinned map ${pinDir}/${name}: ${(e as Error).message}`,
          "the process that loads the fast path (the supervisor) must be running",
          { cause: e },
        );
      }
      opened.push(m);
      if (m.info.keySize !== keySize || m.info.valueSize !== valueSize) {
        throw new KernelAccelError(
          "pin_mismatch",
          `${pinDir}/${name} has key/value sizes ${m.info.keySize}/${m.info.valueSize}, ` +
            `expected ${keySize}/${valueSize}`,
          "the pins belong to another version of sni-proxy: restart the proxy",
        );
      }
      return m;
    };
    try {
      const sockhash = openMap(SOCKMAP_MAPS.sockhash, SOCK_KEY.size, SOCKHASH_VALUE_SIZE);
      const pairs = openMap(SOCKMAP_MAPS.pairs, SOCK_KEY.size, PAIR.size);
      return new KernelAccel({
        owner: null,
        sockhash,
        pairs,
        stats: null,
        opened,
        log,
        diag: SockDiag.open(),
        pinDir,
        cgroupDir: "",
      });
    } catch (e) {
      for (const m of opened) m.close();
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
    const verdictType = VERDICT_ATTACH_TYPES[options.verdictAttach ?? "stream_verdict"];
    checkOptions(options);
    if (KernelAccel.#open) {
      throw new KernelAccelError(
        "already_open",
        "the eBPF fast path is already open in this process",
        "close() the first KernelAccel before opening another",
      );
    }
    checkPlatform(
      KernelAccelError,
      "the eBPF fast path",
      [5, 10],
      "sockmap with sk_skb verdicts, sock_ops",
      "run in userspace mode",
    );
    await checkBpfAccess(
      KernelAccelError,
      "load eBPF programs",
      "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (cgroup and bpffs mounts)",
    );
    const obj = await openBpfObject(
      KernelAccelError,
      "sockmap.bpf.o",
      "sni_sockmap",
      "eBPF",
      options.object,
      log,
    );
    // Every step pushes its undo; a failure unwinds them all, newest first.
    const undo = new Undo();
    undo.push(() => obj.close());
    let host: HostSetup;
    try {
      host = await setUpHost(pinDir, options.cgroupDir, log, undo);
    } catch (e) {
      await undo.unwind();
      throw e;
    }
    try {
      load(obj, options, log);
      const owner = await attachPrograms(obj, host, verdictType, log, undo);
      if (pinDir !== null) await pin(obj, owner.link, pinDir, log, undo);
      KernelAccel.#open = true;
      const accel = new KernelAccel({
        owner,
        sockhash: obj.map(SOCKMAP_MAPS.sockhash),
        pairs: obj.map(SOCKMAP_MAPS.pairs),
        stats: obj.map(SOCKMAP_MAPS.stats),
        log,
        diag: SockDiag.open(),
        pinDir,
        cgroupDir: host.cgroupDir,
      });
      log(
        "info",
        `eBPF sockmap fast path attached (cgroup ${host.cgroupDir}, pins ${
          pinDir ?? "none"
        }, maps.sockets ${options.maxSockets}, maps.pairs ${options.maxPairs})`,
      );
      accel.#watchFill(options.maxSockets);
      return accel;
    } catch (e) {
      await undo.unwind();
      throw setupError(e);
    }
  }

  /** True when the socket is in the sockhash (the sock_ops program saw it established). */
  isTracked(s: SocketAddrs): boolean {
    return this.#sockhash.lookup(encodeSockKey(socketTuple(s)), this.#cookieBuf);
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
      if (!this.#sockhash.lookup(key, this.#cookieBuf)) {
        throw new KernelAccelError(
          "socket_not_tracked",
          `socket ${describe(s)} is not in the sockhash`,
          "it was established before the fast path was attached, or the sockhash was full " +
            "(ebpf.maps.sockets); it stays in userspace mode",
        );
      }
      p.cookies[side] = this.#cookieView.getBigUint64(0, true);
    }
    // acked + write queue counts the SYN of an actively opened socket once it is acked; learn
    // that offset now, while nothing was written, so waitDrained compares exactly
    for (const side of ["a", "b"] as const) {
      const info = this.#diag.query(side === "a" ? p.tupleA : p.tupleB);
      if (!info) {
        throw new KernelAccelError(
          "socket_gone",
          `socket ${describe(side === "a" ? a : b)} no longer exists`,
          "the connection closed before it could be spliced",
        );
      }
      p.synOffset[side] = info.bytesAcked + info.writeQueue === 1 ? 1 : 0;
    }
    try {
      this.#writePair(p.keyA, p.keyB, true);
      this.#writePair(p.keyB, p.keyA, false);
    } catch (e) {
      this.#removeEntries(p);
      throw e;
    }
    return p;
  }

  /** `upstream`: `key` is the client side (a of pair()), so its bytes count as upstream. */
  #writePair(key: Uint8Array, peer: Uint8Array, upstream: boolean): void {
    this.#update(this.#pairs, key, encodePair(this.#pairBuf, peer, upstream));
  }

  /**
   * A map update; a full map (E2BIG, or ENOMEM on preallocation) is swept of entries whose
   * socket is gone (left by a worker that was killed) once, then refused with `map_full`.
   */
  #update(map: ElementMap, key: Uint8Array, value: Uint8Array): void {
    for (let attempt = 0;; attempt++) {
      try {
        map.update(key, value, BPF_ANY);
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

  /** Not before this time (ms) may a full map be swept again: a sweep walks the whole map. */
  #nextSweep = 0;

  /** Deletes pairing entries whose socket left the sockhash; returns how many. */
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

  #removeEntries(p: SplicePair): void {
    for (const key of [p.keyA, p.keyB]) this.#pairs.delete(key);
  }

  #readBytes(key: Uint8Array): number {
    if (!this.#pairs.lookup(key, this.#pairBuf)) return 0;
    return pairBytes(this.#pairBuf);
  }

  /** Bytes redirected so far, each way (0 for a side whose entry is gone). */
  counters(p: SplicePair): PairCounters {
    return { aToB: this.#readBytes(p.keyA), bToA: this.#readBytes(p.keyB) };
  }

  /**
   * Remove both pairing entries; later traffic goes to userspace. Returns the final counters.
   * Call when the session ends (bytes already redirected are delivered regardless).
   */
  unpair(p: SplicePair): PairCounters {
    const c = this.counters(p);
    this.#removeEntries(p);
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
  async waitDrained(
    p: SplicePair,
    toward: "a" | "b",
    userspaceBytes: number,
    opts: {
      timeoutMs?: number;
      until?: "queued" | "acked";
      sourceFinal?: boolean;
      signal?: AbortSignal;
      progress?: () => void;
    } = {},
  ): Promise<DrainResult> {
    const timeoutMs = opts.timeoutMs ?? 5000;
    const start = performance.now();
    const sourceKey = toward === "a" ? p.keyB : p.keyA;
    const source = toward === "a" ? p.tupleB : p.tupleA;
    const target = toward === "a" ? p.tupleA : p.tupleB;
    const synOffset = p.synOffset[toward];
    let delay = 1;
    let lastTaken = -1;
    let progressAt = start;
    let stalledMs = 0;
    for (;;) {
      // The source's EOF can reach userspace while the verdict program has not yet seen the
      // last bytes before it (strparser runs apart from recvmsg): until the source's receive
      // queue holds nothing but the FIN (rcv_nxt - copied_seq <= 1, the FIN being the last
      // sequence number), the redirect counter is not final. Call only after a real EOF.
      const src = opts.sourceFinal === false ? null : this.#diag.query(source);
      const sourceDone = !src || src.readQueue <= 1;
      const expected = this.#readBytes(sourceKey) + userspaceBytes;
      const info = this.#diag.query(target);
      const taken = info
        ? info.bytesAcked - synOffset + (opts.until === "acked" ? 0 : info.writeQueue)
        : 0;
      const now = performance.now();
      if (taken !== lastTaken) {
        if (lastTaken >= 0) opts.progress?.();
        lastTaken = taken;
        progressAt = now;
      }
      stalledMs = Math.max(stalledMs, now - progressAt);
      const drained = !!info && sourceDone && taken >= expected;
      if (
        drained || !info || now - progressAt >= timeoutMs || opts.signal?.aborted
      ) {
        return {
          drained,
          expected,
          taken,
          waitedMs: now - start,
          stalledMs,
          socketFound: !!info,
        };
      }
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 50);
    }
  }

  #fillTimer: ReturnType<typeof setInterval> | undefined;

  /**
   * Warns (once per crossing) when the tracked sockets pass 80 % of the maps' size: past 100 %
   * new connections run in userspace mode. Every tracked socket can take one pairing entry, so
   * this also bounds the pairing map's fill.
   */
  #watchFill(capacity: number): void {
    let warned = false;
    const timer = setInterval(() => {
      const live = this.stats().socketsLive;
      if (!warned && live > capacity * 0.8) {
        warned = true;
        this.#log(
          "warning",
          `eBPF maps ${Math.round(live / capacity * 100)}% full (${live} of ${capacity} ` +
            `sockets): when full, new connections run in userspace mode; raise ebpf.maps`,
        );
      } else if (warned && live < capacity * 0.7) {
        warned = false;
        this.#log("info", `eBPF maps back under 70% full (${live} of ${capacity} sockets)`);
      }
    }, 500);
    Deno.unrefTimer(timer);
    this.#fillTimer = timer;
  }

  /** The kernel programs' counters summed over CPUs. */
  stats(): KernelStats {
    const buf = this.#statsBuf;
    const ok = this.#stats?.lookup(KEY_ZERO, buf) ?? false;
    const s = sumPerCpu(ok ? buf : new Uint8Array(0), SOCKMAP_STATS_SIZE, SOCKMAP_STATS_FIELDS);
    return {
      bytesSpliced: s.bytes_spliced,
      packetsSpliced: s.packets_spliced,
      redirectFailures: s.redirect_failures,
      passed: s.passed,
      socketsInserted: s.sockets_inserted,
      insertFailures: s.insert_failures,
      setsockoptFailures: s.setsockopt_failures,
      bytesUpstream: s.bytes_upstream,
      bytesDownstream: s.bytes_spliced - s.bytes_upstream,
      packetsUpstream: s.packets_upstream,
      packetsDownstream: s.packets_spliced - s.packets_upstream,
      emptyDropped: s.empty_dropped,
      socketsLive: Math.max(0, s.sockets_inserted - s.sockets_closed),
    };
  }

  /** Entries in the pairing map (2 per spliced session); walks the map, for tests/diagnostics. */
  pairCount(): number {
    let n = 0;
    for (const _ of this.#pairs.keys()) n++;
    return n;
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
    const warn = (what: string, e: unknown) =>
      this.#log("warning", `eBPF close: ${what}: ${(e as Error).message}`);
    try {
      owner.link.detach();
    } catch (e) {
      warn("detach sock_ops", e);
    }
    if (this.pinDir !== null) {
      for (const p of [...PIN_MAPS, PIN_LINK]) {
        await removeQuietly(`${this.pinDir}/${p}`);
      }
      await removeQuietly(this.pinDir);
    }
    owner.link.destroy();
    closeFd(owner.cgroupFd);
    try {
      owner.verdict.detachFromMap(owner.obj.map(SOCKMAP_MAPS.sockhash), owner.verdictType);
    } catch (e) {
      warn("detach verdict", e);
    }
    owner.obj.close();
    const original = cgroupPath(owner.cgroupMount, owner.originalCgroup);
    await moveTo(original).catch((e) => warn(`move back to cgroup ${original}`, e));
    // The cgroup dir is dedicated to the proxy (a previous run may have created it): remove it
    // once empty; rmdir fails harmlessly while other processes are in it.
    await removeQuietly(this.cgroupDir);
    this.#log("info", "eBPF sockmap fast path detached");
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

/** Refuse map sizes and buffer sizes out of range (`bad_option`). */
function checkOptions(options: KernelAccelOptions): void {
  const maps = [["maxPairs", options.maxPairs], ["maxSockets", options.maxSockets]] as const;
  for (const [name, v] of maps) {
    if (!inRange(v, SOCKMAP_ENTRIES)) {
      throw new KernelAccelError(
        "bad_option",
        `${name} must be an integer from ${SOCKMAP_ENTRIES.min} to ${SOCKMAP_ENTRIES.max} (got ${v})`,
        `fix ebpf.maps in the config`,
      );
    }
  }
  for (const [name, v] of [["sndbuf", options.sndbuf], ["rcvbuf", options.rcvbuf]] as const) {
    if (v !== undefined && !inRange(v, SOCKET_BUFFER_BYTES)) {
      throw new KernelAccelError(
        "bad_option",
        `${name} must be an integer from ${SOCKET_BUFFER_BYTES.min} to ${SOCKET_BUFFER_BYTES.max} (got ${v})`,
        "fix the ebpf buffer size in the config",
      );
    }
  }
}

/** The cgroup the fast path runs in, and where this process came from. */
interface HostSetup {
  cgroupMount: string;
  cgroupDir: string;
  originalCgroup: string;
}

/**
 * cgroup v2 and bpffs mounted, the proxy's cgroup dir created (and not shared with another
 * proxy), a previous run's pins removed.
 */
async function setUpHost(
  pinDir: string | null,
  cgroupDirOption: string | undefined,
  log: KernelLog,
  undo: Undo,
): Promise<HostSetup> {
  const cgroupMount = await ensureMounts(pinDir, log);
  const cgroupDir = cgroupDirOption ?? `${cgroupMount}/${CGROUP_NAME}`;
  const originalCgroup = await currentCgroup2();
  if (await createCgroup(cgroupDir)) undo.push(() => removeQuietly(cgroupDir));
  await refuseIfInUse(cgroupDir);
  if (pinDir !== null) await removeStalePins(pinDir, log);
  return { cgroupMount, cgroupDir, originalCgroup };
}

/** Size the maps, load the programs and write the config map. */
function load(obj: BpfObject, options: KernelAccelOptions, log: KernelLog): void {
  obj.map(SOCKMAP_MAPS.sockhash).setMaxEntries(options.maxSockets);
  obj.map(SOCKMAP_MAPS.pairs).setMaxEntries(options.maxPairs);
  try {
    withLibbpfLog(log, () => obj.load());
  } catch (e) {
    throw loadError(KernelAccelError, e, {
      program: "the eBPF program",
      verifierFallback: "run in userspace mode",
      memoryErrnos: [Errno.ENOMEM, Errno.E2BIG],
      memory: {
        reason: "no_memory",
        cause: (errnoName) =>
          `the kernel could not allocate the eBPF maps (${errnoName}; ebpf.maps.sockets ${options.maxSockets}, ebpf.maps.pairs ${options.maxPairs})`,
        fix:
          "lower ebpf.maps.sockets / ebpf.maps.pairs, or raise RLIMIT_MEMLOCK (ulimit -l) on kernels before 5.11",
      },
      refused: "eBPF",
      permissionFix:
        "run as root with CAP_BPF and CAP_NET_ADMIN; on kernels before 5.11 raise RLIMIT_MEMLOCK (ulimit -l unlimited); check kernel lockdown",
      object: "the eBPF object",
      otherFix: "check the kernel supports sockmap and cgroup BPF",
    });
  }
  obj.map(SOCKMAP_MAPS.config).update(
    KEY_ZERO,
    encodeSockmapConfig(options.sndbuf ?? 0, options.rcvbuf ?? 0),
  );
}

/**
 * Attach the verdict program to the sockhash, move this process into the cgroup and attach the
 * sock_ops program there.
 */
async function attachPrograms(
  obj: BpfObject,
  host: HostSetup,
  verdictType: number,
  log: KernelLog,
  undo: Undo,
): Promise<Owner> {
  // Verdict first: a socket in a sockmap without a verdict program loses readiness
  // notifications on recent kernels, and no socket can enter the map before sock_ops runs.
  const verdict = obj.program("sni_verdict");
  const sockhash = obj.map(SOCKMAP_MAPS.sockhash);
  withLibbpfLog(log, () => verdict.attachToMap(sockhash, verdictType));
  undo.push(() => verdict.detachFromMap(sockhash, verdictType)); // else freed with the map

  await moveTo(host.cgroupDir);
  undo.push(() => moveTo(cgroupPath(host.cgroupMount, host.originalCgroup)));
  const cgroupFd = openDirectory(host.cgroupDir);
  undo.push(() => closeFd(cgroupFd));
  const link = withLibbpfLog(log, () => obj.program("sni_sockops").attachCgroup(cgroupFd));
  undo.push(() => {
    try {
      link.detach();
    } catch { /* already gone */ }
    link.destroy();
  });
  return { obj, verdict, link, cgroupFd, ...host, verdictType };
}

/** Pin the maps and the sock_ops link under `pinDir`. */
async function pin(
  obj: BpfObject,
  link: BpfLink,
  pinDir: string,
  log: KernelLog,
  undo: Undo,
): Promise<void> {
  await Deno.mkdir(pinDir, { recursive: true });
  for (const name of PIN_MAPS) {
    withLibbpfLog(log, () => obj.map(name).pin(`${pinDir}/${name}`));
    undo.push(() => removeQuietly(`${pinDir}/${name}`));
  }
  withLibbpfLog(log, () => link.pin(`${pinDir}/${PIN_LINK}`));
  undo.push(() => removeQuietly(`${pinDir}/${PIN_LINK}`));
}

/** A failed load or attach step as a {@link KernelAccelError}. */
function setupError(e: unknown): KernelAccelError {
  if (e instanceof KernelAccelError) return e;
  const err = e as Error;
  const eperm = e instanceof BpfError && e.errno === Errno.EPERM;
  return new KernelAccelError(
    eperm ? "not_permitted" : "attach_failed",
    `eBPF fast path setup failed: ${err.message}`,
    eperm
      ? "run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); check kernel lockdown"
      : "check the kernel supports sockmap (CONFIG_BPF_STREAM_PARSER) and cgroup BPF (CONFIG_CGROUP_BPF)",
    { cause: e },
  );
}
