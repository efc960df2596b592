/**
 * The sockmap verdict program's counters (`sni_stats`, a per-CPU array) summed over CPUs, the
 * sockets userspace put in the sockhash, and the warning when they near the maps' capacity.
 * @module
 */

import type { BpfMap } from "../../ffi/libbpf.ts";
import { KEY_ZERO, SOCKMAP_STATS_FIELDS, SOCKMAP_STATS_SIZE } from "./layout.ts";
import { type EbpfLog, sumPerCpu } from "./loader.ts";

/** What a process counts of the sockets it inserts into the sockhash. */
export interface SocketCounts {
  inserted: number;
  /** pair() refused: a map full, a socket gone. */
  insertFailures: number;
  /** SO_SNDBUF/SO_RCVBUF could not be set. */
  setsockoptFailures: number;
  /** In the sockhash now (inserted, not yet unpaired). */
  live: number;
}

/**
 * Sum over CPUs of the verdict program's counters (struct sni_stats), and the socket counts of
 * the process that reads them (a supervisor adds its workers').
 */
export interface KernelStats {
  bytesSpliced: number;
  /** Of bytesSpliced: client -> backend (the `a` side of pair() is the client's). */
  bytesUpstream: number;
  /** Of bytesSpliced: backend -> client. */
  bytesDownstream: number;
  /** Of packetsSpliced: client -> backend / backend -> client. */
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
  /** Sockets in the sockhash now: its fill (2 per spliced session, as in the pairing map). */
  socketsLive: number;
}

/**
 * Reads `sni_stats` into `buf` (its value buffer) and sums it; all zero without the map (a
 * worker, which does not open it) or when the lookup finds nothing. The socket counts are
 * `sockets`.
 */
export function readKernelStats(
  map: BpfMap | null,
  buf: Uint8Array,
  sockets: SocketCounts,
): KernelStats {
  const ok = map?.lookup(KEY_ZERO, buf) ?? false;
  const s = sumPerCpu(ok ? buf : new Uint8Array(0), SOCKMAP_STATS_SIZE, SOCKMAP_STATS_FIELDS);
  return {
    bytesSpliced: s.bytes_spliced,
    packetsSpliced: s.packets_spliced,
    redirectFailures: s.redirect_failures,
    passed: s.passed,
    socketsInserted: sockets.inserted,
    insertFailures: sockets.insertFailures,
    setsockoptFailures: sockets.setsockoptFailures,
    bytesUpstream: s.bytes_upstream,
    bytesDownstream: s.bytes_spliced - s.bytes_upstream,
    packetsUpstream: s.packets_upstream,
    packetsDownstream: s.packets_spliced - s.packets_upstream,
    emptyDropped: s.empty_dropped,
    socketsLive: sockets.live,
  };
}

/**
 * Warns (once per crossing) when the sockets in the sockhash (`live()`) pass 80 % of
 * `capacity` (the map's size, or a worker's share of it): past 100 % new connections run in
 * userspace mode. Each socket there has one pairing entry, so this also tells the pairing
 * map's fill. Returns the (unref'd) timer to clear.
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
