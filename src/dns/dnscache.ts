/**
 * DNS answer cache for backend names: TTL clamped to [min, max], negative caching, one upstream
 * lookup in flight per name (concurrent callers share it), LRU bounded. Two stores with the same
 * behaviour: an in-process LRU (src/dns/store.ts), or a pinned BPF LRU_HASH map that outlives
 * the process, is shared by every proxy on the host and can be read with
 * `bpftool map dump pinned PATH` (src/dns/pinned.ts).
 *
 * Expiry times are wall-clock (CLOCK_REALTIME) milliseconds so a pinned entry stays meaningful
 * across restarts. How names are looked up upstream is the caller's ({@link DnsLookup}).
 * @module
 */

import { normalizeName as foldName } from "../route/router.ts";
import { openPinnedStore } from "./pinned.ts";
import { DNS_CACHE_ENTRIES } from "../ebpf/bounds.ts";
import { type CacheStore, type DnsCacheEntry, MAX_ADDRS_PER_FAMILY, MemoryStore } from "./store.ts";

export { MAX_ADDRS_PER_FAMILY };
export type { DnsCacheEntry };

/** Why a name has no addresses. */
export type DnsErrorCode =
  | "not_found" // NXDOMAIN
  | "no_data" // the name exists but has no A or AAAA record
  | "bad_name" // not a valid DNS name
  | "timeout" // no server answered in time
  | "server_failure"; // SERVFAIL, REFUSED, malformed answers, network errors

/** A failed resolution; `message` names the name and the cause. */
export class DnsError extends Error {
  /** Machine-readable cause. */
  readonly code: DnsErrorCode;
  /** The name that was looked up. */
  readonly hostname: string;
  constructor(code: DnsErrorCode, hostname: string, detail: string, options?: { cause?: unknown }) {
    super(`cannot resolve ${JSON.stringify(hostname)}: ${detail}`, options);
    this.name = "DnsError";
    this.code = code;
    this.hostname = hostname;
  }
}

/** What an upstream lookup of both families found (input of the cache). */
export interface DnsLookupResult {
  /** IPv4 addresses (text), in answer order. */
  v4: string[];
  /** IPv6 addresses (text), in answer order. */
  v6: string[];
  /** Smallest TTL of the records used, in ms (before clamping). */
  ttlMs: number;
  /** Set when there is no address: NXDOMAIN, or NOERROR without A/AAAA data. */
  negative: "not_found" | "no_data" | null;
  /** True when one family failed (timeout, SERVFAIL): cached no longer than negativeTtlMs. */
  partial: boolean;
}

/** Looks a lower-case name up upstream; throws {@link DnsError} on failure (not cached). */
export type DnsLookup = (name: string) => Promise<DnsLookupResult>;

/** Options of {@link DnsCache}. */
export interface DnsCacheOptions {
  /** Answers are kept at least this long, whatever their TTL. */
  minTtlMs: number;
  /** ...and at most this long. */
  maxTtlMs: number;
  /** How long NXDOMAIN / no-data answers are kept. */
  negativeTtlMs: number;
  /** Capacity (LRU eviction beyond it); also the pinned map's max_entries. */
  maxEntries: number;
  /** Keep the cache in a BPF LRU_HASH map pinned at `path` (a bpffs file); null: in-process. */
  pinned?: { path: string } | null;
}

/** Log sink (same levels as the proxy's logger). */
export type DnsLog = (level: "debug" | "info" | "warning" | "error", message: string) => void;

/** Counters since the cache was opened. */
export interface DnsCacheStats {
  /** Answered from the cache (positive). */
  hits: number;
  /** Answered from the cache with a cached NXDOMAIN / no-data. */
  negativeHits: number;
  /** Callers that joined a lookup already in flight. */
  coalesced: number;
  /** Upstream lookups started (each is one A and one AAAA query, plus retries). */
  lookups: number;
  /** Upstream lookups that failed (not cached). */
  failures: number;
}

/** Longest name a DNS message can carry in text form. */
export const MAX_NAME_LENGTH = 253;

/**
 * The name as routes compare it ({@link foldName}: lower case, one trailing dot removed); throws
 * {@link DnsError} `bad_name` when it is not a DNS name.
 */
export function normalizeDnsName(name: string): string {
  const n = foldName(name);
  if (
    n.length === 0 || n.length > MAX_NAME_LENGTH ||
    !/^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/.test(n)
  ) {
    throw new DnsError("bad_name", name, "not a valid DNS name");
  }
  return n;
}

/** The cache. Use {@link DnsCache.open}; one per process (several may share a pinned map). */
export class DnsCache {
  readonly #store: CacheStore;
  readonly #lookup: DnsLookup;
  readonly #options: DnsCacheOptions;
  readonly #inflight = new Map<string, Promise<DnsCacheEntry>>();
  readonly #log: DnsLog;
  /** Counters since open (read them for metrics). */
  readonly stats: DnsCacheStats = {
    hits: 0,
    negativeHits: 0,
    coalesced: 0,
    lookups: 0,
    failures: 0,
  };

  private constructor(
    store: CacheStore,
    lookup: DnsLookup,
    options: DnsCacheOptions,
    log: DnsLog,
  ) {
    this.#store = store;
    this.#lookup = lookup;
    this.#options = options;
    this.#log = log;
  }

  /**
   * An in-process cache, or with `options.pinned` the pinned map (created when missing).
   * @throws {KernelAccelError} when the pinned map cannot be opened or created (cause and fix
   *   in the message); the caller may fall back to an in-process cache.
   * @throws {RangeError} on bad options.
   */
  static open(options: DnsCacheOptions, lookup: DnsLookup, log: DnsLog = () => {}): DnsCache {
    const { minTtlMs, maxTtlMs, negativeTtlMs, maxEntries } = options;
    for (const [k, v] of Object.entries({ minTtlMs, maxTtlMs, negativeTtlMs })) {
      if (!Number.isFinite(v) || v < 0) throw new RangeError(`${k} must be >= 0 (got ${v})`);
    }
    if (minTtlMs > maxTtlMs) {
      throw new RangeError(`minTtlMs (${minTtlMs}) is above maxTtlMs (${maxTtlMs})`);
    }
    // below the config's minimum too: small caches let tests reach eviction
    if (!Number.isInteger(maxEntries) || maxEntries < 1 || maxEntries > DNS_CACHE_ENTRIES.max) {
      throw new RangeError(
        `maxEntries must be an integer from 1 to ${DNS_CACHE_ENTRIES.max} (got ${maxEntries})`,
      );
    }
    const store: CacheStore = options.pinned
      ? openPinnedStore(options.pinned.path, maxEntries, log)
      : new MemoryStore(maxEntries);
    return new DnsCache(store, lookup, options, log);
  }

  /** `memory` or `pinned`. */
  get kind(): "memory" | "pinned" {
    return this.#store.kind;
  }

  /**
   * Addresses of `name` (IPv4 first, then IPv6, each in answer order), from the cache when fresh,
   * else from one upstream lookup shared by all concurrent callers.
   * @throws {DnsError} for bad names, NXDOMAIN / no data (also when cached), lookup failures.
   */
  async resolve(name: string): Promise<string[]> {
    const key = normalizeDnsName(name);
    const cached = this.#fresh(key);
    const entry = cached ?? await this.#join(key);
    if (entry.negative) {
      if (cached) this.stats.negativeHits++;
      throw new DnsError(
        entry.negative,
        key,
        `${entry.negative === "not_found" ? "no such name (NXDOMAIN)" : "no A or AAAA record"}${
          cached ? `, cached for ${Math.max(0, entry.expiresAtMs - Date.now())} ms more` : ""
        }`,
      );
    }
    if (cached) this.stats.hits++;
    return [...entry.v4, ...entry.v6];
  }

  /** The cached entry of `name`, fresh or stale, without a lookup (null when absent). */
  peek(name: string): DnsCacheEntry | null {
    return this.#store.get(normalizeDnsName(name));
  }

  #fresh(key: string): DnsCacheEntry | null {
    let e: DnsCacheEntry | null;
    try {
      e = this.#store.get(key);
    } catch (err) {
      // a failing map read must not fail the connection: treat it as a miss
      this.#log("warning", `DNS cache: read of ${key} failed: ${(err as Error).message}`);
      return null;
    }
    return e && e.expiresAtMs > Date.now() ? e : null;
  }

  #join(key: string): Promise<DnsCacheEntry> {
    const running = this.#inflight.get(key);
    if (running) {
      this.stats.coalesced++;
      return running;
    }
    const p = this.#fetch(key).finally(() => this.#inflight.delete(key));
    this.#inflight.set(key, p);
    return p;
  }

  async #fetch(key: string): Promise<DnsCacheEntry> {
    this.stats.lookups++;
    let r: DnsLookupResult;
    try {
      r = await this.#lookup(key);
    } catch (e) {
      this.stats.failures++;
      throw e;
    }
    const o = this.#options;
    let ttl = r.negative ? o.negativeTtlMs : Math.min(Math.max(r.ttlMs, o.minTtlMs), o.maxTtlMs);
    if (r.partial) ttl = Math.min(ttl, o.negativeTtlMs);
    const now = Date.now();
    const entry: DnsCacheEntry = {
      expiresAtMs: now + ttl,
      resolvedAtMs: now,
      negative: r.negative,
      v4: r.v4.slice(0, MAX_ADDRS_PER_FAMILY),
      v6: r.v6.slice(0, MAX_ADDRS_PER_FAMILY),
    };
    if (ttl > 0) {
      try {
        this.#store.set(key, entry);
      } catch (err) {
        this.#log("warning", `DNS cache: write of ${key} failed: ${(err as Error).message}`);
      }
    }
    return entry;
  }

  /** Release the store (a pinned map stays pinned for the next process). */
  close(): void {
    this.#store.close();
  }
}
