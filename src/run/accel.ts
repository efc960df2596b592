/**
 * The eBPF parts a proxy process opens: the sockmap fast path (or, in a worker, its
 * supervisor's), the XDP source filter and the block set of `ebpf.xdp.block`, and the QUIC
 * fast path of `ebpf.quic`, and with workers the steering of QUIC datagrams to the worker holding
 * their flow. Each is optional:
 * when one cannot be had, one warning says why and the proxy goes on without it.
 *
 * @module
 */
import type { Config } from "../config/mod.ts";
import { KernelAccel, KernelAccelError, type KernelStats } from "../ebpf/sockmap.ts";
import { XdpError, XdpFilter } from "../ebpf/xdp.ts";
import { SourceBlocker } from "../ebpf/xdpblock.ts";
import { QuicBpfError, QuicFastPath, type QuicFastPathStats } from "../ebpf/quic.ts";
import {
  QuicSteerError,
  QuicSteering,
  QuicSteeringWorker,
  type QuicSteerStats,
} from "../ebpf/quic_reuseport.ts";
import type { SteeredIds } from "../conn/quic_flow.ts";
import { STEER_CIDS } from "../ebpf/bounds.ts";
import { logger } from "../ops/log.ts";
import type { Metrics } from "../ops/metrics.ts";
import type { WorkerRole } from "./proxy.ts";
import { ebpfLog, kernelMode } from "./kernel_mode.ts";

export { ebpfLog, kernelMode };
const log = logger("proxy");

const kernelLog = ebpfLog("kernel");

/**
 * A worker's use of the supervisor's fast path, pinned under `pinDir`, or null (one warning)
 * when it cannot. `workers`: how many share the maps (the fill warning is about this share).
 */
export function attachKernel(config: Config, pinDir: string, workers: number): KernelAccel | null {
  const { sndbuf, rcvbuf } = config.ebpf;
  try {
    return KernelAccel.attach(kernelLog, pinDir, { share: 1 / workers, sndbuf, rcvbuf });
  } catch (err) {
    const why = err instanceof KernelAccelError ? err.message : String(err);
    log.warn(`eBPF fast path unavailable in this worker, userspace mode in use: ${why}`);
    return null;
  }
}

/** Opens the fast path, or logs one warning with cause and fix and returns null. */
export async function openKernel(config: Config): Promise<KernelAccel | null> {
  const e = config.ebpf;
  try {
    const kernel = await KernelAccel.open({
      ...e,
      object: e.object ? await readObject(e.object) : undefined,
      log: kernelLog,
    });
    log.info(`eBPF fast path on: sockmap splicing (pins in ${kernel.pinDir})`);
    return kernel;
  } catch (err) {
    const why = err instanceof KernelAccelError ? err.message : String(err);
    log.warn(`eBPF fast path unavailable, userspace mode in use: ${why}`);
    return null;
  }
}

/** `a` plus every number of `b`, key by key (a worker's socket counts into the sum). */
export function addCounters(
  a: Record<string, number>,
  b: Readonly<Record<string, number>> | KernelStats,
): Record<string, number> {
  for (const [k, v] of Object.entries(b)) a[k] = (a[k] ?? 0) + v;
  return a;
}

async function readObject(path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    throw new Error(`cannot read ebpf.object ${path}: ${(e as Error).message}`);
  }
}

/** Attaches the XDP filter, or logs one warning with cause and fix and returns null. */
/**
 * The XDP filter on `ports` and, with `ebpf.xdp.block`, the block set's counter of offences
 * (each null when off or unavailable: said in a log line). For the process that owns XDP.
 */
export async function openXdpBlocking(
  config: Config,
  ports: number[],
): Promise<{ xdp: XdpFilter | null; blocker: SourceBlocker | null }> {
  const xdp = await openXdp(config, ports);
  const block = config.ebpf.xdp?.block;
  if (!block) return { xdp, blocker: null };
  if (!xdp) {
    log.warn("ebpf.xdp.block: off, it needs the XDP filter attached");
    return { xdp, blocker: null };
  }
  log.info(
    `XDP blocks misbehaving sources: ${block.after} offences within ${block.windowMs} ms ` +
      `block one for ${block.blockMs} ms`,
  );
  return { xdp, blocker: new SourceBlocker(xdp, block) };
}

async function openXdp(config: Config, ports: number[]): Promise<XdpFilter | null> {
  const x = config.ebpf.xdp!;
  try {
    const filter = await XdpFilter.open({
      ...x,
      deny: config.acl.deny,
      allow: config.acl.allow,
      ports,
      blockMaxEntries: x.block?.maxEntries,
      log: ebpfLog("xdp"),
    });
    log.info(
      `XDP source filter on ${
        filter.attachments.map((a) => `${a.interface} (${a.mode})`).join(", ")
      }: ${config.acl.deny.length} deny, ${config.acl.allow.length} allow CIDRs`,
    );
    return filter;
  } catch (e) {
    const why = e instanceof XdpError ? e.message : String(e);
    log.warn(`XDP filter unavailable, the userspace ACL alone applies: ${why}`);
    return null;
  }
}

export function flattenXdp(s: ReturnType<XdpFilter["stats"]>): Record<string, number> {
  const out: Record<string, number> = {
    passed: s.passed,
    droppedDeny: s.droppedDeny,
    droppedNotAllowed: s.droppedNotAllowed,
    droppedBlocked: s.droppedBlocked,
  };
  for (const fam of ["ipv4", "ipv6"] as const) {
    out[`${fam}DroppedDeny`] = s[fam].droppedDeny;
    out[`${fam}DroppedNotAllowed`] = s[fam].droppedNotAllowed;
    out[`${fam}DroppedBlocked`] = s[fam].droppedBlocked;
  }
  return out;
}

/**
 * The kernel forwarding of routed QUIC flows (`ebpf.quic`), attached to its interfaces, or
 * null with one warning when it cannot be had (QUIC flows are then forwarded in userspace).
 * Each process has its own instance (its own maps); `share` of `max_flows` each.
 */
export async function openQuicFastPath(config: Config, share = 1): Promise<QuicFastPath | null> {
  const quic = config.ebpf.quic;
  if (!config.ebpf.enabled || !quic) return null;
  try {
    return await QuicFastPath.open({
      interfaces: quic.interfaces,
      maxFlows: Math.max(1, Math.ceil(quic.maxFlows / share)),
      log: ebpfLog("quic"),
    });
  } catch (err) {
    const why = err instanceof QuicBpfError ? err.message : String(err);
    log.warn(`QUIC kernel forwarding unavailable, QUIC flows are forwarded in userspace: ${why}`);
    return null;
  }
}

/** The QUIC fast path's counters as flat kernel counters (`sni_proxy_kernel_quic_*_total`). */
export function flattenQuic(s: QuicFastPathStats): Record<string, number> {
  return {
    toBackendPackets: s.toBackend.packets,
    toBackendBytes: s.toBackend.bytes,
    toClientPackets: s.toClient.packets,
    toClientBytes: s.toClient.bytes,
    deliveredLocal: s.deliveredLocal,
    redirected: s.redirected,
    passedNoFlow: s.passed.noFlow,
    passedFragment: s.passed.fragment,
    passedIpOptions: s.passed.ipOptions,
    passedTruncated: s.passed.truncated,
    passedFib: s.passed.fib,
    refusedFull: s.refused.full,
    refusedMixedFamilies: s.refused.mixedFamilies,
    refusedUnsupportedAddress: s.refused.unsupportedAddress,
  };
}

/** Connection IDs one flow is followed by at most (src/conn/quic_flow.ts). */
const CIDS_PER_FLOW = 4;

/**
 * With `workers` > 1 and a QUIC listener: the steering of QUIC datagrams to the worker holding
 * their flow (src/ebpf/quic_reuseport.ts), loaded and pinned in `pinDir` for the workers; or
 * null, with one warning when it cannot be had (the kernel's hash then picks the worker, and a
 * client that rebinds may land on one without its flow). Needs BPF, not `ebpf.enabled`: this
 * is what makes rebinding work with workers, as it does with one.
 */
export async function openQuicSteering(
  config: Config,
  pinDir: string,
): Promise<QuicSteering | null> {
  const listeners = config.listeners;
  if (config.workers < 2 || !listeners.some((l) => l.protocol === "quic")) return null;
  try {
    return await QuicSteering.open({
      workers: config.workers,
      listeners: listeners.length,
      maxCids: Math.min(
        Math.max(config.quic.maxFlows * CIDS_PER_FLOW, STEER_CIDS.min),
        STEER_CIDS.max,
      ),
      pinDir,
      log: ebpfLog("quic"),
    });
  } catch (err) {
    const why = errText(err);
    log.warn(
      `QUIC with ${config.workers} workers: datagrams go to the worker the kernel's hash picks, ` +
        `so a client that rebinds to a new address or port may land on a worker without its ` +
        `flow and lose it (dropped as unknown_flow); steering by connection ID is unavailable: ${why}`,
    );
    return null;
  }
}

/** A worker's part of the steering: what its QUIC listeners join with. */
export interface SteeringMember {
  /** Joins listener `listener`'s socket `fd`; null, with a warning, when it cannot. */
  join(listener: number, fd: number): SteeredIds | null;
  close(): void;
}

/**
 * A worker's part of the steering its supervisor pinned under `pinDir`, counted in `metrics`
 * (`sni_proxy_kernel_quic_steer_*`); null, with a warning, when it cannot be opened.
 */
export function joinQuicSteering(
  pinDir: string,
  worker: WorkerRole,
  metrics: Metrics,
): SteeringMember | null {
  let member: QuicSteeringWorker;
  try {
    member = QuicSteeringWorker.open(pinDir, worker.index, worker.count);
  } catch (err) {
    log.warn(`QUIC steering unavailable in this worker (its flows are hashed): ${errText(err)}`);
    return null;
  }
  metrics.kernelSources.set("quic_steer", () => ({
    mapFull: member.mapFull,
    updateFailed: member.failed,
  }));
  return {
    join: (listener, fd) => {
      try {
        return member.join(listener, fd);
      } catch (err) {
        log.warn(`QUIC steering: listener ${listener} not steered (hashed): ${errText(err)}`);
        return null;
      }
    },
    close: () => member.close(),
  };
}

function errText(err: unknown): string {
  return err instanceof QuicSteerError ? err.message : String(err);
}

/** The steering program's counters as flat kernel counters. */
export function flattenSteer(s: QuicSteerStats): Record<string, number> {
  return { ...s };
}
