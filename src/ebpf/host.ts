/**
 * Host setup of the sockmap fast path: the cgroup2 and bpffs mounts, the proxy's cgroup (create,
 * refuse a shared one, move in and out) and the pins a previous run left.
 * @module
 */

import { linkDetachFd, objGet } from "../../ffi/libbpf.ts";
import { closeFd, mountFs } from "../../ffi/libc.ts";
import { type EbpfLog, KernelAccelError } from "./loader.ts";
import { PIN_LINK } from "./layout.ts";

/** The proxy's cgroup dir under the cgroup2 mount (one kernel-mode proxy per machine holds it). */
export const CGROUP_NAME = "sni-proxy";
/** Where bpffs is mounted when no mount covers a pin dir. */
const BPFFS_ROOT = "/sys/fs/bpf";
/** Where cgroup2 is mounted when the host has no cgroup2 mount. */
export const FALLBACK_CGROUP2_MOUNT = "/run/sni-proxy/cgroup2";

interface Mount {
  source: string;
  target: string;
  type: string;
}

async function readMounts(): Promise<Mount[]> {
  return parseMounts(await Deno.readTextFile("/proc/self/mounts"));
}

function parseMounts(text: string): Mount[] {
  return text.split("\n").filter(Boolean).map((line) => {
    const [source, target, type] = line.split(" ");
    // /proc/self/mounts escapes spaces etc. as octal
    const unescape = (s: string) =>
      s.replace(/\\([0-7]{3})/g, (_, o) => String.fromCharCode(parseInt(o, 8)));
    return { source, target: unescape(target), type };
  });
}

/** Whether `path` exists (a dangling link counts). */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

/** The cgroup v2 path of this process relative to the cgroup2 mount ("/" for the root). */
export async function currentCgroup2(): Promise<string> {
  const text = await Deno.readTextFile("/proc/self/cgroup");
  const line = text.split("\n").find((l) => l.startsWith("0::"));
  return line ? line.slice(3) : "/";
}

/** The directory of cgroup `relative` (as {@link currentCgroup2} gives it) under `mount`. */
export function cgroupPath(mount: string, relative: string): string {
  return `${mount}${relative === "/" ? "" : relative}`;
}

/** Find (or mount) cgroup2 and make sure pinDir is on a bpffs; returns the cgroup2 mount point. */
export async function ensureMounts(pinDir: string | null, log: EbpfLog): Promise<string> {
  const mounts = await readMounts();
  let cgroupMount = mounts.find((m) => m.type === "cgroup2")?.target;
  if (!cgroupMount) {
    cgroupMount = FALLBACK_CGROUP2_MOUNT;
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
    ensureBpffs(pinDir, log, "set the pin dir to a bpffs path", mounts);
  }
  return cgroupMount;
}

/**
 * Makes sure `pinDir` is on a bpffs: when no bpf mount covers it and it is under /sys/fs/bpf,
 * mounts one there (as bpftool does). Synchronous, for the pinned DNS cache's open.
 * @param fix what else the operator can do, after "mount bpffs (...) or".
 * @param mounts this process's mounts (default: read now from /proc/self/mounts).
 * @throws {KernelAccelError} `no_bpffs` when the mount fails (not root: EPERM).
 */
export function ensureBpffs(
  pinDir: string,
  log: EbpfLog,
  fix: string,
  mounts: Mount[] = parseMounts(Deno.readTextFileSync("/proc/self/mounts")),
): void {
  const covered = mounts.some((m) =>
    m.type === "bpf" && (pinDir === m.target || pinDir.startsWith(m.target + "/"))
  );
  if (covered) return;
  // bpffs goes where the system mounts it, never over another directory
  let why = `no bpffs is mounted over it and it is not under ${BPFFS_ROOT}`;
  let cause: unknown;
  if (pinDir === BPFFS_ROOT || pinDir.startsWith(`${BPFFS_ROOT}/`)) {
    try {
      mountFs("bpf", BPFFS_ROOT);
      log("info", `mounted bpffs at ${BPFFS_ROOT}`);
      return;
    } catch (e) {
      why = `mounting one at ${BPFFS_ROOT} failed: ${(e as Error).message}`;
      cause = e;
    }
  }
  throw new KernelAccelError(
    "no_bpffs",
    `${pinDir} is not on a bpf filesystem and ${why}`,
    `mount bpffs (mount -t bpf bpf /sys/fs/bpf) or ${fix}`,
    { cause },
  );
}

/** Create the proxy's cgroup dir when missing; returns whether it was created. */
export async function createCgroup(cgroupDir: string): Promise<boolean> {
  const created = !(await exists(cgroupDir));
  try {
    await Deno.mkdir(cgroupDir, { recursive: true });
  } catch (e) {
    throw new KernelAccelError(
      "no_cgroup2",
      `cannot create cgroup ${cgroupDir}: ${(e as Error).message}`,
      "check cgroup2 permissions or set a writable cgroup dir",
      { cause: e },
    );
  }
  return created;
}

/** Move this process into the cgroup at `cgroupDir`. */
export async function moveTo(cgroupDir: string): Promise<void> {
  await Deno.writeTextFile(`${cgroupDir}/cgroup.procs`, `${Deno.pid}\n`);
}

/** Refuse to share the cgroup with another live process (a second proxy instance). */
export async function refuseIfInUse(cgroupDir: string): Promise<void> {
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
export async function removeStalePins(pinDir: string, log: EbpfLog): Promise<void> {
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

/** Remove `path`, ignoring failure (already gone, or still in use). */
export async function removeQuietly(path: string): Promise<void> {
  await Deno.remove(path).catch(() => {});
}
