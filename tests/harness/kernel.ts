/**
 * The proxy in kernel mode in tests: why the tests must skip, building the BPF objects, the
 * machine-wide kernel-mode slot, the pinned pairing map, and a BPF object the verifier rejects.
 *
 * @module
 */
import assert from "node:assert/strict";
import { libbpf } from "../../ffi/libbpf.ts";
import { PIN_DIR, SOCKMAP_MAPS } from "../../src/ebpf/layout.ts";
import { CGROUP_NAME } from "../../src/ebpf/host.ts";
import { type ProxyProcess, startProxy } from "./process.ts";
import { ROOT, type Scope, sleep } from "./scope.ts";

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
 * another kernel-mode proxy took it in between) and asserts its ready line says `mode: "kernel"`.
 */
export async function startKernelProxy(
  scope: Scope,
  config: Record<string, unknown>,
): Promise<ProxyProcess> {
  for (let attempt = 1;; attempt++) {
    await waitKernelSlot();
    const proxy = await startProxy(scope, config);
    if (proxy.ready.mode === "kernel") return proxy;
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
