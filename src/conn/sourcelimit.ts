/**
 * Per-source limits, checked at accept before a byte is read: live connections from one
 * client address, and new connections from it over time (a token bucket: `burst` at once, then
 * `newPerSecond`). One entry per address with live connections or a bucket still refilling;
 * idle entries are swept, so a scan of many addresses leaves nothing behind.
 *
 * @module
 */
import type { Config } from "../config/mod.ts";

/** The `limits.per_source` settings; null fields do not limit. */
export type SourceLimits = NonNullable<Config["limits"]["perSource"]>;

/** Why a source was refused (the access log's close reason). */
export type SourceRefusal = "source_connections" | "source_rate";

interface Entry {
  active: number;
  /** Tokens in the bucket at `at`. */
  tokens: number;
  /** When `tokens` was counted (performance.now() ms). */
  at: number;
}

/** How often idle entries are swept. */
const SWEEP_MS = 10_000;

/** Live counts and buckets of the sources seen, kept across reloads (the limits may change). */
export class SourceLimiter {
  readonly #entries = new Map<string, Entry>();
  #sweeper: ReturnType<typeof setInterval> | undefined;
  /** The limits of the last admit (for the sweep). */
  #limits: SourceLimits | null = null;

  /** Sources tracked now. */
  get size(): number {
    return this.#entries.size;
  }

  /**
   * Counts a new connection from `ip` under `limits` and returns null, or returns why it is
   * refused (then nothing is counted). An admitted connection must be {@link release}d.
   */
  admit(ip: string, limits: SourceLimits, now = performance.now()): SourceRefusal | null {
    this.#limits = limits;
    let e = this.#entries.get(ip);
    if (!e) {
      e = { active: 0, tokens: limits.burst, at: now };
      this.#entries.set(ip, e);
      this.#sweeper ??= this.#startSweeping();
    }
    if (limits.maxConnections !== null && e.active >= limits.maxConnections) {
      return "source_connections";
    }
    if (limits.newPerSecond !== null) {
      e.tokens = Math.min(limits.burst, e.tokens + (now - e.at) * limits.newPerSecond / 1000);
      e.at = now;
      if (e.tokens < 1) return "source_rate";
      e.tokens -= 1;
    }
    e.active++;
    return null;
  }

  /** A connection admitted for `ip` ended. */
  release(ip: string): void {
    const e = this.#entries.get(ip);
    if (!e) return;
    e.active--;
    if (e.active <= 0 && this.#limits?.newPerSecond == null) this.#entries.delete(ip);
  }

  /** Drops entries with no live connection and a full bucket; stops when none are left. */
  sweep(now = performance.now()): void {
    const limits = this.#limits;
    for (const [ip, e] of this.#entries) {
      if (e.active > 0) continue;
      const refilled = !limits?.newPerSecond ||
        e.tokens + (now - e.at) * limits.newPerSecond / 1000 >= limits.burst;
      if (refilled) this.#entries.delete(ip);
    }
    if (this.#entries.size === 0) this.close();
  }

  /** Stops the sweeping (the proxy stops); entries are kept. */
  close(): void {
    clearInterval(this.#sweeper);
    this.#sweeper = undefined;
  }

  #startSweeping(): ReturnType<typeof setInterval> {
    const timer = setInterval(() => this.sweep(), SWEEP_MS);
    Deno.unrefTimer(timer);
    return timer;
  }
}
