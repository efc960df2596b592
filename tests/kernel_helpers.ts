/**
 * Helpers for the end-to-end tests of the proxy in kernel mode (tests/e2e_kernel_test.ts): why
 * the tests must skip, the machine-wide kernel-mode slot, the pinned pairing map, an outside
 * meter of the bytes the proxy process reads and writes (strace), raw spliced sessions with
 * exact byte control, and a proxy spawned under another user or a command prefix.
 *
 * @module
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { libbpf } from "../ffi/libbpf.ts";
import { PIN_DIR, SOCKMAP_MAPS } from "../src/ebpf/layout.ts";
import { CGROUP_NAME } from "../src/ebpf/host.ts";
import {
  type AccessEntry,
  clientHelloBytes,
  readClientHello,
  ROOT,
  type Scope,
  sleep,
  startProxy,
  writeAll,
} from "./helpers.ts";
import type { ProxyProcess } from "./helpers.ts";

/** Where the proxy pins its maps and link. */
export { PIN_DIR };
/** The pinned pairing map (2 entries per spliced connection). */
export const PAIRS_PIN = `${PIN_DIR}/${SOCKMAP_MAPS.pairs}`;

const decoder = new TextDecoder();

async function mtime(path: string): Promise<number> {
  try {
    return (await Deno.stat(path)).mtime?.getTime() ?? 0;
  } catch {
    return -1;
  }
}

/**
 * Builds the BPF objects (build.sh bpf) when bpf/NAME.bpf.o is missing or older than its
 * sources; returns why that failed, or null.
 */
export async function ensureBpfObject(name: "sockmap" | "xdp"): Promise<string | null> {
  const obj = await mtime(`${ROOT}bpf/${name}.bpf.o`);
  const src = Math.max(
    await mtime(`${ROOT}bpf/${name}.bpf.c`),
    await mtime(`${ROOT}bpf/${name}.h`),
  );
  if (obj >= src && obj > 0) return null;
  try {
    const out = await new Deno.Command("bash", {
      args: [`${ROOT}build.sh`, "bpf"],
      stderr: "piped",
    }).output();
    if (out.success) return null;
    return `build.sh bpf failed (install clang: apt-get install -y clang llvm libbpf-dev): ${
      decoder.decode(out.stderr)
    }`;
  } catch (e) {
    return `cannot run build.sh: ${(e as Error).message}`;
  }
}

/** Whether `cmd` is on PATH. */
export async function hasCommand(cmd: string): Promise<boolean> {
  try {
    const out = await new Deno.Command("sh", { args: ["-c", `command -v ${cmd}`] }).output();
    return out.success;
  } catch {
    return false;
  }
}

/**
 * Why the kernel-mode tests cannot run here (null: they can). Builds bpf/sockmap.bpf.o when it
 * is missing or older than its sources.
 */
export async function kernelSkipReason(): Promise<string | null> {
  if (Deno.build.os !== "linux") return "not Linux";
  if (Deno.uid() !== 0) return "not root (the eBPF tests need root: sudo deno task test)";
  try {
    libbpf();
  } catch (e) {
    return `${(e as Error).message} (apt-get install -y libbpf1)`;
  }
  const build = await ensureBpfObject("sockmap");
  if (build) return build;
  if (!(await cgroup2Mount())) return "no cgroup2 mount";
  for (const cmd of ["bpftool", "strace", "clang", "setpriv"]) {
    if (!(await hasCommand(cmd))) return `${cmd} not installed (apt-get install -y ${cmd})`;
  }
  return null;
}

/** The cgroup v2 mount point, or null. */
export async function cgroup2Mount(): Promise<string | null> {
  const mounts = await Deno.readTextFile("/proc/self/mounts");
  return mounts.split("\n").map((l) => l.split(" ")).find((f) => f[2] === "cgroup2")?.[1] ?? null;
}

/** Processes in the proxy's cgroup: a kernel-mode proxy (one per machine) is running. */
export async function kernelSlotHolders(): Promise<number[]> {
  const mount = await cgroup2Mount();
  try {
    const text = await Deno.readTextFile(`${mount}/${CGROUP_NAME}/cgroup.procs`);
    return text.split("\n").filter(Boolean).map(Number);
  } catch {
    return [];
  }
}

/**
 * Waits until no other kernel-mode proxy runs on the machine (other test files may start one
 * meanwhile); only one can hold the cgroup and the pins.
 */
export async function waitKernelSlot(ms = 60_000): Promise<void> {
  const deadline = Date.now() + ms;
  for (;;) {
    const holders = await kernelSlotHolders();
    if (holders.length === 0) return;
    if (Date.now() > deadline) {
      throw new Error(`another kernel-mode sni-proxy (pid ${holders.join(", ")}) kept running`);
    }
    await sleep(200);
  }
}

/**
 * `ebpf` config section turning the sockmap fast path on (`splice_mode` "sockmap": the tests of
 * the eBPF programs); `{ splice_mode: "pipe" }` for kernel mode's default, splice(2).
 */
export function kernelEbpf(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { enabled: true, sockmap_enabled: true, splice_mode: "sockmap", ...extra };
}

/**
 * Starts the proxy in kernel mode (waiting for the machine-wide slot first, retrying when
 * another kernel-mode proxy took it in between) and asserts it said `mode kernel`.
 */
export async function startKernelProxy(
  scope: Scope,
  config: Record<string, unknown>,
): Promise<ProxyProcess> {
  for (let attempt = 1;; attempt++) {
    await waitKernelSlot();
    const proxy = await startProxy(scope, config);
    if (/ready: .*mode kernel/.test(proxy.stderr())) return proxy;
    const lost = /already holds process/.test(proxy.stderr());
    await proxy.stop();
    if (!lost || attempt === 5) {
      assert.fail(`proxy did not start in kernel mode; output:\n${proxy.stderr()}`);
    }
  }
}

/** Entries in the pinned pairing map (bpftool map dump). */
export async function pairEntries(): Promise<number> {
  const out = await new Deno.Command("bpftool", {
    args: ["-j", "map", "dump", "pinned", PAIRS_PIN],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(`bpftool map dump: ${decoder.decode(out.stderr)}`);
  return (JSON.parse(decoder.decode(out.stdout)) as unknown[]).length;
}

/** Polls until the pinned pairing map holds `n` entries; returns the last count. */
export async function waitPairEntries(n: number, ms = 5000): Promise<number> {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = await pairEntries();
    if (got === n || Date.now() > deadline) return got;
    await sleep(50);
  }
}

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

// ---------------------------------------------------------------------------------------------
// Raw spliced sessions: a real ClientHello, then plain bytes, with exact counts

/** The byte a raw backend sends once it has the hello: the session is paired by then. */
export const GO = 0x47;

/**
 * A plain-TCP backend for raw sessions: it reads the relayed ClientHello, answers one
 * {@linkcode GO} byte and hands the connection to the test (or to `handle`).
 */
export interface RawBackend {
  port: number;
  address: string;
  /** The next accepted connection (hello read, GO sent). */
  next(): Promise<Deno.TcpConn>;
  close(): void;
}

/** Starts a {@linkcode RawBackend}; with `handle`, every connection goes to it instead. */
export function rawBackend(
  scope: Scope,
  handle?: (conn: Deno.TcpConn) => Promise<void>,
): RawBackend {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const ready: Deno.TcpConn[] = [];
  const waiting: ((c: Deno.TcpConn) => void)[] = [];
  const conns = new Set<Deno.TcpConn>();
  const close = () => {
    try {
      listener.close();
    } catch { /* closed */ }
    for (const c of conns) {
      try {
        c.close();
      } catch { /* closed */ }
    }
  };
  scope.defer(close);
  (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      (async () => {
        await readClientHello(conn);
        await writeAll(conn, new Uint8Array([GO]));
        if (handle) {
          await handle(conn).finally(() => {
            conns.delete(conn);
            try {
              conn.close();
            } catch { /* closed */ }
          });
          return;
        }
        const w = waiting.shift();
        if (w) w(conn);
        else ready.push(conn);
      })().catch(() => {
        try {
          conn.close();
        } catch { /* closed */ }
      });
    }
  })().catch(() => {});
  return {
    port,
    address: `127.0.0.1:${port}`,
    next: () => {
      const c = ready.shift();
      if (c) return Promise.resolve(c);
      return new Promise((resolve) => waiting.push(resolve));
    },
    close,
  };
}

/**
 * Client side of a raw session: sends a real ClientHello for `serverName` and waits for the
 * backend's GO byte, so the proxy has paired the sockets before any payload is sent (as a TLS
 * client waits for the ServerHello). Returns the conn and the hello's length.
 */
export async function rawSpliced(
  port: number,
  serverName: string,
): Promise<{ conn: Deno.TcpConn; helloBytes: number }> {
  const hello = await clientHelloBytes(serverName);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await writeAll(conn, hello);
    const b = new Uint8Array(1);
    const n = await conn.read(b);
    if (n !== 1 || b[0] !== GO) throw new Error(`expected the GO byte, got ${n ? b[0] : "EOF"}`);
  } catch (e) {
    conn.close();
    throw e;
  }
  return { conn, helloBytes: hello.length };
}

/** A pool of random bytes to write slices of. */
export function randomPool(bytes: number): Uint8Array {
  const pool = new Uint8Array(bytes);
  for (let off = 0; off < bytes; off += 65536) {
    crypto.getRandomValues(pool.subarray(off, Math.min(off + 65536, bytes)));
  }
  return pool;
}

/**
 * Writes `total` bytes taken from random places of `pool` in random sizes (1 to `maxWrite`);
 * returns their sha256. Closes the write side afterwards when `closeWrite`.
 */
export async function sendRandom(
  conn: Deno.Conn,
  pool: Uint8Array,
  total: number,
  opts: { maxWrite?: number; closeWrite?: boolean } = {},
): Promise<string> {
  const maxWrite = opts.maxWrite ?? 256 * 1024;
  const hash = createHash("sha256");
  let left = total;
  while (left > 0) {
    const len = Math.min(left, 1 + Math.floor(Math.random() * maxWrite));
    const off = Math.floor(Math.random() * (pool.length - len + 1));
    const chunk = pool.subarray(off, off + len);
    hash.update(chunk);
    await writeAll(conn, chunk);
    left -= len;
  }
  if (opts.closeWrite) await (conn as Deno.TcpConn).closeWrite();
  return hash.digest("hex");
}

/** Access-log entries (so far) of connections that went to `backend`. */
export async function entriesFor(
  proxy: ProxyProcess,
  backend: string,
): Promise<AccessEntry[]> {
  return (await proxy.access()).filter((e) => e.backend === backend);
}

/** Polls until the access log has at least `n` entries for `backend` (fails after `ms`). */
export async function entriesAtLeast(
  proxy: ProxyProcess,
  backend: string,
  n: number,
  ms = 10_000,
): Promise<AccessEntry[]> {
  const deadline = Date.now() + ms;
  for (;;) {
    const e = await entriesFor(proxy, backend);
    if (e.length >= n) return e;
    if (Date.now() > deadline) {
      throw new Error(`${e.length} of ${n} access entries for ${backend} after ${ms} ms`);
    }
    await sleep(50);
  }
}

// ---------------------------------------------------------------------------------------------
// A proxy under another user / command prefix (fallback tests)

/** A proxy started by {@linkcode startProxyAs}. */
export interface PlainProxy {
  pid: number;
  port: number;
  stderr(): string;
  accessLogPath: string;
  access(): Promise<AccessEntry[]>;
  stop(): Promise<number>;
}

/**
 * Starts `main.ts` on `config` with `prefix` before the deno command (e.g. setpriv dropping
 * root), in a temp dir owned by `uid` so that user can read the config and write the access
 * log; deno gets its own cache dir there and uses the repository's node_modules as is (no
 * registry access). Waits for `ready`.
 */
export async function startProxyAs(
  scope: Scope,
  config: Record<string, unknown>,
  opts: { prefix?: string[]; uid?: number } = {},
): Promise<PlainProxy> {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-kproxy-" });
  scope.defer(() => Deno.remove(dir, { recursive: true }).catch(() => {}));
  const accessLogPath = `${dir}/access.log`;
  const full = {
    workers: 1,
    ...config,
    timeouts: { drain_ms: 2000, ...(config.timeouts as object ?? {}) },
    log: { file: false, access_log: accessLogPath, level: "info" },
  };
  await Deno.writeTextFile(`${dir}/config.json`, JSON.stringify(full, null, 2));
  await Deno.mkdir(`${dir}/deno-cache`);
  if (opts.uid !== undefined) {
    for (const p of [dir, `${dir}/config.json`, `${dir}/deno-cache`]) {
      await Deno.chown(p, opts.uid, opts.uid);
    }
  }
  await Deno.chmod(dir, 0o755);
  const child = new Deno.Command(opts.prefix?.[0] ?? Deno.execPath(), {
    args: [
      ...(opts.prefix ? [...opts.prefix.slice(1), Deno.execPath()] : []),
      "run",
      "-A",
      "--unstable-net",
      "--node-modules-dir=manual",
      "--cached-only",
      `${ROOT}main.ts`,
      "--config",
      `${dir}/config.json`,
    ],
    cwd: ROOT,
    env: { DENO_DIR: `${dir}/deno-cache`, HOME: dir, NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let text = "";
  const pumps = Promise.all([child.stdout, child.stderr].map(async (s) => {
    for await (const chunk of s.pipeThrough(new TextDecoderStream())) text += chunk;
  })).catch(() => {});
  let exited = false;
  const status = child.status.finally(() => (exited = true));
  const stop = async () => {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch { /* exited */ }
    }
    const timer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
      } catch { /* exited */ }
    }, 8000);
    const s = await status;
    clearTimeout(timer);
    await pumps;
    return s.code;
  };
  scope.defer(async () => {
    await stop();
  });
  const deadline = Date.now() + 20_000;
  while (!/\bready\b/.test(text)) {
    if (exited || Date.now() > deadline) {
      await stop();
      throw new Error(`proxy did not get ready; output:\n${text}`);
    }
    await sleep(50);
  }
  const m = /listening on [0-9.]+:(\d+)/.exec(text);
  assert.ok(m, `no listening line; output:\n${text}`);
  return {
    pid: child.pid,
    port: Number(m[1]),
    stderr: () => text,
    accessLogPath,
    access: async () => {
      const t = await Deno.readTextFile(accessLogPath).catch(() => "");
      return t.split("\n").slice(0, -1).filter(Boolean).map((l) => JSON.parse(l));
    },
    stop,
  };
}

/**
 * Compiles (clang, at test time) an object with the maps and programs the loader looks up
 * (sni_sockhash, sni_pairs, sni_stats, sni_config; sni_sockops, sni_verdict) whose sock_ops
 * program the verifier must reject: it dereferences a hash-map lookup without the NULL check
 * (an array lookup with a constant key would pass: the verifier knows it cannot be NULL).
 */
export async function verifierRejectedObject(dir: string): Promise<string> {
  const src = `${dir}/rejected.bpf.c`;
  const obj = `${dir}/rejected.bpf.o`;
  await Deno.writeTextFile(
    src,
    `#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "sockmap.h"
struct { __uint(type, BPF_MAP_TYPE_SOCKHASH); __uint(max_entries, 1024);
  __type(key, struct sni_sock_key); __type(value, __u64); } sni_sockhash SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1024);
  __type(key, struct sni_sock_key); __type(value, struct sni_pair); } sni_pairs SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY); __uint(max_entries, 1);
  __type(key, __u32); __type(value, struct sni_stats); } sni_stats SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
  __type(key, __u32); __type(value, struct sni_config); } sni_config SEC(".maps");
SEC("sockops") int sni_sockops(struct bpf_sock_ops *skops) {
  struct sni_sock_key key = {};
  key.local_port = skops->local_port;
  struct sni_pair *pair = bpf_map_lookup_elem(&sni_pairs, &key);
  pair->packets++; /* no NULL check on a hash lookup: the verifier refuses this */
  return 1;
}
SEC("sk_skb/stream_verdict") int sni_verdict(struct __sk_buff *skb) { return SK_PASS; }
char _license[] SEC("license") = "Dual BSD/GPL";
`,
  );
  const multiarch = `/usr/include/${Deno.build.arch}-linux-gnu`;
  const out = await new Deno.Command("clang", {
    args: ["-O2", "-g", "-target", "bpf", `-I${ROOT}bpf`, `-I${multiarch}`, "-c", src, "-o", obj],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(`clang failed: ${decoder.decode(out.stderr)}`);
  return obj;
}

/**
 * A stream whose every 4-byte word tells its own position: word i is `seed + i` (little
 * endian). A received stream can then say where each of its bytes came from.
 */
export function positionStream(total: number, seed: number): Uint8Array {
  const out = new Uint8Array(total);
  const v = new DataView(out.buffer);
  for (let i = 0; i + 4 <= total; i += 4) v.setUint32(i, (seed + i / 4) >>> 0, true);
  return out;
}

/**
 * Where `got` first differs from a {@linkcode positionStream} `expected` (made with `seed`),
 * and where the bytes found there came from: tells lost, reordered and foreign bytes apart.
 */
export function describeMismatch(
  expected: Uint8Array,
  got: Uint8Array,
  seed: number,
  otherSeeds: number[] = [],
): string {
  const n = Math.min(expected.length, got.length);
  let off = 0;
  while (off < n && expected[off] === got[off]) off++;
  if (off === n && expected.length === got.length) return "identical";
  const head = `${got.length} of ${expected.length} bytes; first difference at ${off}`;
  if (off === got.length) return `${head}: truncated, the last ${expected.length - off} never came`;
  const word = off & ~3;
  if (word + 4 > got.length) return `${head}: a partial word at the end`;
  const value = new DataView(got.buffer, got.byteOffset).getUint32(word, true);
  const from = ((value - seed) >>> 0) * 4;
  if (from < expected.length) {
    return `${head}: the bytes there were sent at ${from} (${
      from > word ? "skipped" : "repeated"
    } ${Math.abs(from - word)} bytes)`;
  }
  for (const [k, other] of otherSeeds.entries()) {
    const at = ((value - other) >>> 0) * 4;
    if (at < expected.length) {
      return `${head}: the bytes there are from another connection's stream (#${k}, offset ${at})`;
    }
  }
  return `${head}: the bytes there were never sent (word 0x${value.toString(16)})`;
}

/**
 * Writes `data` in random sizes (1 to `maxWrite`), then closes the write side when
 * `closeWrite`.
 */
export async function writeRandomSizes(
  conn: Deno.Conn,
  data: Uint8Array,
  opts: { maxWrite?: number; closeWrite?: boolean } = {},
): Promise<void> {
  const maxWrite = opts.maxWrite ?? 256 * 1024;
  for (let off = 0; off < data.length;) {
    const len = Math.min(data.length - off, 1 + Math.floor(Math.random() * maxWrite));
    await writeAll(conn, data.subarray(off, off + len));
    off += len;
  }
  if (opts.closeWrite) await (conn as Deno.TcpConn).closeWrite();
}
