/**
 * Syscalls per new connection: `perf stat -e raw_syscalls:sys_enter -p PIDS` (every thread of
 * the proxy's or peer's processes) attached for a short wrk run of new connections of its own,
 * not the timed one. perf counts in the kernel (a counter per syscall entry, nothing copied
 * out), so the process runs at nearly full speed; strace would stop it at every call.
 *
 * @module
 */
import { sleep, spawn } from "./procs.ts";

/** perf's event: one count per syscall entered, any syscall. */
const EVENT = "raw_syscalls:sys_enter";
/** Time perf gets to attach to every thread before the counted work starts. */
const ATTACH_MS = 300;

/** Why syscalls cannot be counted here (perf missing or refused), or null. */
export async function syscallCountingProblem(): Promise<string | null> {
  try {
    const o = await new Deno.Command("perf", {
      args: ["stat", "-x", ",", "-e", EVENT, "--", "true"],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(o.stderr);
    if (!o.success || !err.includes(EVENT)) {
      return `perf stat -e ${EVENT} failed: ${err.trim().split("\n")[0]}`;
    }
    return null;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      return "perf is not installed: apt-get install linux-perf";
    }
    throw e;
  }
}

/**
 * Runs `fn` with perf counting the syscalls of `pids` (all their threads); returns `fn`'s
 * result and the count. A process that made no syscall at all reads `<not counted>`: 0.
 */
export async function countSyscalls<T>(pids: number[], fn: () => Promise<T>): Promise<[T, number]> {
  const perf = spawn("perf", {
    args: ["stat", "-x", ",", "-e", EVENT, "-p", pids.join(",")],
    stdout: "null",
    stderr: "piped",
  });
  const output = perf.output();
  let result: T;
  try {
    await sleep(ATTACH_MS);
    result = await fn();
  } finally {
    try {
      perf.kill("SIGINT"); // perf stat prints its counts when interrupted
    } catch { /* exited */ }
  }
  const text = new TextDecoder().decode((await output).stderr);
  const line = text.split("\n").find((l) => l.includes(EVENT));
  if (!line) throw new Error(`perf stat printed no ${EVENT} count:\n${text}`);
  const count = line.startsWith("<not counted>") ? 0 : Number(line.split(",")[0]);
  if (!Number.isFinite(count)) throw new Error(`perf stat: unreadable count: ${line}`);
  return [result, count];
}
