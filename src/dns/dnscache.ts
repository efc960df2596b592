/**
 * DNS answer cache for backend names: TTL clamped to [min, max], negative caching, one upstream
 * lookup in flight per name (concurrent callers share it), LRU bounded. Two stores with the same
 * behaviour: an in-process LRU, or a pinned BPF LRU_HASH map that outlives the process, is shared
 * by every proxy on the host and can be read with `bpftool map dump pinned PATH`.
 *
 * Expiry times are wall-clock (CLOCK_REALTIME) milliseconds so a pinned entry stays meaningful
 * across restarts. How names are looked up upstream is the caller's ({@link DnsLookup}).
 * @module
 */

import {
  BpfError,
  BpfMapFd,
  BpfMapType,
  BtfBuilder,
  BtfIntEncoding,
  libbpf,
} from "../../ffi/libbpf.ts";
import { Errno } from "../../ffi/libc.ts";
import { formatIpv6, parseIpv4, parseIpv6 } from "../net/ip.ts";
import { normalizeName as foldName } from "../route/router.ts";
import { KernelAccelError } from "../ebpf/loader.ts";

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

/** One cached answer. */
export interface DnsCacheEntry {
  /** Wall-clock ms after which the entry is stale. */
  expiresAtMs: number;
  /** Wall-clock ms when it was resolved. */
  resolvedAtMs: number;
  negative: "not_found" | "no_data" | null;
  v4: string[];
  v6: string[];
}

/** Where entries live. Keys are normalised names. */
interface CacheStore {
  readonly kind: "memory" | "pinned";
  get(name: string): DnsCacheEntry | null;
  set(name: string, entry: DnsCacheEntry): void;
  close(): void;
}

/** Most addresses kept per family (more are dropped; the session tries them in order anyway). */
export const MAX_ADDRS_PER_FAMILY = 8;
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

/** In-process LRU: a Map in use order (a hit moves the name to the end). */
class MemoryStore implements CacheStore {
  readonly kind = "memory";
  readonly #entries = new Map<string, DnsCacheEntry>();
  readonly #max: number;

  constructor(max: number) {
    this.#max = max;
  }

  get(name: string): DnsCacheEntry | null {
    const e = this.#entries.get(name);
    if (!e) return null;
    this.#entries.delete(name);
    this.#entries.set(name, e);
    return e;
  }

  set(name: string, entry: DnsCacheEntry): void {
    this.#entries.delete(name);
    this.#entries.set(name, entry);
    if (this.#entries.size > this.#max) {
      this.#entries.delete(this.#entries.keys().next().value!);
    }
  }

  close(): void {
    this.#entries.clear();
  }
}

// Pinned map layout. Key: struct sni_dns_key { char name[256]; } (lower-case, zero padded).
// Value: struct sni_dns_entry, little-endian, 8-aligned:
const KEY_SIZE = 256;
const V_EXPIRES = 0; // u64 expires_at_ms (CLOCK_REALTIME)
const V_RESOLVED = 8; // u64 resolved_at_ms
const V_FLAGS = 16; // u32: FLAG_*
const V_COUNT4 = 20; // u8
const V_COUNT6 = 21; // u8
const V_IPV4 = 24; // u8 ipv4[8][4]
const V_IPV6 = V_IPV4 + 4 * MAX_ADDRS_PER_FAMILY; // u8 ipv6[8][16]
const VALUE_SIZE = V_IPV6 + 16 * MAX_ADDRS_PER_FAMILY; // 184
const FLAG_NOT_FOUND = 1;
const FLAG_NO_DATA = 2;
const MAP_NAME = "sni_dns_cache";

/** The pinned map's key and value types, for a readable `bpftool map dump`. */
function buildBtf(btf: BtfBuilder): { keyTypeId: number; valueTypeId: number } {
  const char = btf.addInt("char", 1, BtfIntEncoding.CHAR);
  const u8 = btf.addInt("__u8", 1);
  const u32 = btf.addInt("__u32", 4);
  const u64 = btf.addInt("__u64", 8);
  const nameArr = btf.addArray(u32, char, KEY_SIZE);
  const ip4 = btf.addArray(u32, u8, 4);
  const ip4s = btf.addArray(u32, ip4, MAX_ADDRS_PER_FAMILY);
  const ip6 = btf.addArray(u32, u8, 16);
  const ip6s = btf.addArray(u32, ip6, MAX_ADDRS_PER_FAMILY);
  const keyTypeId = btf.addStruct("sni_dns_key", KEY_SIZE);
  btf.addField("name", nameArr, 0);
  const valueTypeId = btf.addStruct("sni_dns_entry", VALUE_SIZE);
  btf.addField("expires_at_ms", u64, V_EXPIRES);
  btf.addField("resolved_at_ms", u64, V_RESOLVED);
  btf.addField("flags", u32, V_FLAGS);
  btf.addField("count_v4", u8, V_COUNT4);
  btf.addField("count_v6", u8, V_COUNT6);
  btf.addField("ipv4", ip4s, V_IPV4);
  btf.addField("ipv6", ip6s, V_IPV6);
  return { keyTypeId, valueTypeId };
}

/** Entries in a BPF LRU_HASH map pinned on bpffs, shared by every process that opens the pin. */
class PinnedStore implements CacheStore {
  readonly kind = "pinned";
  readonly #map: BpfMapFd;
  // reused buffers: one lookup/update at a time (single-threaded)
  readonly #key = new Uint8Array(KEY_SIZE);
  readonly #value = new Uint8Array(VALUE_SIZE);
  readonly #view = new DataView(this.#value.buffer);
  readonly #encoder = new TextEncoder();

  private constructor(map: BpfMapFd) {
    this.#map = map;
  }

  /**
   * Opens the map pinned at `path`, or creates and pins it. A pin of another layout or size is
   * replaced (logged): processes still holding the old map keep it until they restart.
   */
  static open(path: string, maxEntries: number, log: DnsLog): PinnedStore {
    for (let attempt = 0;; attempt++) {
      let existing: BpfMapFd | null = null;
      try {
        existing = BpfMapFd.openPinned(path);
      } catch (e) {
        if (!(e instanceof BpfError && e.errno === Errno.ENOENT)) throw e; // create below
      }
      if (existing) {
        const i = existing.info;
        if (
          i.type === BpfMapType.LRU_HASH && i.keySize === KEY_SIZE && i.valueSize === VALUE_SIZE &&
          i.maxEntries === maxEntries
        ) {
          log("info", `DNS cache: using the pinned map ${path} (id ${i.id})`);
          return new PinnedStore(existing);
        }
        existing.close();
        log(
          "warning",
          `DNS cache: replacing the pinned map ${path} (type ${i.type}, key ${i.keySize} B, ` +
            `value ${i.valueSize} B, ${i.maxEntries} entries; want type ${BpfMapType.LRU_HASH}, ` +
            `key ${KEY_SIZE} B, value ${VALUE_SIZE} B, ${maxEntries} entries); running proxies ` +
            `keep the old one until restarted`,
        );
        Deno.removeSync(path);
      }
      const map = createMap(maxEntries, log);
      try {
        map.pin(path);
      } catch (e) {
        map.close();
        // another process pinned its map in between: use that one
        if (e instanceof BpfError && e.errno === Errno.EEXIST && attempt < 2) continue;
        throw e;
      }
      log(
        "info",
        `DNS cache: created and pinned ${path} (id ${map.info.id}, ${maxEntries} entries)`,
      );
      return new PinnedStore(map);
    }
  }

  #setKey(name: string): void {
    this.#key.fill(0);
    this.#encoder.encodeInto(name, this.#key);
  }

  get(name: string): DnsCacheEntry | null {
    this.#setKey(name);
    if (!this.#map.lookup(this.#key, this.#value)) return null;
    const v = this.#view;
    const flags = v.getUint32(V_FLAGS, true);
    const n4 = Math.min(this.#value[V_COUNT4], MAX_ADDRS_PER_FAMILY);
    const n6 = Math.min(this.#value[V_COUNT6], MAX_ADDRS_PER_FAMILY);
    const v4: string[] = [];
    for (let i = 0; i < n4; i++) {
      v4.push(this.#value.subarray(V_IPV4 + 4 * i, V_IPV4 + 4 * i + 4).join("."));
    }
    const v6: string[] = [];
    for (let i = 0; i < n6; i++) {
      v6.push(formatIpv6(this.#value.subarray(V_IPV6 + 16 * i, V_IPV6 + 16 * i + 16)));
    }
    return {
      expiresAtMs: Number(v.getBigUint64(V_EXPIRES, true)),
      resolvedAtMs: Number(v.getBigUint64(V_RESOLVED, true)),
      negative: flags & FLAG_NOT_FOUND ? "not_found" : flags & FLAG_NO_DATA ? "no_data" : null,
      v4,
      v6,
    };
  }

  set(name: string, entry: DnsCacheEntry): void {
    this.#setKey(name);
    const value = this.#value;
    value.fill(0);
    const v = this.#view;
    v.setBigUint64(V_EXPIRES, BigInt(Math.floor(entry.expiresAtMs)), true);
    v.setBigUint64(V_RESOLVED, BigInt(Math.floor(entry.resolvedAtMs)), true);
    v.setUint32(
      V_FLAGS,
      entry.negative === "not_found"
        ? FLAG_NOT_FOUND
        : entry.negative === "no_data"
        ? FLAG_NO_DATA
        : 0,
      true,
    );
    let n4 = 0;
    for (const ip of entry.v4) {
      if (n4 === MAX_ADDRS_PER_FAMILY) break;
      const bytes = parseIpv4(ip);
      if (bytes) value.set(bytes, V_IPV4 + 4 * n4++);
    }
    let n6 = 0;
    for (const ip of entry.v6) {
      if (n6 === MAX_ADDRS_PER_FAMILY) break;
      const bytes = parseIpv6(ip);
      if (bytes) value.set(bytes, V_IPV6 + 16 * n6++);
    }
    value[V_COUNT4] = n4;
    value[V_COUNT6] = n6;
    this.#map.update(this.#key, value);
  }

  close(): void {
    this.#map.close();
  }
}

function createMap(maxEntries: number, log: DnsLog): BpfMapFd {
  const base = {
    type: BpfMapType.LRU_HASH,
    name: MAP_NAME,
    keySize: KEY_SIZE,
    valueSize: VALUE_SIZE,
    maxEntries,
  };
  // With BTF, bpftool prints names and fields; without (no kernel BTF support), hex bytes.
  try {
    using btf = new BtfBuilder();
    const ids = buildBtf(btf);
    const fd = btf.load();
    return BpfMapFd.create({ ...base, btf: { fd, ...ids } });
  } catch (e) {
    log("debug", `DNS cache: map without BTF (${(e as Error).message})`);
  }
  return BpfMapFd.create(base);
}

/** Wraps a pinned-map failure in the loader's error convention (cause + fix). */
function pinnedError(path: string, e: unknown): KernelAccelError {
  if (e instanceof KernelAccelError) return e;
  const msg = (e as Error).message;
  if (e instanceof BpfError && e.op.startsWith("dlopen")) {
    return new KernelAccelError(
      "no_libbpf",
      msg,
      "install libbpf 1.x (Debian: apt-get install -y libbpf1)",
      { cause: e },
    );
  }
  if (e instanceof BpfError && (e.errno === Errno.EPERM || e.errno === Errno.EACCES)) {
    return new KernelAccelError(
      "not_root",
      `not permitted to create or open the pinned DNS cache ${path}: ${msg}`,
      "run as root (or with CAP_BPF), or set ebpf.dns_cache_enabled to false",
      { cause: e },
    );
  }
  return new KernelAccelError(
    "dns_cache_failed",
    `cannot open the pinned DNS cache ${path}: ${msg}`,
    "check that a bpffs is mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf), " +
      "or set ebpf.dns_cache_enabled to false",
    { cause: e },
  );
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
    if (!Number.isInteger(maxEntries) || maxEntries < 1 || maxEntries > 0x7fffffff) {
      throw new RangeError(`maxEntries must be a positive integer (got ${maxEntries})`);
    }
    let store: CacheStore;
    if (options.pinned) {
      const path = options.pinned.path;
      try {
        libbpf();
        const dir = path.slice(0, path.lastIndexOf("/")) || "/";
        Deno.mkdirSync(dir, { recursive: true });
        // /sys/fs/bpf is world-writable: do not share a dir another user prepared
        const owner = Deno.statSync(dir).uid;
        if (owner !== null && owner !== Deno.uid()) {
          throw new KernelAccelError(
            "pin_dir_foreign",
            `the DNS cache pin dir ${dir} belongs to uid ${owner}, not to this process`,
            `remove ${dir} (another user may have created it) or set ebpf.dns_cache_enabled to false`,
          );
        }
        store = PinnedStore.open(path, maxEntries, log);
      } catch (e) {
        throw pinnedError(path, e);
      }
    } else {
      store = new MemoryStore(maxEntries);
    }
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
