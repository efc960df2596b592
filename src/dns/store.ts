/**
 * Where the DNS cache keeps its answers: the entry, what a store does, and the in-process LRU
 * store (the pinned BPF map store is src/dns/pinned.ts).
 * @module
 */

/** Most addresses kept per family (more are dropped; the session tries them in order anyway). */
export const MAX_ADDRS_PER_FAMILY = 8;

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
export interface CacheStore {
  readonly kind: "memory" | "pinned";
  get(name: string): DnsCacheEntry | null;
  set(name: string, entry: DnsCacheEntry): void;
  close(): void;
}

/** In-process LRU: a Map in use order (a hit moves the name to the end). */
export class MemoryStore implements CacheStore {
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
