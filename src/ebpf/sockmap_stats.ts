/**
 * The sockmap programs' counters (`sni_stats`, a per-CPU array) summed over CPUs, and the
 * warning when the tracked sockets near the maps' capacity.
 * @module
 */

import type { BpfMap } from "../../ffi/libbpf.ts";
import { KEY_ZERO, SOCKMAP_STATS_FIELDS, SOCKMAP_STATS_SIZE } from "./layout.ts";
import { type EbpfLog, sumPerCpu } from "./loader.ts";

/** Sum over CPUs of the kernel programs' counters (struct sni_stats). */
export interface KernelStats {
  bytesSpliced: number;
  /** Of bytesSpliced: client → backend (the `a` side of pair() is the client's). */
  bytesUpstream: number;
  /** Of bytesSpliced: backend → client. */
  bytesDownstream: number;
  /** Of packetsSpliced: client → backend / backend → client. */
  packetsUpstream: number;
  packetsDownstream: number;
  packetsSpliced: number;
  redirectFailures: number;
  passed: number;
  socketsInserted: number;
  insertFailures: number;
  setsockoptFailures: number;
  /** Payload-less skbs (a FIN) dropped by the verdict: TCP has already seen the FIN. */
  emptyDropped: number;
  /** Tracked sockets now (inserted less closed): the sockhash's fill, an upper bound of the pairs'. */
  socketsLive: number;
}

/**
 * Reads `sni_stats` into `buf` (its value buffer) and sums it; all zero without the map (a
 * worker, which does not open it) or when the lookup finds nothing.
 */
export function readKernelStats(map: BpfMap | null, buf: Uint8Array): KernelStats {
  const ok = map?.lookup(KEY_ZERO, buf) ?? false;
  const s = sumPerCpu(ok ? buf : new Uint8Array(0), SOCKMAP_STATS_SIZE, SOCKMAP_STATS_FIELDS);
  return {
    bytesSpliced: s.bytes_spliced,
    packetsSpliced: s.packets_spliced,
    redirectFailures: s.redirect_failures,
    passed: s.passed,
    socketsInserted: s.sockets_inserted,
    insertFailures: s.insert_failures,
    setsockoptFailures: s.setsockopt_failures,
    bytesUpstream: s.bytes_upstream,
    bytesDownstream: s.bytes_spliced - s.bytes_upstream,
    packetsUpstream: s.packets_upstream,
    packetsDownstream: s.packets_spliced - s.packets_upstream,
    emptyDropped: s.empty_dropped,
    socketsLive: Math.max(0, s.sockets_inserted - s.sockets_closed),
  };
}

/**
 * Warns (once per crossing) when the tracked sockets (`live()`) pass 80 % of the maps' size:
 * past 100 % new connections run in userspace mode. Every tracked socket can take one pairing
 * entry, so this also bounds the pairing map's fill. Returns the (unref'd) timer to clear.
 */
export function watchFill(
  capacity: number,
  live: () => number,
  log: EbpfLog,
): ReturnType<typeof setInterval> {
  let warned = false;
  const timer = setInterval(() => {
    const n = live();
    if (!warned && n > capacity * 0.8) {
      warned = true;
      log(
        "warning",
        `eBPF maps ${Math.round(n / capacity * 100)}% full (${n} of ${capacity} ` +
          `sockets): when full, new connections run in userspace mode; raise ebpf.maps`,
      );
    } else if (warned && n < capacity * 0.7) {
      warned = false;
      log("info", `eBPF maps back under 70% full (${n} of ${capacity} sockets)`);
    }
  }, 500);
  Deno.unrefTimer(timer);
  return timer;
}
