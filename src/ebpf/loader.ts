/**
 * What every eBPF loader of the proxy shares: the error type, the platform and privilege checks,
 * opening a compiled object, libbpf's log routed to the loader at work, the hint for a failed
 * load, per-CPU counter sums and the undo stack a failed setup unwinds.
 * @module
 */

import { BpfError, BpfObject, libbpf, logTail, setLibbpfLogger } from "../../ffi/libbpf.ts";
import { Errno } from "../../ffi/libc.ts";
import { EbpfError, type EbpfLog, KernelAccelError } from "./errors.ts";

export { EbpfError, type EbpfLog, KernelAccelError };

/** The error class a loader reports with (a subclass of {@link EbpfError}). */
export type EbpfErrorClass = new (
  reason: string,
  cause: string,
  fix: string,
  options?: { cause?: unknown; interface?: string },
) => EbpfError;

/**
 * Fails with `unsupported_platform` off Linux on x86_64/aarch64 (the map layouts are little
 * endian), and with `old_kernel` below `minKernel`. `feature` names what needs it ("the XDP
 * filter"), `needs` what that kernel brings, `fallback` what to do instead.
 */
export function checkPlatform(
  Err: EbpfErrorClass,
  feature: string,
  minKernel: [number, number],
  needs: string,
  fallback: string,
): void {
  if (Deno.build.os !== "linux" || !["x86_64", "aarch64"].includes(Deno.build.arch)) {
    throw new Err(
      "unsupported_platform",
      `${feature} needs Linux on x86_64 or aarch64 (this is ${Deno.build.os}/${Deno.build.arch})`,
      fallback,
    );
  }
  const m = Deno.osRelease().match(/^(\d+)\.(\d+)/);
  const [major, minor] = m ? [Number(m[1]), Number(m[2])] : [0, 0];
  const [wantMajor, wantMinor] = minKernel;
  if (major < wantMajor || (major === wantMajor && minor < wantMinor)) {
    throw new Err(
      "old_kernel",
      `kernel ${Deno.osRelease()} is older than ${wantMajor}.${wantMinor} (${needs})`,
      `upgrade to Linux ${wantMajor}.${wantMinor} or later, or ${fallback}`,
    );
  }
}

const CAP_NET_ADMIN = 12n;
const CAP_SYS_ADMIN = 21n;
const CAP_BPF = 39n;

/** Effective capabilities of this process (bit set from /proc/self/status CapEff). */
async function effectiveCaps(): Promise<bigint> {
  const status = await Deno.readTextFile("/proc/self/status");
  const m = status.match(/^CapEff:\s*([0-9a-f]+)$/m);
  return m ? BigInt("0x" + m[1]) : 0n;
}

/**
 * Fails with `not_root` unless this process may load BPF programs (CAP_SYS_ADMIN, or CAP_BPF
 * with CAP_NET_ADMIN), or with `no_libbpf` when libbpf.so.1 cannot be loaded.
 */
export async function checkBpfAccess(
  Err: EbpfErrorClass,
  action: string,
  privilegeFix: string,
): Promise<void> {
  const caps = await effectiveCaps();
  const has = (c: bigint) => (caps >> c) & 1n;
  if (!has(CAP_SYS_ADMIN) && !(has(CAP_BPF) && has(CAP_NET_ADMIN))) {
    throw new Err(
      "not_root",
      `not permitted to ${action} (no CAP_BPF + CAP_NET_ADMIN, not root)`,
      privilegeFix,
    );
  }
  try {
    libbpf();
  } catch (e) {
    throw new Err(
      "no_libbpf",
      (e as Error).message,
      "install libbpf 1.x (Debian: apt-get install -y libbpf1)",
      { cause: e },
    );
  }
}

/**
 * Runs `fn`, a synchronous libbpf step (open, load, attach, pin), with libbpf's process-wide
 * print callback pointed at `log`: what libbpf says during it reaches the loader at work, not
 * whichever loader ran last. Messages between steps go to the log of the last step.
 */
export function withLibbpfLog<T>(log: EbpfLog, fn: () => T): T {
  setLibbpfLogger((level, message) => {
    log(level === "warn" ? "warning" : "debug", `libbpf: ${message.replace(/^libbpf: /, "")}`);
  });
  return fn();
}

/**
 * Opens one of the project's BPF objects: `given` bytes, or bpf/`file` beside this source tree
 * (embedded in the compiled binary). libbpf's own log goes to `log`. Fails with `no_object`
 * (not built) or `bad_object`.
 */
export async function openBpfObject(
  Err: EbpfErrorClass,
  file: string,
  objName: string,
  label: string,
  given: Uint8Array | undefined,
  log: EbpfLog,
): Promise<BpfObject> {
  let elf = given;
  if (!elf) {
    const url = new URL(`../../bpf/${file}`, import.meta.url);
    try {
      elf = await Deno.readFile(url);
    } catch (e) {
      throw new Err(
        "no_object",
        `cannot read the ${label} object ${url.pathname}: ${(e as Error).message}`,
        "build it with ./build.sh (needs clang)",
        { cause: e },
      );
    }
  }
  const bytes = elf;
  try {
    return withLibbpfLog(log, () => BpfObject.openMem(bytes, objName));
  } catch (e) {
    throw new Err(
      "bad_object",
      `the ${label} object is unusable: ${(e as Error).message}`,
      "rebuild it with ./build.sh",
      { cause: e },
    );
  }
}

/** What a loader says about a failed bpf_object__load, per cause. */
export interface LoadErrorHints {
  /** The program, as in "the kernel verifier rejected the eBPF program". */
  program: string;
  /** What to do when the verifier rejects it ("run in userspace mode"). */
  verifierFallback: string;
  /** errnos that mean the maps did not fit. */
  memoryErrnos: number[];
  /** Reason, message and fix for those. */
  memory: { reason: string; cause: (errnoName: string) => string; fix: string };
  /** What was refused, as in "loading eBPF was refused (EPERM)". */
  refused: string;
  permissionFix: string;
  /** The object, as in "loading the eBPF object failed", and what else to check. */
  object: string;
  otherFix: string;
}

/** The error for a failed load: verifier, memory, permission or other, with the loader's hints. */
export function loadError(Err: EbpfErrorClass, e: unknown, h: LoadErrorHints): Error {
  if (!(e instanceof BpfError)) return e as Error;
  if (e.verifierLog) {
    return new Err(
      "verifier_rejected",
      `the kernel verifier rejected ${h.program} (${e.errnoName}):\n${logTail(e.verifierLog, 20)}`,
      `this kernel lacks a feature the program needs; ${h.verifierFallback} or upgrade the kernel`,
      { cause: e },
    );
  }
  if (h.memoryErrnos.includes(e.errno)) {
    return new Err(h.memory.reason, h.memory.cause(e.errnoName), h.memory.fix, { cause: e });
  }
  if (e.errno === Errno.EPERM) {
    return new Err(
      "not_permitted",
      `loading ${h.refused} was refused (EPERM): ${e.message}`,
      h.permissionFix,
      { cause: e },
    );
  }
  return new Err(
    "load_failed",
    `loading ${h.object} failed: ${e.message}`,
    h.otherFix,
    { cause: e },
  );
}

/**
 * Sums a per-CPU map value over CPUs: `buf` holds one value per possible CPU, each `size`
 * bytes rounded up to 8, starting with little-endian u64 counters named by `fields`.
 */
export function sumPerCpu<F extends string>(
  buf: Uint8Array,
  size: number,
  fields: readonly F[],
): Record<F, number> {
  const sums = new Array<number>(fields.length).fill(0);
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const stride = Math.ceil(size / 8) * 8;
  for (let off = 0; off + stride <= buf.length; off += stride) {
    for (let i = 0; i < fields.length; i++) sums[i] += Number(v.getBigUint64(off + i * 8, true));
  }
  return Object.fromEntries(fields.map((f, i) => [f, sums[i]])) as Record<F, number>;
}

/**
 * The steps a setup has taken, each with its undo: a failed setup calls {@link Undo.unwind},
 * which undoes them in reverse and ignores what fails on the way (the error being reported is
 * the setup's). A successful one simply drops the stack.
 */
export class Undo {
  readonly #steps: (() => void | Promise<void>)[] = [];

  /** Record how to undo the step just taken. */
  push(undo: () => void | Promise<void>): void {
    this.#steps.push(undo);
  }

  /** Undo every recorded step, newest first. */
  async unwind(): Promise<void> {
    for (const undo of this.#steps.splice(0).reverse()) {
      try {
        await undo();
      } catch { /* the step's resource is gone already, or freed with what follows */ }
    }
  }
}

/**
 * Why the XDP filter could not be set up or updated. Reasons: `bad_option`,
 * `unsupported_platform`, `old_kernel`, `not_root`, `no_libbpf`, `no_object`, `bad_object`,
 * `no_interface`, `load_failed`, `verifier_rejected`, `interface_busy`, `native_unsupported`,
 * `not_permitted`, `attach_failed`, `too_many_entries`, `update_failed`, `closed`.
 */
export class XdpError extends EbpfError {
  override name = "XdpError";
}
