/**
 * Setting up and taking down the sockmap fast path (bpf/sockmap.bpf.c) in the process that owns
 * it: checks, host setup, load, attach, pin (one undo stack a failure unwinds), the reverse in
 * {@link releaseSockmap}, and the pinned maps a worker opens instead.
 * @module
 */

import {
  BpfAttachType,
  BpfError,
  type BpfLink,
  BpfMapFd,
  type BpfObject,
  type BpfProgram,
} from "../../ffi/libbpf.ts";
import { closeFd, Errno, openDirectory } from "../../ffi/libc.ts";
import { inRange, SOCKET_BUFFER_BYTES, SOCKMAP_ENTRIES } from "./bounds.ts";
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
  encodeSockmapConfig,
  KEY_ZERO,
  PAIR,
  PIN_LINK,
  PIN_MAPS,
  SOCK_KEY,
  SOCKHASH_VALUE_SIZE,
  SOCKMAP_MAPS,
} from "./layout.ts";
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
  log: EbpfLog;
}

/** What the process that loaded the programs owns (and undoes in {@link releaseSockmap}). */
export interface Owner {
  obj: BpfObject;
  verdict: BpfProgram;
  link: BpfLink;
  cgroupFd: number;
  cgroupMount: string;
  /** The cgroup v2 dir the sock_ops program is attached to. */
  cgroupDir: string;
  originalCgroup: string;
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
    "sockmap with sk_skb verdicts, sock_ops",
    "run in userspace mode",
  );
  await checkBpfAccess(
    KernelAccelError,
    "load eBPF programs",
    "run as root, or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (cgroup and bpffs mounts)",
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
    return owner;
  } catch (e) {
    await undo.unwind();
    throw setupError(e);
  }
}

/**
 * Detach both programs, remove the pins, move the process back to its original cgroup and
 * free the maps; what fails is logged and the rest still done.
 */
export async function releaseSockmap(
  owner: Owner,
  pinDir: string | null,
  log: EbpfLog,
): Promise<void> {
  const warn = (what: string, e: unknown) =>
    log("warning", `eBPF close: ${what}: ${(e as Error).message}`);
  try {
    owner.link.detach();
  } catch (e) {
    warn("detach sock_ops", e);
  }
  if (pinDir !== null) {
    for (const p of [...PIN_MAPS, PIN_LINK]) {
      await removeQuietly(`${pinDir}/${p}`);
    }
    await removeQuietly(pinDir);
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
  await removeQuietly(owner.cgroupDir);
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
  log: EbpfLog,
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
  log: EbpfLog,
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
  log: EbpfLog,
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
