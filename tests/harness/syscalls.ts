/**
 * An outside meter of what the proxy process does: the bytes it moves through read/write
 * syscalls and its epoll wakeups (strace), and its CPU time.
 *
 * @module
 */
import type { Scope } from "./scope.ts";
import { socketPorts } from "../../ffi/libc.ts";

/** What a process read and wrote through syscalls while a {@linkcode SyscallMeter} ran. */
export interface SyscallBytes {
  /** Bytes returned by read/readv/pread64/recvfrom/recvmsg (sockets, files, pipes). */
  read: number;
  /** Bytes returned by write/writev/pwrite64/sendto/sendmsg. */
  written: number;
  /** Syscalls of those kinds that moved at least one byte. */
  calls: number;
  /** Bytes per syscall name, e.g. `{ recvfrom: 517 }`. */
  bySyscall: Record<string, number>;
  /** epoll waits that returned events: how often something woke the process. */
  wakeups: number;
}

const READS = new Set(["read", "readv", "pread64", "preadv", "recvfrom", "recvmsg"]);
const WRITES = new Set(["write", "writev", "pwrite64", "pwritev", "sendto", "sendmsg"]);
const WAITS = new Set(["epoll_wait", "epoll_pwait", "epoll_pwait2"]);

/**
 * Counts the bytes a process moves through read/write syscalls, and its epoll wakeups, from
 * outside, with strace attached to all its threads. /proc/PID/io cannot do this: Deno reads and writes sockets with
 * recvfrom/sendto, which rchar/wchar do not count.
 */
export class SyscallMeter {
  readonly #child: Deno.ChildProcess;
  readonly #file: string;
  readonly #stderr: Promise<string>;

  private constructor(child: Deno.ChildProcess, file: string, stderr: Promise<string>) {
    this.#child = child;
    this.#file = file;
    this.#stderr = stderr;
  }

  /** Attaches to `pid` (all threads) and resolves once strace reports it is attached. */
  static async attach(scope: Scope, pid: number): Promise<SyscallMeter> {
    const file = await Deno.makeTempFile({ prefix: "sni-strace-" });
    scope.defer(() => Deno.remove(file).catch(() => {}));
    const child = new Deno.Command("strace", {
      args: [
        "-f",
        "-e",
        `trace=${[...READS, ...WRITES, ...WAITS].join(",")}`,
        "-e",
        "signal=none",
        "-s",
        "0",
        "-o",
        file,
        "-p",
        String(pid),
      ],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    let text = "";
    const attached = Promise.withResolvers<void>();
    const stderr = (async () => {
      for await (const chunk of child.stderr.pipeThrough(new TextDecoderStream())) {
        text += chunk;
        if (/attached/.test(text)) attached.resolve();
      }
      return text;
    })();
    const meter = new SyscallMeter(child, file, stderr);
    scope.defer(() => meter.#kill());
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await Promise.race([
        attached.promise,
        child.status.then(async () => {
          throw new Error(`strace exited: ${await stderr}`);
        }),
        new Promise((_, reject) => {
          timer = setTimeout(() => reject(new Error(`strace did not attach: ${text}`)), 10_000);
        }),
      ]);
    } finally {
      clearTimeout(timer);
    }
    return meter;
  }

  #kill(): void {
    try {
      this.#child.kill("SIGINT");
    } catch { /* exited */ }
  }

  /** Detaches and sums what was traced. */
  async stop(): Promise<SyscallBytes> {
    this.#kill();
    await this.#child.status;
    await this.#stderr;
    const text = await Deno.readTextFile(this.#file);
    const result: SyscallBytes = { read: 0, written: 0, calls: 0, bySyscall: {}, wakeups: 0 };
    for (const line of text.split("\n")) {
      // `12 recvfrom(...) = 65536` or `12 <... recvfrom resumed>...) = 65536`
      const m = /^\d+\s+(?:<\.\.\. (\w+) resumed>|(\w+)\().*\)\s+=\s+(\d+)/.exec(line);
      if (!m) continue;
      const name = m[1] ?? m[2];
      const n = Number(m[3]);
      if (n <= 0) continue;
      if (WAITS.has(name)) {
        result.wakeups++;
        continue;
      }
      if (READS.has(name)) result.read += n;
      else if (WRITES.has(name)) result.written += n;
      else continue;
      result.calls++;
      result.bySyscall[name] = (result.bySyscall[name] ?? 0) + n;
    }
    return result;
  }
}

/** CPU time (user + system) a process used so far, in ms (from /proc/PID/stat). */
export async function cpuTimeMs(pid: number): Promise<number> {
  const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const ticks = Number(fields[11]) + Number(fields[12]); // utime, stime (fields 14, 15)
  return ticks * 10; // USER_HZ is 100 on Linux
}

/** This process's fd of a TCP conn, found by its ports. */
export function fdOf(conn: Deno.Conn): number {
  const local = (conn.localAddr as Deno.NetAddr).port;
  const remote = (conn.remoteAddr as Deno.NetAddr).port;
  for (const e of Deno.readDirSync("/proc/self/fd")) {
    const p = socketPorts(Number(e.name));
    if (p?.local === local && p.remote === remote) return Number(e.name);
  }
  throw new Error(`no fd for ${local} -> ${remote}`);
}

/**
 * Runs `work` with strace attached to every thread of `pid` (`args`: what to trace, e.g.
 * `["-c"]` or `["-e", "trace=recvfrom"]`); returns what strace wrote once detached.
 */
export async function straceDuring(
  scope: Scope,
  pid: number,
  args: string[],
  work: () => Promise<void>,
): Promise<string> {
  const file = await Deno.makeTempFile({ prefix: "sni-strace-" });
  scope.defer(() => Deno.remove(file).catch(() => {}));
  const strace = new Deno.Command("strace", {
    args: ["-f", ...args, "-o", file, "-p", String(pid)],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  scope.defer(() => {
    try {
      strace.kill("SIGKILL");
    } catch { /* exited */ }
  });
  // "Process N attached with M threads": after every thread
  const reader = strace.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let said = "";
  while (!/attached/.test(said)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`strace: ${said}`);
    said += value;
  }
  await work();
  strace.kill("SIGINT");
  await strace.status;
  reader.releaseLock();
  return await Deno.readTextFile(file);
}
