/**
 * Gives memory back to the system once a burst of connections is over. V8 runs a full garbage
 * collection only when its old generation reaches its limit, so the garbage of a burst (tens of
 * MB after 10,000 short connections) stays in the heap while the process is quiet, and glibc keeps
 * the freed ArrayBuffer and FFI memory in its arenas. After a burst (socket events, then
 * {@link MemoryReleaseOptions.quietMs} without any) that grew the process's RSS, one full
 * collection and `malloc_trim(0)` return both; the same once after start, whose module loading
 * leaves several MB of garbage.
 *
 * Cost: one full collection (a few ms per 10 MB of live heap) and a trim per burst, never while
 * events flow; a check per second (a counter read) otherwise.
 *
 * @module
 */
import { libc } from "../../ffi/libc.ts";

/** When to release. */
export interface MemoryReleaseOptions {
  /** A number that changes while the process works (socket events served). */
  activity: () => number;
  /** How long the activity must have stood still (ms). */
  quietMs: number;
  /** Release only when the RSS grew by this share since the last release (0.05: 5 %). */
  minGrowth: number;
  /** How often to look (ms). */
  checkMs: number;
}

/** The defaults: a burst is over after 3 s without events; 5 % of RSS is worth a release. */
export const MEMORY_RELEASE_DEFAULTS: Omit<MemoryReleaseOptions, "activity"> = {
  quietMs: 3000,
  minGrowth: 0.05,
  checkMs: 1000,
};

/** A full collection of the V8 heap, or null when the runtime offers none. */
type FullGc = () => void;

let fullGc: FullGc | null | undefined;

/**
 * The isolate's full collection: V8's `gc` from a fresh context once `--expose-gc` is set
 * (node:v8, node:vm), else the global `gc` of a process started with it. The fresh context's
 * collection gives the heap's pages back; measured, the global one (with the flag given at start)
 * left 45 MB of an emptied 119 MB heap mapped.
 */
async function findGc(): Promise<FullGc | null> {
  try {
    const v8 = await import("node:v8");
    const vm = await import("node:vm");
    v8.setFlagsFromString("--expose-gc");
    const gc = vm.runInNewContext("gc");
    if (typeof gc === "function") return gc as FullGc;
  } catch {
    // no node compatibility layer: the global one, if any
  }
  const exposed = (globalThis as { gc?: FullGc }).gc;
  return typeof exposed === "function" ? exposed : null;
}

/**
 * One full collection, then glibc's arenas trimmed (free pages handed back, also those between
 * live chunks). Returns what it did.
 */
export async function releaseMemory(): Promise<{ gc: boolean; trimmed: boolean }> {
  if (fullGc === undefined) fullGc = await findGc();
  fullGc?.();
  let trimmed = false;
  try {
    trimmed = libc().malloc_trim(0n) === 1;
  } catch {
    // not glibc: nothing to trim
  }
  return { gc: fullGc !== null, trimmed };
}

/** The process's resident set size in bytes. */
function rss(): number {
  return Deno.memoryUsage().rss;
}

/** Watches the activity and releases memory after each burst that grew the RSS. */
export class MemoryReleaser {
  readonly #o: MemoryReleaseOptions;
  readonly #timer: ReturnType<typeof setInterval>;
  #seen: number;
  /** When the activity last changed (performance.now()). */
  #lastChange = performance.now();
  /** Work happened since the last release (true at start: module loading left garbage). */
  #dirty = true;
  /** RSS right after the last release (0: none yet). */
  #floor = 0;
  #releasing = false;
  /** Releases done (for tests and the log). */
  releases = 0;

  constructor(options: Partial<MemoryReleaseOptions> & Pick<MemoryReleaseOptions, "activity">) {
    this.#o = { ...MEMORY_RELEASE_DEFAULTS, ...options };
    this.#seen = this.#o.activity();
    this.#timer = setInterval(() => this.#check(), this.#o.checkMs);
    // never what keeps the process alive
    Deno.unrefTimer(this.#timer);
  }

  /** Stops watching. */
  close(): void {
    clearInterval(this.#timer);
  }

  #check(): void {
    const now = performance.now();
    const a = this.#o.activity();
    if (a !== this.#seen) {
      this.#seen = a;
      this.#lastChange = now;
      this.#dirty = true;
      return;
    }
    if (!this.#dirty || this.#releasing || now - this.#lastChange < this.#o.quietMs) return;
    this.#dirty = false;
    const before = rss();
    // a burst that left the RSS where it was needs no collection (e.g. a few connections)
    if (this.#floor > 0 && before < this.#floor * (1 + this.#o.minGrowth)) {
      this.#floor = Math.min(this.#floor, before);
      return;
    }
    this.#releasing = true;
    releaseMemory().then(() => {
      this.releases++;
      this.#floor = rss();
    }).finally(() => this.#releasing = false);
  }
}
