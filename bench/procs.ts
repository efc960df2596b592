/**
 * Process plumbing for the benchmark: every child it starts is registered so that an error, a
 * signal or the normal end kills it; commands with checked output; CPU and memory readings
 * from /proc.
 *
 * @module
 */

const children = new Set<Deno.ChildProcess>();

/** Spawns a command whose process is killed by {@link killChildren} if still running. */
export function spawn(cmd: string, options: Deno.CommandOptions): Deno.ChildProcess {
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(cmd, { stdin: "null", ...options }).spawn();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new Error(`${cmd} is not installed (${e})`);
    throw e;
  }
  children.add(child);
  child.status.finally(() => children.delete(child));
  return child;
}

/** Runs a command to its end; throws with its output if it fails. Returns stdout + stderr. */
export async function sh(cmd: string, args: string[]): Promise<string> {
  const child = spawn(cmd, { args, stdout: "piped", stderr: "piped" });
  const o = await child.output();
  const dec = new TextDecoder();
  const out = dec.decode(o.stdout) + dec.decode(o.stderr);
  if (!o.success) throw new Error(`${cmd} ${args.join(" ")} failed (exit ${o.code}):\n${out}`);
  return out;
}

/** Stops a child: `signal` first, SIGKILL if it has not exited after `graceMs`. */
export async function stop(
  child: Deno.ChildProcess,
  signal: Deno.Signal = "SIGTERM",
  graceMs = 5000,
): Promise<void> {
  if (!children.has(child)) return;
  try {
    child.kill(signal);
  } catch {
    return; // already gone
  }
  let timer: ReturnType<typeof setTimeout> | undefined;
  const killed = new Promise<void>((resolve) => {
    timer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
      resolve();
    }, graceMs);
  });
  await Promise.race([child.status.then(() => {}), killed]);
  clearTimeout(timer);
  await child.status;
}

/**
 * Grandchildren (e.g. nginx workers) to kill if they outlive their parent: pid → start time
 * (the identity of a process: a pid may be reused; a command line changes after a fork).
 */
const adopted = new Map<number, string>();

/** A process's start time (field 22 of its stat), or null when it is gone. */
function startTime(pid: number): string | null {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return null;
  }
}

/**
 * Registers a grandchild: {@link killAdopted} kills it if it is still running (the same process,
 * by start time: an nginx worker whose master was killed keeps running and serving).
 */
export function adopt(pid: number): void {
  const started = startTime(pid);
  if (started !== null) adopted.set(pid, started);
}

/** SIGKILLs the adopted processes that are still running: `pids`, or all of them. */
export function killAdopted(pids: Iterable<number> = [...adopted.keys()]): void {
  for (const pid of pids) {
    const started = adopted.get(pid);
    if (started === undefined) continue;
    try {
      if (startTime(pid) === started) Deno.kill(pid, "SIGKILL");
    } catch { /* gone */ }
    adopted.delete(pid);
  }
}

/** Kills every child still running (SIGKILL after a short SIGTERM grace), then adopted ones. */
export async function killChildren(): Promise<void> {
  await Promise.all([...children].map((c) => stop(c, "SIGTERM", 2000)));
  killAdopted();
}

/**
 * The path of `tool` (searched in PATH, then the sbin directories a non-root PATH may lack);
 * throws a message naming the package to install when it is missing.
 */
export function need(tool: string, pkg: string): string {
  const dirs = [
    ...(Deno.env.get("PATH") ?? "").split(":"),
    "/usr/local/sbin",
    "/usr/sbin",
    "/sbin",
  ];
  for (const dir of dirs.filter(Boolean)) {
    try {
      if (Deno.statSync(`${dir}/${tool}`).isFile) return `${dir}/${tool}`;
    } catch { /* not here */ }
  }
  throw new Error(`${tool} is not installed (needed by the benchmark): apt-get install -y ${pkg}`);
}

/** Clock ticks per second of /proc/stat and /proc/PID/stat (USER_HZ, 100 on Linux). */
const USER_HZ = 100;

/** Busy CPU seconds of the whole machine so far: user+nice+system+irq+softirq of all CPUs. */
export function machineCpuSeconds(): number {
  const fields = Deno.readTextFileSync("/proc/stat").split("\n", 1)[0].trim().split(/\s+/);
  const [user, nice, system, , , irq, softirq] = fields.slice(1).map(Number);
  return (user + nice + system + irq + softirq) / USER_HZ;
}

/** CPU seconds of the whole machine in interrupts so far: irq + softirq of all CPUs. */
export function machineIrqSeconds(): number {
  const fields = Deno.readTextFileSync("/proc/stat").split("\n", 1)[0].trim().split(/\s+/);
  const [, , , , , irq, softirq] = fields.slice(1).map(Number);
  return (irq + softirq) / USER_HZ;
}

/**
 * CPU seconds that the live threads of process `pid` have run so far, to the nanosecond
 * (`/proc/PID/task/TID/schedstat`): fine enough for a process that hardly runs, where the
 * clock ticks of /proc/PID/stat would read 0 or 0.01 s.
 */
export function threadsCpuSeconds(pid: number): number {
  let ns = 0;
  for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/schedstat`).split(" ")[0]);
    } catch { /* the thread exited meanwhile */ }
  }
  return ns / 1e9;
}

/** CPU seconds (user + system, all threads) that the processes `pids` have used so far. */
export function processCpuSeconds(pids: number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    // fields after the command name (which may hold spaces) start with the state (field 3)
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    ticks += Number(rest[11]) + Number(rest[12]); // utime, stime (fields 14, 15)
  }
  return ticks / USER_HZ;
}

/**
 * CPU seconds used by this process's children that have exited and been waited for
 * (cutime + cstime of /proc/self/stat): across a run of one load generator, its own CPU.
 */
export function exitedChildrenCpuSeconds(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(rest[13]) + Number(rest[14])) / USER_HZ; // cutime, cstime (fields 16, 17)
}

/** Pids of the direct children of `pid` (e.g. nginx's workers). */
export function childPids(pid: number): number[] {
  const pids: number[] = [];
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) pids.push(Number(e.name));
    } catch { /* exited meanwhile */ }
  }
  return pids;
}

/** Resident memory of a process in KiB (VmRSS). */
export function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

/** RSS split of a process (KiB): anonymous, file-backed and shared-memory pages. */
export function rssBreakdownKiB(pid: number): { anon: number; file: number; shmem: number } {
  const s = Deno.readTextFileSync(`/proc/${pid}/status`);
  const kib = (name: string) => Number(new RegExp(`${name}:\\s+(\\d+) kB`).exec(s)?.[1] ?? NaN);
  return { anon: kib("RssAnon"), file: kib("RssFile"), shmem: kib("RssShmem") };
}

/**
 * TCP memory of the whole machine, as a share of the threshold where the kernel starts to
 * limit socket buffers (`tcp_mem`'s middle value; above its last one it drops packets).
 */
export function tcpMemoryShare(): number {
  const pages = Number(/TCP:.* mem (\d+)/.exec(Deno.readTextFileSync("/proc/net/sockstat"))?.[1]);
  const pressure = Number(Deno.readTextFileSync("/proc/sys/net/ipv4/tcp_mem").split(/\s+/)[1]);
  return pages / pressure;
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
