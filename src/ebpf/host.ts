/**
 * Host setup of the sockmap fast path: bpffs mounted under the pin dir, and the pins that dead
 * instances left (a crash, kill -9) removed. Each instance pins under a dir of its own, named by
 * the pid of the process that loaded it, so live instances never touch each other's pins.
 * @module
 */

import { linkDetachFd, objGet } from "../../ffi/libbpf.ts";
import { closeFd, mountFs } from "../../ffi/libc.ts";
import { type EbpfLog, KernelAccelError } from "./loader.ts";

interface Mount {
  source: string;
  target: string;
  type: string;
}

/** Where bpffs is mounted when no mount covers a pin dir. */
const BPFFS_ROOT = "/sys/fs/bpf";

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

/** Whether process `pid` exists. */
function alive(pid: number): boolean {
  try {
    Deno.statSync(`/proc/${pid}`);
    return true;
  } catch {
    return false;
  }
}

/**
 * Removes from `root` the pin dirs of instances whose process is gone (named by its pid), and
 * the pins an older version left directly in `root` (one machine-wide set, with a sock_ops link)
 * unless a process still runs in that version's cgroup. Logs what it removed.
 */
export async function removeDeadInstances(root: string, log: EbpfLog): Promise<void> {
  if (!(await exists(root))) return;
  const legacy: string[] = [];
  for await (const entry of Deno.readDir(root)) {
    if (!/^\d+$/.test(entry.name)) {
      legacy.push(entry.name);
      continue;
    }
    const pid = Number(entry.name);
    if (pid === Deno.pid || alive(pid)) continue;
    const dir = `${root}/${entry.name}`;
    const names = await removePins(dir);
    await removeQuietly(dir);
    log("info", `removed the eBPF pins of a dead instance (pid ${pid}): ${names.join(", ")}`);
  }
  if (legacy.length) await removeLegacyPins(root, legacy, log);
}

/** The sock_ops link pin and cgroup of versions that pinned one machine-wide set. */
const LEGACY_LINK = "sockops_link";
const LEGACY_CGROUP = "sni-proxy";

async function removeLegacyPins(root: string, names: string[], log: EbpfLog): Promise<void> {
  const cgroupMount = parseMounts(await Deno.readTextFile("/proc/self/mounts")).find((m) =>
    m.type === "cgroup2"
  )?.target;
  const cgroup = cgroupMount ? `${cgroupMount}/${LEGACY_CGROUP}` : null;
  const procs = cgroup ? await Deno.readTextFile(`${cgroup}/cgroup.procs`).catch(() => "") : "";
  if (procs.trim()) {
    log("warning", `${root} holds the pins of an older sni-proxy still running; left alone`);
    return;
  }
  if (names.includes(LEGACY_LINK)) {
    // the pin kept the old sock_ops program attached to the old cgroup: detach it
    const linkPin = `${root}/${LEGACY_LINK}`;
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
  for (const name of names) await removeQuietly(`${root}/${name}`);
  if (cgroup) await removeQuietly(cgroup);
  log("info", `removed the eBPF pins of an older sni-proxy from ${root}: ${names.join(", ")}`);
}

/**
 * Remove the pins in `dir` (what a previous holder of an explicitly configured pin dir left);
 * returns their names.
 */
export async function removePins(dir: string): Promise<string[]> {
  if (!(await exists(dir))) return [];
  const removed: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    await Deno.remove(`${dir}/${entry.name}`);
    removed.push(entry.name);
  }
  return removed.sort();
}

/** Remove `path`, ignoring failure (already gone, or still in use). */
export async function removeQuietly(path: string): Promise<void> {
  await Deno.remove(path).catch(() => {});
}
