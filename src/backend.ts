/**
 * Backend pools: the backends of one route, their health, and how a connection picks one.
 *
 * Health is passive (consecutive connect failures mark a backend down for a back-off) and,
 * when configured, active (a TCP connect every interval; `fall` failures mark it down, `rise`
 * successes up again). Every balancing mode skips down backends.
 *
 * @module
 */
import type { BackendAddress, Balance, HealthConfig } from "./config.ts";
import type { InternalPolicy } from "./dialguard.ts";
import { localResourceError, localResourceHint } from "./fdbudget.ts";
import { BurstLog, logger } from "./log.ts";

const log = logger("backend");
const bursts = new BurstLog(log);

/** One backend with its live-connection count and health. */
export interface Backend {
  address: BackendAddress;
  active: number;
  /** Consecutive failed connects (passive) or checks (active). */
  failures: number;
  /** Consecutive good active checks while down. */
  successes: number;
  /** Down until this time (ms since epoch); 0 when up. Active checks keep it down until `rise`. */
  downUntil: number;
  /** Taken out of rotation by the admin API (see src/admin.ts) until the next reload; or null. */
  held: "drained" | "disabled" | null;
}

/** The backends of one route, with the route's balancing mode and health settings. */
export class BackendPool {
  readonly backends: Backend[];
  readonly balance: Balance;
  /** PROXY protocol version to send to these backends, or null. */
  readonly proxyProtocol: "v1" | "v2" | null;
  /** For log lines: the route's `match`. */
  readonly name: string;
  /** For dynamic backends: the internal addresses they may be dialled at (see dialguard.ts). */
  readonly internal: InternalPolicy | null;
  readonly #health: HealthConfig;
  #next = 0;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #stopped = false;

  constructor(
    name: string,
    addresses: BackendAddress[],
    balance: Balance,
    proxyProtocol: "v1" | "v2" | null = null,
    health: HealthConfig = { maxFails: 3, failTimeoutMs: 10_000, active: null },
    internal: InternalPolicy | null = null,
  ) {
    this.name = name;
    this.internal = internal;
    this.backends = addresses.map((address) => ({
      address,
      active: 0,
      failures: 0,
      successes: 0,
      downUntil: 0,
      held: null,
    }));
    this.balance = balance;
    this.proxyProtocol = proxyProtocol;
    this.#health = health;
  }

  /** Whether `b` may be picked now. */
  isUp(b: Backend, now = Date.now()): boolean {
    return b.downUntil <= now;
  }

  /**
   * Picks an up backend for a client at `clientIp`, skipping `exclude` (backends this
   * connection already failed on); null when every backend is down.
   */
  pick(clientIp: string, exclude?: ReadonlySet<Backend>): Backend | null {
    const list = this.backends;
    const now = Date.now();
    const usable = (b: Backend) => !b.held && this.isUp(b, now) && !exclude?.has(b);
    switch (this.balance) {
      case "random": {
        const up = list.filter(usable);
        return up.length ? up[Math.floor(Math.random() * up.length)] : null;
      }
      case "least_conn": {
        // start after the last pick so ties rotate instead of piling on the first backend
        let best: Backend | null = null;
        for (let i = 0; i < list.length; i++) {
          const b = list[(this.#next + i) % list.length];
          if (usable(b) && (!best || b.active < best.active)) best = b;
        }
        if (best) this.#next = (list.indexOf(best) + 1) % list.length;
        return best;
      }
      case "source_hash": {
        // walk on from the hashed slot, so a down backend's clients spread and others stay put
        const start = fnv1a(clientIp) % list.length;
        for (let i = 0; i < list.length; i++) {
          const b = list[(start + i) % list.length];
          if (usable(b)) return b;
        }
        return null;
      }
      default:
        for (let i = 0; i < list.length; i++) {
          const b = list[this.#next++ % list.length];
          if (usable(b)) return b;
        }
        return null;
    }
  }

  /** A connect to `b` succeeded. */
  connected(b: Backend): void {
    b.failures = 0;
  }

  /** A connect to `b` failed: after max_fails in a row it is down for fail_timeout_ms. */
  connectFailed(b: Backend, reason: string): void {
    b.failures++;
    if (b.failures >= this.#health.maxFails && this.isUp(b)) {
      b.downUntil = Date.now() + this.#health.failTimeoutMs;
      log.warn(
        `backend ${b.address.text} of route "${this.name}" down for ` +
          `${this.#health.failTimeoutMs} ms after ${b.failures} failed connects (${reason})`,
      );
    }
  }

  /** Starts active checks, if configured. */
  startChecks(): void {
    const active = this.#health.active;
    if (!active || this.#stopped) return;
    const round = async () => {
      await Promise.all(this.backends.map((b) => this.#check(b, active.timeoutMs)));
      if (!this.#stopped) this.#timer = setTimeout(round, active.intervalMs);
    };
    this.#timer = setTimeout(round, 0);
  }

  /** Stops active checks (the pool's table was replaced or the proxy stops). */
  stopChecks(): void {
    this.#stopped = true;
    clearTimeout(this.#timer);
  }

  async #check(b: Backend, timeoutMs: number): Promise<void> {
    const active = this.#health.active!;
    if (b.address.dynamic) return;
    let ok = false;
    let why = "";
    try {
      const conn = await Deno.connect({
        hostname: b.address.host,
        port: b.address.port,
        signal: AbortSignal.timeout(timeoutMs),
      });
      conn.close();
      ok = true;
    } catch (e) {
      why = e instanceof Error ? e.message : String(e);
      const lacking = localResourceError(e);
      if (lacking) {
        // this host's shortage says nothing about the backend: the check does not count
        bursts.warn(
          `check:${lacking}`,
          `health check of ${b.address.text} skipped: ${why}. ${localResourceHint(lacking)}`,
        );
        return;
      }
    }
    if (this.#stopped) return;
    const wasUp = this.isUp(b);
    if (ok) {
      b.failures = 0;
      if (!wasUp && ++b.successes >= active.rise) {
        b.downUntil = 0;
        b.successes = 0;
        log.info(
          `backend ${b.address.text} of route "${this.name}" up (${active.rise} good checks)`,
        );
      }
    } else {
      b.successes = 0;
      if (wasUp && ++b.failures >= active.fall) {
        // down until enough good checks bring it back
        b.downUntil = Number.MAX_SAFE_INTEGER;
        log.warn(
          `backend ${b.address.text} of route "${this.name}" down: ${active.fall} failed checks (${why})`,
        );
      }
    }
  }
}

/** 32-bit FNV-1a: stable across restarts, so a client keeps its backend. */
function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}
