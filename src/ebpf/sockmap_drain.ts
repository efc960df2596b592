/**
 * Waiting until a spliced socket has taken every byte meant for it: what the verdict program
 * redirected to it plus what userspace wrote, compared with what TCP reports it took
 * (sock_diag), before the socket may be shut down or closed.
 * @module
 */

import type { SockDiag } from "../conn/tcpinfo.ts";
import { eventLoop } from "../io/loop.ts";
import type { SplicePair } from "./sockmap_pairs.ts";

/** Options of {@link waitDrained}. */
export interface DrainOptions {
  /** Give up after this long without progress; default 5000. */
  timeoutMs?: number;
  /** `queued` (default): in the TCP write queue or acked; `acked`: acked by the peer. */
  until?: "queued" | "acked";
  /** The source is at EOF (default true): also wait until its receive queue is empty. */
  sourceFinal?: boolean;
  /** Ends the wait early. */
  signal?: AbortSignal;
  /** Called each time the socket took more bytes. */
  progress?: () => void;
}

/** Result of {@link waitDrained}. */
export interface DrainResult {
  /** True when the target socket took every expected byte within the time limit. */
  drained: boolean;
  /** Bytes the target socket had to take (redirected + written by userspace). */
  expected: number;
  /** Bytes it had taken at the end (acked, plus still queued unless `until: "acked"`). */
  taken: number;
  /** How long the wait took. */
  waitedMs: number;
  /** The longest time without progress (the socket taking no byte) during the wait. */
  stalledMs: number;
  /** False when the socket no longer exists (closed, reset). */
  socketFound: boolean;
  /** Of `expected`, the bytes the kernel redirected (final once drained at the source's EOF). */
  redirected: number;
}

/** What the wait reads: the sockets' TCP info and the pairing entries' counters. */
export interface DrainSources {
  diag: SockDiag;
  /** Bytes the verdict program redirected from the socket keyed `key` (0 when gone). */
  redirected(key: Uint8Array): number;
}

/**
 * Polls (1 ms doubling to 50 ms) until the socket `toward` ("a" or "b") of `p` has taken the
 * bytes redirected to it plus `userspaceBytes`; see KernelAccel.waitDrained for the contract.
 */
export async function waitDrained(
  from: DrainSources,
  p: SplicePair,
  toward: "a" | "b",
  userspaceBytes: number,
  opts: DrainOptions = {},
): Promise<DrainResult> {
  const timeoutMs = opts.timeoutMs ?? 5000;
  const start = performance.now();
  const sourceKey = toward === "a" ? p.keyB : p.keyA;
  const source = toward === "a" ? p.tupleB : p.tupleA;
  const target = toward === "a" ? p.tupleA : p.tupleB;
  const synOffset = p.synOffset[toward];
  let delay = 1;
  let lastTaken = -1;
  let progressAt = start;
  let stalledMs = 0;
  for (;;) {
    // The source's EOF can reach userspace while the verdict program has not yet seen the
    // last bytes before it (strparser runs apart from recvmsg): until the source's receive
    // queue holds nothing but the FIN (rcv_nxt - copied_seq <= 1, the FIN being the last
    // sequence number), the redirect counter is not final. Call only after a real EOF.
    const src = opts.sourceFinal === false ? null : from.diag.query(source);
    const sourceDone = !src || src.readQueue <= 1;
    const redirected = from.redirected(sourceKey);
    const expected = redirected + userspaceBytes;
    const info = from.diag.query(target);
    const taken = info
      ? info.bytesAcked - synOffset + (opts.until === "acked" ? 0 : info.writeQueue)
      : 0;
    const now = performance.now();
    if (taken !== lastTaken) {
      if (lastTaken >= 0) opts.progress?.();
      lastTaken = taken;
      progressAt = now;
    }
    stalledMs = Math.max(stalledMs, now - progressAt);
    const drained = !!info && sourceDone && taken >= expected;
    if (
      drained || !info || now - progressAt >= timeoutMs || opts.signal?.aborted
    ) {
      return {
        drained,
        expected,
        taken,
        waitedMs: now - start,
        stalledMs,
        socketFound: !!info,
        redirected,
      };
    }
    // a connection's end waits for this: on the loop's clock, not a timer of Deno's loop
    await eventLoop().sleep(delay);
    delay = Math.min(delay * 2, 50);
  }
}
