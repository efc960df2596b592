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
  BpfObject,
  type BpfProgram,
  libbpf,
  linkDetachFd,
  logTail,
  objGet,
  possibleCpus,
  setLibbpfLogger,
} from "../ffi/libbpf.ts";
import { closeFd, mountFs, openDirectory } from "../ffi/libc.ts";
import { parseIp, SockDiag, type SocketTuple, type TcpSocketInfo } from "./tcpinfo.ts";

/** Log sink of the loader (same levels as the proxy's logger). */
export type KernelLog = (level: "debug" | "info" | "warning" | "error", message: string) => void;

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

/** Why the fast path is unavailable: `message` names the cause and the fix. */
export class KernelAccelError extends Error {
  /** Short machine-readable cause, e.g. `not_root`, `no_libbpf`, `load_failed`. */
  readonly reason: string;
  /** What the operator can do about it. */
  readonly fix: string;
  constructor(reason: string, cause: string, fix: string, options?: { cause?: unknown }) {
    super(`${cause}; ${fix}`, options);
    this.name = "KernelAccelError";
    this.reason = reason;
    this.fix = fix;
  }
}

/**
 * Fails with `unsupported_platform` off Linux on x86_64/aarch64 (the map layouts are little
 * endian), and with `old_kernel` below `minKernel`. `feature` names what needs it ("the XDP
 * filter"), `needs` what that kernel brings, `fallback` what to do instead.
 */
export function checkPlatform(
  feature: string,
  minKernel: [number, number],
  needs: string,
  fallback: string,
  fail: (reason: string, cause: string, fix: string) => Error,
): void {
  if (Deno.build.os !== "linux" || !["x86_64", "aarch64"].includes(Deno.build.arch)) {
    throw fail(
      "unsupported_platform",
      `${feature} needs Linux on x86_64 or aarch64 (this is ${Deno.build.os}/${Deno.build.arch})`,
      fallback,
    );
  }
  const m = Deno.osRelease().match(/^(\d+)\.(\d+)/);
  const [major, minor] = m ? [Number(m[1]), Number(m[2])] : [0, 0];
  const [wantMajor, wantMinor] = minKernel;
  if (major < wantMajor || (major === wantMajor && minor < wantMinor)) {
    throw fail(
      "old_kernel",
      `kernel ${Deno.osRelease()} is older than ${wantMajor}.${wantMinor} (${needs})`,
      `upgrade to Linux ${wantMajor}.${wantMinor} or later, or ${fallback}`,
    );
  }
}

/**
 * Fails with `not_root` unless this process may load BPF programs (CAP_SYS_ADMIN, or CAP_BPF
 * with CAP_NET_ADMIN), or with `no_libbpf` when libbpf.so.1 cannot be loaded.
 */
export async function checkBpfAccess(
  action: string,
  privilegeFix: string,
  fail: (reason: string, cause: string, fix: string, e?: unknown) => Error,
): Promise<void> {
  const caps = await effectiveCaps();
  const has = (c: bigint) => (caps >> c) & 1n;
  if (!has(CAP_SYS_ADMIN) && !(has(CAP_BPF) && has(CAP_NET_ADMIN))) {
    throw fail(
      "not_root",
      `not permitted to ${action} (no CAP_BPF + CAP_NET_ADMIN, not root)`,
      privilegeFix,
    );
  }
  try {
    libbpf();
  } catch (e) {
    throw fail(
      "no_libbpf",
      (e as Error).message,
      "install libbpf 1.x (Debian: apt-get install -y libbpf1)",
      e,
    );
  }
}

/**
 * Opens one of the project's BPF objects: `given` bytes, or bpf/`file` beside this source tree
 * (embedded in the compiled binary). libbpf's own log goes to `log`. Failures become
 * `fail(reason, cause, fix, error)`: `no_object` (not built) or `bad_object`.
 */
export async function openBpfObject(
  file: string,
  objName: string,
  label: string,
  given: Uint8Array | undefined,
  log: KernelLog,
  fail: (reason: string, cause: string, fix: string, e: unknown) => Error,
): Promise<BpfObject> {
  setLibbpfLogger((level, message) => {
    log(level === "warn" ? "warning" : "debug", `libbpf: ${message.replace(/^libbpf: /, "")}`);
  });
  let elf = given;
  if (!elf) {
    const url = new URL(`../bpf/${file}`, import.meta.url);
    try {
      elf = await Deno.readFile(url);
    } catch (e) {
      throw fail(
        "no_object",
        `cannot read the ${label} object ${url.pathname}: ${(e as Error).message}`,
        "build it with ./build.sh (needs clang)",
        e,
      );
    }
  }
  try {
    return BpfObject.openMem(elf, objName);
  } catch (e) {
    throw fail(
      "bad_object",
      `the ${label} object is unusable: ${(e as Error).message}`,
      "rebuild it with ./build.sh",
      e,
    );
  }
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
    this.keyA = encodeKey(tupleA);
    this.keyB = encodeKey(tupleB);
  }
}

// Layouts mirrored from bpf/sockmap.h (struct sni_sock_key, sni_pair, sni_config, sni_stats).
// Host-order fields are little endian: the fast path supports x86_64 and aarch64 only.
const KEY_SIZE = 44; // family u32, local_port u32, remote_port u32, local_ip[16], remote_ip[16]
const PAIR_SIZE = 64; // peer key (44), upstream u32 @44, bytes u64 @48, packets u64 @56
const PAIR_UPSTREAM = 44;
const PAIR_BYTES = 48;
const CONFIG_SIZE = 8; // sndbuf u32, rcvbuf u32
const STATS_FIELDS = 11; // struct sni_stats: 11 x u64
const STATS_SIZE = STATS_FIELDS * 8;
const SOCKHASH_VALUE_SIZE = 8; // a userspace lookup returns the socket cookie

const PIN_MAPS = [
  "sni_sockhash",
  "sni_pairs",
  "sni_stats",
  "sni_config",
] as const;
const E2BIG = 7;
const ENOMEM = 12;
const PIN_LINK = "sockops_link";
const DEFAULT_PIN_DIR = "/sys/fs/bpf/sni-proxy";
const VERDICT_ATTACH_TYPES = {
  stream_verdict: BpfAttachType.SK_SKB_STREAM_VERDICT,
  verdict: BpfAttachType.SK_SKB_VERDICT,
} as const;

function encodeKey(t: SocketTuple, out = new Uint8Array(KEY_SIZE)): Uint8Array {
  const v = new DataView(out.buffer, out.byteOffset, out.byteLength);
  v.setUint32(0, t.family, true);
  v.setUint32(4, t.localPort, true);
  v.setUint32(8, t.remotePort, true);
  out.set(t.localIp.subarray(0, 16), 12);
  out.set(t.remoteIp.subarray(0, 16), 28);
  return out;
}

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

interface Mount {
  source: string;
  target: string;
  type: string;
}

async function readMounts(): Promise<Mount[]> {
  const text = await Deno.readTextFile("/proc/self/mounts");
  return text.split("\n").filter(Boolean).map((line) => {
    const [source, target, type] = line.split(" ");
    // /proc/self/mounts escapes spaces etc. as octal
    const unescape = (s: string) =>
      s.replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
    return { source, target: unescape(target), type };
  });
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** Effective capabilities of this process (bit set from /proc/self/status CapEff). */
async function effectiveCaps(): Promise<bigint> {
  const status = await Deno.readTextFile("/proc/self/status");
  const m = status.match(/^CapEff:\s*([0-9a-f]+)$/m);
  return m ? BigInt("0x" + m[1]) : 0n;
}

const CAP_NET_ADMIN = 12n;
const CAP_SYS_ADMIN = 21n;
const CAP_BPF = 39n;

/** The cgroup v2 path of this process relative to the cgroup2 mount ("/" for the root). */
async function currentCgroup2(): Promise<string> {
  const text = await Deno.readTextFile("/proc/self/cgroup");
  const line = text.split("\n").find((l) => l.startsWith("0::"));
  return line ? line.slice(3) : "/";
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
  readonly #pairBuf = new Uint8Array(PAIR_SIZE);
  readonly #pairView = new DataView(this.#pairBuf.buffer);
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
  static attach(log: KernelLog, pinDir: string = DEFAULT_PIN_DIR): KernelAccel {
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
      const sockhash = openMap("sni_sockhash", KEY_SIZE, SOCKHASH_VALUE_SIZE);
      const pairs = openMap("sni_pairs", KEY_SIZE, PAIR_SIZE);
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
    const pinDir = options.pinDir === undefined ? DEFAULT_PIN_DIR : options.pinDir;
    const verdictType = VERDICT_ATTACH_TYPES[options.verdictAttach ?? "stream_verdict"];
    for (
      const [name, v] of [["maxPairs", options.maxPairs], [
        "maxSockets",
        options.maxSockets,
      ]] as const
    ) {
      if (!Number.isInteger(v) || v < 1 || v > 0x7fffffff) {
        throw new KernelAccelError(
          "bad_option",
          `${name} must be a positive integer (got ${v})`,
          `fix ebpf.maps in the config`,
        );
      }
    }
    for (
      const [name, v] of [
        ["sndbuf", options.sndbuf],
        ["rcvbuf", options.rcvbuf],
      ] as const
    ) {
      if (v !== undefined && (!Number.isInteger(v) || v < 0 || v > 0x3fffffff)) {
        throw new KernelAccelError(
          "bad_option",
          `${name} must be an integer from 0 to 1073741823 (got ${v})`,
          "fix the ebpf buffer size in the config",
        );
      }
    }
    if (KernelAccel.#open) {
      throw new KernelAccelError(
        "already_open",
        "the eBPF fast path is already open in this process",
        "close() the first KernelAccel before opening another",
      );
    }
    checkPlatform(
      "the eBPF fast path",
      [5, 10],
      "sockmap with sk_skb verdicts, sock_ops",
      "run in userspace mode",
      (reason, cause, fix) => new KernelAccelError(reason, cause, fix),
    );
    await checkBpfAccess(
      "load eBPF programs",
      "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (cgroup and bpffs mounts)",
      (reason, cause, fix, e) => new KernelAccelError(reason, cause, fix, { cause: e }),
    );
    const obj = await openBpfObject(
      "sockmap.bpf.o",
      "sni_sockmap",
      "eBPF",
      options.object,
      log,
      (reason, cause, fix, e) => new KernelAccelError(reason, cause, fix, { cause: e }),
    );

    // cgroup v2 and bpffs
    let cgroupMount: string;
    try {
      cgroupMount = await ensureMounts(pinDir, log);
    } catch (e) {
      obj.close();
      throw e;
    }
    const cgroupDir = options.cgroupDir ?? `${cgroupMount}/sni-proxy`;
    const originalCgroup = await currentCgroup2();
    const createdCgroup = !(await exists(cgroupDir));
    try {
      await Deno.mkdir(cgroupDir, { recursive: true });
    } catch (e) {
      obj.close();
      throw new KernelAccelError(
        "no_cgroup2",
        `cannot create cgroup ${cgroupDir}: ${(e as Error).message}`,
        "check cgroup2 permissions or set a writable cgroup dir",
        { cause: e },
      );
    }
    try {
      await refuseIfInUse(cgroupDir);
      if (pinDir !== null) await removeStalePins(pinDir, log);
    } catch (e) {
      obj.close();
      if (createdCgroup) await Deno.remove(cgroupDir).catch(() => {});
      throw e;
    }

    // load
    let link: BpfLink | null = null;
    let cgroupFd = -1;
    let verdictAttached = false;
    let movedIn = false;
    const pinned: string[] = [];
    try {
      obj.map("sni_sockhash").setMaxEntries(options.maxSockets);
      obj.map("sni_pairs").setMaxEntries(options.maxPairs);
      try {
        obj.load();
      } catch (e) {
        throw loadError(e, options);
      }
      const cfg = new Uint8Array(CONFIG_SIZE);
      const cv = new DataView(cfg.buffer);
      cv.setUint32(0, options.sndbuf ?? 0, true);
      cv.setUint32(4, options.rcvbuf ?? 0, true);
      obj.map("sni_config").update(new Uint8Array(4), cfg);

      // Verdict first: a socket in a sockmap without a verdict program loses readiness
      // notifications on recent kernels, and no socket can enter the map before sock_ops runs.
      obj.program("sni_verdict").attachToMap(obj.map("sni_sockhash"), verdictType);
      verdictAttached = true;

      await Deno.writeTextFile(`${cgroupDir}/cgroup.procs`, `${Deno.pid}\n`);
      movedIn = true;
      cgroupFd = openDirectory(cgroupDir);
      link = obj.program("sni_sockops").attachCgroup(cgroupFd);

      if (pinDir !== null) {
        await Deno.mkdir(pinDir, { recursive: true });
        for (const name of PIN_MAPS) {
          obj.map(name).pin(`${pinDir}/${name}`);
          pinned.push(`${pinDir}/${name}`);
        }
        link.pin(`${pinDir}/${PIN_LINK}`);
        pinned.push(`${pinDir}/${PIN_LINK}`);
      }
      KernelAccel.#open = true;
      const accel = new KernelAccel({
        owner: {
          obj,
          verdict: obj.program("sni_verdict"),
          link,
          cgroupFd,
          cgroupMount,
          originalCgroup,
          verdictType,
        },
        sockhash: obj.map("sni_sockhash"),
        pairs: obj.map("sni_pairs"),
        stats: obj.map("sni_stats"),
        log,
        diag: SockDiag.open(),
        pinDir,
        cgroupDir,
      });
      log(
        "info",
        `eBPF sockmap fast path attached (cgroup ${cgroupDir}, pins ${
          pinDir ?? "none"
        }, maps.sockets ${options.maxSockets}, maps.pairs ${options.maxPairs})`,
      );
      accel.#watchFill(options.maxSockets);
      return accel;
    } catch (e) {
      // undo everything, in reverse
      for (const p of pinned) await Deno.remove(p).catch(() => {});
      if (link) {
        try {
          link.detach();
        } catch { /* already gone */ }
        link.destroy();
      }
      if (cgroupFd >= 0) closeFd(cgroupFd);
      if (movedIn) await moveTo(`${cgroupMount}${originalCgroup === "/" ? "" : originalCgroup}`);
      if (verdictAttached) {
        try {
          obj.program("sni_verdict").detachFromMap(obj.map("sni_sockhash"), verdictType);
        } catch { /* freed with the map */ }
      }
      obj.close();
      if (createdCgroup) await Deno.remove(cgroupDir).catch(() => {});
      if (e instanceof KernelAccelError) throw e;
      const err = e as Error;
      const eperm = e instanceof BpfError && e.errno === 1;
      throw new KernelAccelError(
        eperm ? "not_permitted" : "attach_failed",
        `eBPF fast path setup failed: ${err.message}`,
        eperm
          ? "run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); check kernel lockdown"
          : "check the kernel supports sockmap (CONFIG_BPF_STREAM_PARSER) and cgroup BPF (CONFIG_CGROUP_BPF)",
        { cause: e },
      );
    }
  }

  /** True when the socket is in the sockhash (the sock_ops program saw it established). */
  isTracked(s: SocketAddrs): boolean {
    return this.#sockhash.lookup(encodeKey(socketTuple(s)), this.#cookieBuf);
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
    this.#pairBuf.fill(0);
    this.#pairBuf.set(peer, 0);
    this.#pairView.setUint32(PAIR_UPSTREAM, upstream ? 1 : 0, true);
    this.#update(this.#pairs, key, this.#pairBuf);
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
        const full = e instanceof BpfError && (e.errno === E2BIG || e.errno === ENOMEM);
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

  #readPair(key: Uint8Array): boolean {
    return this.#pairs.lookup(key, this.#pairBuf);
  }

  #readBytes(key: Uint8Array): number {
    if (!this.#readPair(key)) return 0;
    return Number(this.#pairView.getBigUint64(PAIR_BYTES, true));
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
    const ok = this.#stats?.lookup(new Uint8Array(4), buf) ?? false;
    const sums = new Array<number>(STATS_FIELDS).fill(0);
    if (ok) {
      const v = new DataView(buf.buffer);
      const stride = Math.ceil(STATS_SIZE / 8) * 8;
      for (let cpu = 0; cpu < buf.length / stride; cpu++) {
        for (let i = 0; i < STATS_FIELDS; i++) {
          sums[i] += Number(v.getBigUint64(cpu * stride + i * 8, true));
        }
      }
    }
    return {
      bytesSpliced: sums[0],
      packetsSpliced: sums[1],
      redirectFailures: sums[2],
      passed: sums[3],
      socketsInserted: sums[4],
      insertFailures: sums[5],
      setsockoptFailures: sums[6],
      bytesUpstream: sums[7],
      bytesDownstream: sums[0] - sums[7],
      packetsUpstream: sums[8],
      packetsDownstream: sums[1] - sums[8],
      emptyDropped: sums[9],
      socketsLive: Math.max(0, sums[4] - sums[10]),
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
        await Deno.remove(`${this.pinDir}/${p}`).catch(() => {});
      }
      await Deno.remove(this.pinDir).catch(() => {});
    }
    owner.link.destroy();
    closeFd(owner.cgroupFd);
    try {
      owner.verdict.detachFromMap(owner.obj.map("sni_sockhash"), owner.verdictType);
    } catch (e) {
      warn("detach verdict", e);
    }
    owner.obj.close();
    const original = `${owner.cgroupMount}${
      owner.originalCgroup === "/" ? "" : owner.originalCgroup
    }`;
    await moveTo(original).catch((e) => warn(`move back to cgroup ${original}`, e));
    // The cgroup dir is dedicated to the proxy (a previous run may have created it): remove it
    // once empty; rmdir fails harmlessly while other processes are in it.
    await Deno.remove(this.cgroupDir).catch(() => {});
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

/** Find (or mount) cgroup2 and make sure pinDir is on a bpffs; returns the cgroup2 mount point. */
async function ensureMounts(pinDir: string | null, log: KernelLog): Promise<string> {
  const mounts = await readMounts();
  let cgroupMount = mounts.find((m) => m.type === "cgroup2")?.target;
  if (!cgroupMount) {
    cgroupMount = "/run/sni-proxy/cgroup2";
    try {
      await Deno.mkdir(cgroupMount, { recursive: true });
      mountFs("cgroup2", cgroupMount);
      log("info", `mounted cgroup2 at ${cgroupMount}`);
    } catch (e) {
      throw new KernelAccelError(
        "no_cgroup2",
        `no cgroup v2 mount and mounting one failed: ${(e as Error).message}`,
        "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) or enable cgroup v2 in the kernel",
        { cause: e },
      );
    }
  }
  if (pinDir !== null) {
    const bpffsRoot = pinDir.split("/").slice(0, 4).join("/"); // /sys/fs/bpf
    if (
      !mounts.some((m) =>
        m.type === "bpf" && (pinDir === m.target || pinDir.startsWith(m.target + "/"))
      )
    ) {
      try {
        mountFs("bpf", bpffsRoot);
        log("info", `mounted bpffs at ${bpffsRoot}`);
      } catch (e) {
        throw new KernelAccelError(
          "no_bpffs",
          `${pinDir} is not on a bpf filesystem and mounting one at ${bpffsRoot} failed: ${
            (e as Error).message
          }`,
          "mount bpffs (mount -t bpf bpf /sys/fs/bpf) or set the pin dir to a bpffs path",
          { cause: e },
        );
      }
    }
  }
  return cgroupMount;
}

async function moveTo(cgroupDir: string): Promise<void> {
  await Deno.writeTextFile(`${cgroupDir}/cgroup.procs`, `${Deno.pid}\n`);
}

/** Refuse to share the cgroup with another live process (a second proxy instance). */
async function refuseIfInUse(cgroupDir: string): Promise<void> {
  let procs = "";
  try {
    procs = await Deno.readTextFile(`${cgroupDir}/cgroup.procs`);
  } catch {
    return;
  }
  const others = procs.split("\n").filter((p) => p && Number(p) !== Deno.pid);
  if (others.length) {
    throw new KernelAccelError(
      "cgroup_in_use",
      `cgroup ${cgroupDir} already holds process(es) ${others.join(", ")} (another sni-proxy?)`,
      "stop the other instance or give this one its own cgroup dir and pin dir",
    );
  }
}

/**
 * Remove pins a previous run left (crash, kill -9): detach its sock_ops link explicitly (the
 * pin kept it attached), then delete the map pins, so this run replaces rather than duplicates.
 */
async function removeStalePins(pinDir: string, log: KernelLog): Promise<void> {
  if (!(await exists(pinDir))) return;
  const linkPin = `${pinDir}/${PIN_LINK}`;
  if (await exists(linkPin)) {
    try {
      const fd = objGet(linkPin);
      try {
        linkDetachFd(fd, linkPin);
      } finally {
        closeFd(fd);
      }
    } catch (e) {
      log("warning", `stale pin ${linkPin}: ${(e as Error).message}`);
    }
  }
  const removed: string[] = [];
  for await (const entry of Deno.readDir(pinDir)) {
    await Deno.remove(`${pinDir}/${entry.name}`);
    removed.push(entry.name);
  }
  if (removed.length) log("info", `replaced stale eBPF pins in ${pinDir}: ${removed.join(", ")}`);
}

function loadError(e: unknown, o: KernelAccelOptions): Error {
  if (!(e instanceof BpfError)) return e as Error;
  if (e.verifierLog) {
    return new KernelAccelError(
      "verifier_rejected",
      `the kernel verifier rejected the eBPF program (${e.errnoName}):\n${
        logTail(e.verifierLog, 20)
      }`,
      "this kernel lacks a feature the program needs; run in userspace mode or upgrade the kernel",
      { cause: e },
    );
  }
  if (e.errno === 12 || e.errno === 7) {
    return new KernelAccelError(
      "no_memory",
      `the kernel could not allocate the eBPF maps (${e.errnoName}; ebpf.maps.sockets ${o.maxSockets}, ebpf.maps.pairs ${o.maxPairs})`,
      "lower ebpf.maps.sockets / ebpf.maps.pairs, or raise RLIMIT_MEMLOCK (ulimit -l) on kernels before 5.11",
      { cause: e },
    );
  }
  if (e.errno === 1) {
    return new KernelAccelError(
      "not_permitted",
      `loading eBPF was refused (EPERM): ${e.message}`,
      "run as root with CAP_BPF and CAP_NET_ADMIN; on kernels before 5.11 raise RLIMIT_MEMLOCK (ulimit -l unlimited); check kernel lockdown",
      { cause: e },
    );
  }
  return new KernelAccelError(
    "load_failed",
    `loading the eBPF object failed: ${e.message}`,
    "check the kernel supports sockmap and cgroup BPF",
    { cause: e },
  );
}
