/**
 * The proxy in kernel mode in tests: why the tests must skip, building the BPF objects, starting
 * a kernel-mode proxy, its pinned pairing map, and a BPF object the verifier rejects.
 *
 * @module
 */
import assert from "node:assert/strict";
import { libbpf } from "../../ffi/libbpf.ts";
import { instancePinDir, PIN_ROOT, SOCKMAP_MAPS } from "../../src/ebpf/layout.ts";
import { type ProxyProcess, startProxy } from "./process.ts";
import { ROOT, type Scope, sleep } from "./scope.ts";

/** Under this dir each kernel-mode proxy pins its maps, in a dir named by its pid. */
export { instancePinDir, PIN_ROOT };

/** The pinned pairing map of the proxy `pid` (2 entries per spliced connection). */
export function pairsPin(pid: number): string {
  return `${instancePinDir(pid)}/${SOCKMAP_MAPS.pairs}`;
}

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
export async function ensureBpfObject(
  name: "sockmap" | "xdp" | "quic_reuseport",
): Promise<string | null> {
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
  for (const cmd of ["bpftool", "strace", "clang", "setpriv"]) {
    if (!(await hasCommand(cmd))) return `${cmd} not installed (apt-get install -y ${cmd})`;
  }
  return null;
}

/**
 * `ebpf` config section turning the sockmap fast path on (`splice_mode` "sockmap": the tests of
 * the eBPF programs); `{ splice_mode: "pipe" }` for kernel mode's default, splice(2).
 */
export function kernelEbpf(extra: Record<string, unknown> = {}): Record<string, unknown> {
  return { enabled: true, sockmap_enabled: true, splice_mode: "sockmap", ...extra };
}

/** Starts the proxy in kernel mode and asserts its ready line says `mode: "kernel"`. */
export async function startKernelProxy(
  scope: Scope,
  config: Record<string, unknown>,
): Promise<ProxyProcess> {
  const proxy = await startProxy(scope, config);
  if (proxy.ready.mode === "kernel") return proxy;
  await proxy.stop();
  assert.fail(`proxy did not start in kernel mode; output:\n${proxy.stderr()}`);
}

/** Entries in the pairing map the proxy `pid` pinned (bpftool map dump). */
export async function pairEntries(pid: number): Promise<number> {
  const out = await new Deno.Command("bpftool", {
    args: ["-j", "map", "dump", "pinned", pairsPin(pid)],
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) throw new Error(`bpftool map dump: ${decoder.decode(out.stderr)}`);
  return (JSON.parse(decoder.decode(out.stdout)) as unknown[]).length;
}

/** Polls until the proxy `pid`'s pairing map holds `n` entries; returns the last count. */
export async function waitPairEntries(pid: number, n: number, ms = 5000): Promise<number> {
  const deadline = Date.now() + ms;
  for (;;) {
    const got = await pairEntries(pid);
    if (got === n || Date.now() > deadline) return got;
    await sleep(50);
  }
}

/**
 * Compiles (clang, at test time) an object with the maps and program the loader looks up
 * (sni_sockhash, sni_pairs, sni_stats; sni_verdict) whose verdict program the verifier must
 * reject: it dereferences a hash-map lookup without the NULL check (an array lookup with a
 * constant key would pass: the verifier knows it cannot be NULL).
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
SEC("sk_skb/stream_verdict") int sni_verdict(struct __sk_buff *skb) {
  struct sni_sock_key key = {};
  key.local_port = skb->local_port;
  struct sni_pair *pair = bpf_map_lookup_elem(&sni_pairs, &key);
  pair->packets++; /* no NULL check on a hash lookup: the verifier refuses this */
  return SK_PASS;
}
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

/** A proxy with one TLS listener routing `a.test` to `backend` (`route`: more of its fields), relaying in `mode`. */
export function relayModeProxy(
  scope: Scope,
  mode: "userspace" | "pipe" | "sockmap",
  backend: string,
  route: Record<string, unknown> = {},
): Promise<ProxyProcess> {
  const config = {
    listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
    routes: [{ match: "a.test", backends: [backend], ...route }],
  };
  if (mode === "userspace") return startProxy(scope, { ...config, ebpf: { enabled: false } });
  return startKernelProxy(scope, { ...config, ebpf: kernelEbpf({ splice_mode: mode }) });
}
