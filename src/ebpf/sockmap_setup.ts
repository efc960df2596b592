/**
 * Setting up and taking down the sockmap fast path (bpf/sockmap.bpf.c) in the process that owns
 * it: checks, the instance's pin dir, load, attach the verdict, pin (one undo stack a failure
 * unwinds), the reverse in {@link releaseSockmap}, and the pinned maps a worker opens instead.
 * @module
 */

import {
  BpfAttachType,
  BpfError,
  BpfMapFd,
  type BpfObject,
  type BpfProgram,
} from "../../ffi/libbpf.ts";
import { Errno } from "../../ffi/libc.ts";
import { inRange, SOCKET_BUFFER_BYTES, SOCKMAP_ENTRIES } from "./bounds.ts";
import { ensureBpffs, removeDeadInstances, removePins, removeQuietly } from "./host.ts";
import { PAIR, PIN_MAPS, PIN_ROOT, SOCK_KEY, SOCKHASH_VALUE_SIZE, SOCKMAP_MAPS } from "./layout.ts";
import {
  checkBpfAccess,
  checkPlatform,
  type EbpfLog,
  KernelAccelError,
  loadError,
  openBpfObject,
  Undo,
  withLibbpfLog,
} from "./loader.ts";

/** Options of KernelAccel.open. */
export interface KernelAccelOptions {
  /** Capacity of the pairing map (2 entries per spliced session). */
  maxPairs: number;
  /** Capacity of the sockhash (each spliced session's two sockets take one each). */
  maxSockets: number;
  /** SO_SNDBUF set on both sockets of a pair (bounds kernel memory); 0/undefined: kernel default. */
  sndbuf?: number;
  /** SO_RCVBUF set on both sockets of a pair; 0/undefined: kernel default (autotuning). */
  rcvbuf?: number;

  /**
   * bpffs dir for this instance's pins (its workers open the maps there); default
   * `/sys/fs/bpf/sni-proxy/<pid>`; null: do not pin. Created by open(), removed by close().
   */
  pinDir?: string | null;
  /** The compiled object's bytes; default: read bpf/sockmap.bpf.o next to this source tree. */
  object?: Uint8Array;
  /**
   * How the verdict program attaches to the sockhash: `stream_verdict` (default, Linux >= 5.10)
   * or `verdict` (BPF_SK_SKB_VERDICT, Linux >= 5.13). Both redirect correctly on 6.x.
   */
  verdictAttach?: "stream_verdict" | "verdict";
  /** Receives loader and libbpf messages. */
  log: EbpfLog;
}

/** What the process that loaded the program owns (and undoes in {@link releaseSockmap}). */
export interface Owner {
  obj: BpfObject;
  verdict: BpfProgram;
  verdictType: number;
}

const VERDICT_ATTACH_TYPES = {
  stream_verdict: BpfAttachType.SK_SKB_STREAM_VERDICT,
  verdict: BpfAttachType.SK_SKB_VERDICT,
} as const;

/** Refuse map sizes and buffer sizes out of range (`bad_option`). */
export function checkOptions(options: KernelAccelOptions): void {
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

/** Fails unless this platform, kernel and process can run the fast path. */
export async function checkSupport(): Promise<void> {
  checkPlatform(
    KernelAccelError,
    "the eBPF fast path",
    [5, 10],
    "sockmap with sk_skb verdicts",
    "run in userspace mode",
  );
  await checkBpfAccess(
    KernelAccelError,
    "load eBPF programs",
    "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (bpffs mount)",
  );
}

/**
 * Open the object, set up the host, load, attach and pin (when `pinDir` is not null). Every
 * step pushes its undo; a failure unwinds them all, newest first, so nothing stays.
 * @throws {KernelAccelError} naming the cause and the fix.
 */
export async function loadSockmap(
  options: KernelAccelOptions,
  pinDir: string | null,
): Promise<Owner> {
  const log = options.log;
  const verdictType = VERDICT_ATTACH_TYPES[options.verdictAttach ?? "stream_verdict"];
  const obj = await openBpfObject(
    KernelAccelError,
    "sockmap.bpf.o",
    "sni_sockmap",
    "eBPF",
    options.object,
    log,
  );
  const undo = new Undo();
  undo.push(() => obj.close());
  try {
    if (pinDir !== null) await setUpPinDir(pinDir, log);
  } catch (e) {
    await undo.unwind();
    throw e;
  }
  try {
    load(obj, options, log);
    // the verdict before any socket enters the map: a socket in a sockmap without a verdict
    // program loses readiness notifications on recent kernels
    const verdict = obj.program("sni_verdict");
    const sockhash = obj.map(SOCKMAP_MAPS.sockhash);
    withLibbpfLog(log, () => verdict.attachToMap(sockhash, verdictType));
    undo.push(() => verdict.detachFromMap(sockhash, verdictType)); // else freed with the map
    if (pinDir !== null) await pin(obj, pinDir, log, undo);
    return { obj, verdict, verdictType };
  } catch (e) {
    await undo.unwind();
    throw setupError(e);
  }
}

/** Detach the verdict program, remove the pins and free the maps; failures are logged. */
export async function releaseSockmap(
  owner: Owner,
  pinDir: string | null,
  log: EbpfLog,
): Promise<void> {
  if (pinDir !== null) {
    for (const p of PIN_MAPS) await removeQuietly(`${pinDir}/${p}`);
    await removeQuietly(pinDir);
  }
  try {
    owner.verdict.detachFromMap(owner.obj.map(SOCKMAP_MAPS.sockhash), owner.verdictType);
  } catch (e) {
    log("warning", `eBPF close: detach verdict: ${(e as Error).message}`);
  }
  owner.obj.close();
  log("info", "eBPF sockmap fast path detached");
}

/** The sockhash and pairing maps another process pinned under `pinDir`, opened. */
export interface PinnedMaps {
  sockhash: BpfMapFd;
  pairs: BpfMapFd;
}

/**
 * Opens the pinned sockhash and pairing maps (a worker's view of its supervisor's fast path).
 * @throws {KernelAccelError} `no_pins` or `pin_mismatch`; nothing stays open then.
 */
export function openPinnedMaps(pinDir: string): PinnedMaps {
  const opened: BpfMapFd[] = [];
  try {
    const sockhash = openPinned(pinDir, SOCKMAP_MAPS.sockhash, SOCK_KEY.size, SOCKHASH_VALUE_SIZE);
    opened.push(sockhash);
    const pairs = openPinned(pinDir, SOCKMAP_MAPS.pairs, SOCK_KEY.size, PAIR.size);
    return { sockhash, pairs };
  } catch (e) {
    for (const m of opened) m.close();
    throw e;
  }
}

/** One pinned map, checked against the layout this code expects. */
function openPinned(pinDir: string, name: string, keySize: number, valueSize: number): BpfMapFd {
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
  if (m.info.keySize !== keySize || m.info.valueSize !== valueSize) {
    m.close();
    throw new KernelAccelError(
      "pin_mismatch",
      `${pinDir}/${name} has key/value sizes ${m.info.keySize}/${m.info.valueSize}, ` +
        `expected ${keySize}/${valueSize}`,
      "the pins belong to another version of sni-proxy: restart the proxy",
    );
  }
  return m;
}

/**
 * bpffs under `pinDir`, dead instances' pins removed (under the default root), and whatever a
 * previous holder left in `pinDir` itself (an explicitly configured dir) replaced.
 */
async function setUpPinDir(pinDir: string, log: EbpfLog): Promise<void> {
  ensureBpffs(pinDir, log, "set the pin dir to a bpffs path");
  if (pinDir.startsWith(PIN_ROOT + "/")) await removeDeadInstances(PIN_ROOT, log);
  const stale = await removePins(pinDir);
  if (stale.length) log("info", `replaced stale eBPF pins in ${pinDir}: ${stale.join(", ")}`);
}

/** Size the maps and load the program. */
function load(obj: BpfObject, options: KernelAccelOptions, log: EbpfLog): void {
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
      otherFix: "check the kernel supports sockmap (CONFIG_BPF_STREAM_PARSER)",
    });
  }
}

/** Pin the maps under `pinDir`. */
async function pin(obj: BpfObject, pinDir: string, log: EbpfLog, undo: Undo): Promise<void> {
  await Deno.mkdir(pinDir, { recursive: true });
  undo.push(() => removeQuietly(pinDir));
  for (const name of PIN_MAPS) {
    withLibbpfLog(log, () => obj.map(name).pin(`${pinDir}/${name}`));
    undo.push(() => removeQuietly(`${pinDir}/${name}`));
  }
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
      : "check the kernel supports sockmap (CONFIG_BPF_STREAM_PARSER)",
    { cause: e },
  );
}
