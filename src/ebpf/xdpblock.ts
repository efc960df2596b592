/**
 * Temporary XDP blocks of misbehaving sources (`ebpf.xdp.block`): offences (per-source limit
 * refusals, bad ClientHellos / HTTP heads) are counted per client address over a window; the
 * `after`-th within `window_ms` puts the address into the XDP filter's block set for
 * `block_ms`, so its TCP packets to the listening ports are dropped in the driver before the
 * kernel builds an skb. A periodic sweep deletes expired entries (the program already ignores
 * them). The set lives in the filter's maps, so a reload (SIGHUP) keeps it.
 *
 * One process counts: the single-process proxy, or the supervisor, which owns the XDP maps
 * and to which every worker reports its offences (src/run/offences.ts), so offences seen by
 * different workers add up to the same thresholds.
 *
 * @module
 */
import type { XdpBlockConfig } from "../config/mod.ts";
import type { XdpBlock, XdpBlockResult } from "./xdp.ts";
import { BurstLog, logger } from "../ops/log.ts";
import { parseIp } from "../net/ip.ts";
import type { XdpBlockSnapshot } from "../ops/metrics.ts";

const log = logger("xdp");
const bursts = new BurstLog(log);

/** What counts against a source. */
export type Offence =
  | "source_connections"
  | "source_rate"
  | "bad_client_hello"
  /** A QUIC Initial that is cut, too small, undecryptable or holds no valid ClientHello. */
  | "bad_quic_initial";

/**
 * Where the accept loops and sessions report an offence: the counter itself
 * ({@link SourceBlocker}), or in a worker process the pipe to its supervisor's.
 */
export interface OffenceSink {
  /** Counts (or passes on) one offence of `source`; never throws. */
  offence(source: string, kind: Offence): void;
  /** Its counters, for `/stats` and `/metrics`. */
  snapshot(): Partial<XdpBlockSnapshot>;
  /** Stops its timers (the proxy stops). */
  close(): void;
}

/** The part of the XDP filter the blocker uses (see src/ebpf/xdp.ts). */
export interface BlockSet {
  block(source: string, ms: number): XdpBlockResult;
  unblock(source: string): boolean;
  sweepBlocked(): string[];
  blocked(): XdpBlock[];
}

/** Sources whose offences are counted at once; the oldest is forgotten beyond this. */
const TRACKED_MAX = 65_536;
/** How often expired blocks are deleted. */
const SWEEP_MS = 1_000;

/** Offence counts per source and the blocks they led to. */
export class SourceBlocker implements OffenceSink {
  readonly #set: BlockSet;
  readonly #settings: XdpBlockConfig;
  /** Source -> offences in the window that started at `since` (performance.now() ms). */
  readonly #offences = new Map<string, { count: number; since: number }>();
  /** Sources blocked now (offences from them are not counted meanwhile). */
  readonly #blocked = new Set<string>();
  #total = 0;
  /** Offences reported, from blocked sources too. */
  #offencesTotal = 0;
  readonly #sweeper: ReturnType<typeof setInterval>;

  constructor(set: BlockSet, settings: XdpBlockConfig) {
    this.#set = set;
    this.#settings = settings;
    // blocks already in the set: carried over from the instance this one took XDP over from
    for (const b of set.blocked()) this.#blocked.add(b.source);
    this.#sweeper = setInterval(() => this.sweep(), Math.min(SWEEP_MS, settings.blockMs));
    Deno.unrefTimer(this.#sweeper);
  }

  /** Sources whose offences are being counted. */
  get tracked(): number {
    return this.#offences.size;
  }

  /**
   * Counts `count` offences of `source` (a worker reports several at once); returns true when
   * they put the source into the block set. Never throws: a block that fails is logged and the
   * userspace limits still apply.
   */
  offence(source: string, kind: Offence, now = performance.now(), count = 1): boolean {
    this.#offencesTotal += count;
    if (this.#blocked.has(source)) return false;
    const s = this.#settings;
    let e = this.#offences.get(source);
    if (e && now - e.since > s.windowMs) {
      this.#offences.delete(source);
      e = undefined;
    }
    if (!e) {
      if (this.#offences.size >= TRACKED_MAX) this.#forgetOldest(now);
      e = { count: 0, since: now };
      this.#offences.set(source, e);
    }
    e.count += count;
    if (e.count < s.after) return false;
    this.#offences.delete(source);
    let result: XdpBlockResult;
    try {
      result = this.#set.block(source, s.blockMs);
    } catch (err) {
      bursts.warn("block_failed", `cannot block ${source} in XDP: ${(err as Error).message}`);
      return false;
    }
    if (result === "full") {
      bursts.warn(
        "block_full",
        `cannot block ${source} in XDP: the block set is full (ebpf.xdp.block.max_entries ` +
          `${s.maxEntries}); the userspace limits still apply`,
      );
      return false;
    }
    this.#blocked.add(source);
    this.#total++;
    log.warn(
      `${source} blocked in XDP for ${s.blockMs} ms: ${s.after} offences within ` +
        `${s.windowMs} ms (last: ${kind})`,
    );
    return true;
  }

  /**
   * Lifts the block of `address` now (the admin API), and forgets its offences; returns the
   * blocked source as it was recorded, or null when it is not blocked.
   */
  unblock(address: string): string | null {
    const want = parseIp(address);
    if (!want) return null;
    const same = (source: string) => {
      const ip = parseIp(source);
      return ip?.family === want.family && ip.bytes.every((b, i) => b === want.bytes[i]);
    };
    const source = this.#blocked.has(address) ? address : [...this.#blocked].find(same);
    if (source === undefined) return null;
    try {
      this.#set.unblock(source);
    } catch (e) {
      log.debug(`XDP unblock of ${source}: ${(e as Error).message}`);
    }
    this.#blocked.delete(source);
    this.#offences.delete(source);
    return source;
  }

  /** Deletes expired blocks and stale offence counts. */
  sweep(now = performance.now()): void {
    let gone: string[] = [];
    try {
      gone = this.#set.sweepBlocked();
    } catch (e) {
      log.debug(`XDP block sweep: ${(e as Error).message}`);
    }
    for (const source of gone) {
      this.#blocked.delete(source);
      log.info(`${source} unblocked in XDP: its block expired`);
    }
    for (const [source, e] of this.#offences) {
      if (now - e.since > this.#settings.windowMs) this.#offences.delete(source);
    }
  }

  /** The counters and the block set. */
  snapshot(): XdpBlockSnapshot {
    const blocked: XdpBlockSnapshot["blocked"] = {};
    let list: XdpBlock[] = [];
    try {
      list = this.#set.blocked();
    } catch { /* the filter is closing */ }
    for (const b of list) {
      blocked[b.source] = { seconds_left: Math.ceil(b.expiresInMs / 1000), hits: b.hits };
    }
    return {
      blocked_total: this.#total,
      blocked_sources: list.length,
      blocked,
      offences_total: this.#offencesTotal,
    };
  }

  /** Stops the sweep (the proxy stops; the filter goes with it). */
  close(): void {
    clearInterval(this.#sweeper);
  }

  /** Drops expired counts, or else the oldest one (Map order is insertion order). */
  #forgetOldest(now: number): void {
    for (const [source, e] of this.#offences) {
      if (now - e.since > this.#settings.windowMs) this.#offences.delete(source);
    }
    if (this.#offences.size >= TRACKED_MAX) {
      this.#offences.delete(this.#offences.keys().next().value!);
    }
  }
}
