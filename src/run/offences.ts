/**
 * A worker's offences (`ebpf.xdp.block`), reported to the supervisor, which counts them in its
 * one {@link SourceBlocker} beside the XDP maps. Offences are batched: the first one starts a
 * short wait, and everything reported meanwhile goes out as one line, with one entry per source
 * (its offences counted, not listed). A queue holds at most `maxSources` sources: offences of
 * further sources are dropped and counted until the line is sent. So a flood of bad hellos
 * costs at most one bounded line per wait, whatever its rate or number of sources.
 *
 * @module
 */
import type { Offence, OffenceSink, SourceBlocker } from "../ebpf/xdpblock.ts";
import type { XdpBlockSnapshot } from "../ops/metrics.ts";
import { BurstLog, logger } from "../ops/log.ts";

const log = logger("xdp");
const bursts = new BurstLog(log);

/** One line of offences from a worker: per source, the last kind and how many. */
export interface OffenceLine {
  t: "offences";
  o: [source: string, kind: Offence, count: number][];
}

/** How a worker's offences are batched. */
export interface OffenceReporterOptions {
  /** Writes one line to the supervisor. */
  send: (line: OffenceLine) => void;
  /** How long the first offence of a batch waits for others; default 50 ms. */
  flushMs?: number;
  /** Sources in one batch at most; default 1024. */
  maxSources?: number;
}

/** The kinds a line may carry (an entry with another is skipped). */
const KINDS: ReadonlySet<string> = new Set<Offence>([
  "source_connections",
  "source_rate",
  "bad_client_hello",
  "bad_quic_initial",
]);

/** A worker's side: batches its offences for the supervisor. */
export class OffenceReporter implements OffenceSink {
  readonly #send: (line: OffenceLine) => void;
  readonly #flushMs: number;
  readonly #maxSources: number;
  /** Source -> the last kind and the offences since the last line. */
  readonly #queue = new Map<string, { kind: Offence; count: number }>();
  #timer: ReturnType<typeof setTimeout> | undefined;
  #closed = false;
  #reported = 0;
  #dropped = 0;

  constructor(options: OffenceReporterOptions) {
    this.#send = options.send;
    this.#flushMs = options.flushMs ?? 50;
    this.#maxSources = options.maxSources ?? 1024;
  }

  /** Sources waiting to be sent. */
  get queued(): number {
    return this.#queue.size;
  }

  /** Offences sent to the supervisor. */
  get reported(): number {
    return this.#reported;
  }

  /** Offences dropped because the queue was full. */
  get dropped(): number {
    return this.#dropped;
  }

  /** Queues one offence of `source`; drops (and counts) it when the queue is full. */
  offence(source: string, kind: Offence): void {
    if (this.#closed) return;
    const e = this.#queue.get(source);
    if (e) {
      e.count++;
      e.kind = kind;
      return;
    }
    if (this.#queue.size >= this.#maxSources) {
      this.#dropped++;
      bursts.warn(
        "offences_dropped",
        `offence of ${source} not reported to the supervisor: ${this.#maxSources} other sources ` +
          `wait to be sent (counted in sni_proxy_xdp_offences_dropped_total)`,
      );
      return;
    }
    this.#queue.set(source, { kind, count: 1 });
    this.#timer ??= setTimeout(() => this.flush(), this.#flushMs);
  }

  /** Sends what is queued now, as one line (nothing when the queue is empty). */
  flush(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    if (this.#queue.size === 0) return;
    const o: OffenceLine["o"] = [];
    for (const [source, { kind, count }] of this.#queue) {
      o.push([source, kind, count]);
      this.#reported += count;
    }
    this.#queue.clear();
    try {
      this.#send({ t: "offences", o });
    } catch (e) {
      log.debug(`offences not sent to the supervisor: ${(e as Error).message}`);
    }
  }

  /** What the supervisor adds to its own counters. */
  snapshot(): Partial<XdpBlockSnapshot> {
    return { offences_dropped: this.#dropped };
  }

  /** Sends what is left and stops (the worker stops). */
  close(): void {
    this.flush();
    this.#closed = true;
  }
}

/** The supervisor's side: counts a worker's line in `blocker`, as if seen here. */
export function countOffences(blocker: SourceBlocker, line: OffenceLine): void {
  if (!Array.isArray(line.o)) return;
  const now = performance.now();
  for (const entry of line.o) {
    if (!Array.isArray(entry)) continue;
    const [source, kind, count] = entry;
    if (typeof source !== "string" || !KINDS.has(kind) || !(Number.isInteger(count) && count > 0)) {
      continue;
    }
    blocker.offence(source, kind, now, count);
  }
}
