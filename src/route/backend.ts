/**
 * Backend pools: the backends of one route, their health, and how a connection picks one.
 *
 * Health is passive (consecutive connect failures mark a backend down for a back-off) and,
 * when configured, active (a TCP connect every interval; `fall` failures mark it down, `rise`
 * successes up again). Every balancing mode skips down backends and full ones (at their
 * `max_connections`), weighs the rest by `weight`, and turns to the backup backends only while
 * no primary one is up.
 *
 * @module
 */
import type { BackendAddress, Balance, HealthConfig, RouteBackend } from "../config/mod.ts";
import { DEFAULT_HEALTH } from "../config/mod.ts";
import type { InternalPolicy } from "./dialguard.ts";
import type { FingerprintPatterns } from "../proto/fingerprint.ts";
import { localResourceError, localResourceHint } from "../conn/fdbudget.ts";
import type { ProxyTlv } from "../proto/proxyproto.ts";
import { BurstLog, logger } from "../ops/log.ts";

const log = logger("backend");
const bursts = new BurstLog(log);

/** One backend with its live-connection count and health. */
export interface Backend {
  address: BackendAddress;
  /** Its weight in force: the config's, or the admin API's until the next reload. */
  weight: number;
  /** Its weight in the config. */
  readonly configWeight: number;
  backup: boolean;
  /** Live connections it takes at most; 0: no limit. */
  maxConnections: number;
  active: number;
  /** Smooth weighted round robin: its running score. */
  current: number;
  /** source_hash: a hash of its address, mixed with the client's. */
  seed: number;
  /** Consecutive failed connects (passive) or checks (active). */
  failures: number;
  /** Consecutive good active checks while down. */
  successes: number;
  /** Down until this time (ms since epoch); 0 when up. Active checks keep it down until `rise`. */
  downUntil: number;
  /** Taken out of rotation by the admin API (see src/ops/admin.ts) until the next reload; or null. */
  held: "drained" | "disabled" | null;
}

/** What a pool takes from its route besides the backends and the balancing mode. */
export interface PoolOptions {
  /** PROXY protocol version to send to the backends (default none). */
  proxyProtocol?: "v1" | "v2" | null;
  /** The v2 TLVs to add to the header (default none). */
  proxyTlvs?: readonly ProxyTlv[];
  health?: HealthConfig;
  /** For dynamic backends: the internal addresses they may be dialled at. */
  internal?: InternalPolicy | null;
  /** Processes sharing each backend's `max_connections` (each gets its share); default 1. */
  workers?: number;
  /** The route's refused TLS fingerprints. */
  denyFingerprints?: FingerprintPatterns | null;
}

/** The backends of one route, with the route's balancing mode and health settings. */
export class BackendPool {
  readonly backends: Backend[];
  readonly balance: Balance;
  /** PROXY protocol version to send to these backends, or null. */
  readonly proxyProtocol: "v1" | "v2" | null;
  /** The TLVs of a v2 header ([] for none). */
  readonly proxyTlvs: readonly ProxyTlv[];
  /** For log lines: the route's `match`. */
  readonly name: string;
  /** For dynamic backends: the internal addresses they may be dialled at (see dialguard.ts). */
  readonly internal: InternalPolicy | null;
  /** The route's refused TLS fingerprints, or null. */
  readonly denyFingerprints: FingerprintPatterns | null;
  readonly #health: HealthConfig;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #stopped = false;

  /** `addresses`: the route's backends; a plain address is a primary of weight 1 without limit. */
  constructor(
    name: string,
    addresses: (BackendAddress & Partial<RouteBackend>)[],
    balance: Balance,
    options: PoolOptions = {},
  ) {
    const workers = options.workers ?? 1;
    this.name = name;
    this.internal = options.internal ?? null;
    this.denyFingerprints = options.denyFingerprints ?? null;
    this.proxyTlvs = options.proxyTlvs ?? [];
    this.backends = addresses.map((address) => ({
      address,
      weight: address.weight ?? 1,
      configWeight: address.weight ?? 1,
      backup: address.backup ?? false,
      maxConnections: address.maxConnections ? Math.ceil(address.maxConnections / workers) : 0,
      active: 0,
      current: 0,
      seed: fnv1a(address.text),
      failures: 0,
      successes: 0,
      downUntil: 0,
      held: null,
    }));
    this.balance = balance;
    this.proxyProtocol = options.proxyProtocol ?? null;
    this.#health = options.health ?? DEFAULT_HEALTH;
  }

  /** Whether `b` may be picked now. */
  isUp(b: Backend, now = Date.now()): boolean {
    return b.downUntil <= now;
  }

  /** Whether `b` is at its `max_connections`. */
  isFull(b: Backend): boolean {
    return b.maxConnections > 0 && b.active >= b.maxConnections;
  }

  /**
   * Picks a backend for a client at `clientIp`, skipping `exclude` (backends this connection
   * already failed on): among the primaries that are up and not excluded or, when there are
   * none, among such backups; full ones are skipped, the rest weighed by `weight`. Null when
   * there is none to pick ({@link allFull} says whether for being full).
   */
  pick(clientIp: string, exclude?: ReadonlySet<Backend>): Backend | null {
    const now = Date.now();
    const backup = !this.backends.some((b) =>
      !b.backup && !b.held && this.isUp(b, now) && !exclude?.has(b)
    );
    return this.#pickIn(backup, clientIp, now, exclude);
  }

  /**
   * Whether {@link pick} found nothing only because every candidate (up, not excluded, of the
   * tier in use) is full. Called on the refusal path only.
   */
  allFull(exclude?: ReadonlySet<Backend>): boolean {
    const now = Date.now();
    const open = (b: Backend) => !b.held && this.isUp(b, now) && !exclude?.has(b);
    const tier = this.backends.some((b) => !b.backup && open(b))
      ? this.backends.filter((b) => !b.backup && open(b))
      : this.backends.filter((b) => b.backup && open(b));
    return tier.length > 0 && tier.every((b) => this.isFull(b));
  }

  #pickIn(
    backup: boolean,
    clientIp: string,
    now: number,
    exclude?: ReadonlySet<Backend>,
  ): Backend | null {
    const list = this.backends;
    const usable = (b: Backend) =>
      b.backup === backup && !b.held && this.isUp(b, now) && !exclude?.has(b) && !this.isFull(b);
    switch (this.balance) {
      case "random": {
        let total = 0;
        for (const b of list) if (usable(b)) total += b.weight;
        let r = Math.random() * total;
        let last: Backend | null = null;
        for (const b of list) {
          if (!usable(b)) continue;
          last = b;
          if ((r -= b.weight) < 0) return b;
        }
        return last;
      }
      case "least_conn": {
        // fewest live connections per unit of weight; ties (idle backends) share by weight
        let best: Backend | null = null;
        for (const b of list) {
          if (usable(b) && (!best || b.active * best.weight < best.active * b.weight)) best = b;
        }
        if (!best) return null;
        const [active, weight] = [best.active, best.weight];
        return smoothPick(list, (b) => usable(b) && b.active * weight === active * b.weight);
      }
      case "source_hash": {
        // weighted rendezvous hashing: each client ranks the backends by its own hash of
        // them, so a backend that goes away moves only its clients, and the rest stay put
        const h = fnv1a(clientIp);
        let best: Backend | null = null;
        let bestScore = -Infinity;
        for (const b of list) {
          if (!usable(b)) continue;
          const u = (mix32(h ^ b.seed) + 1) / 4294967297; // in (0, 1)
          const score = b.weight / -Math.log(u);
          if (score > bestScore) [best, bestScore] = [b, score];
        }
        return best;
      }
      default:
        return smoothPick(list, usable);
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

/**
 * Smooth weighted round robin (as nginx's): every candidate gains its weight, the leader is
 * picked and pays the candidates' total back, so picks interleave in weight proportion.
 */
function smoothPick(list: Backend[], candidate: (b: Backend) => boolean): Backend | null {
  let best: Backend | null = null;
  let total = 0;
  for (const b of list) {
    if (!candidate(b)) continue;
    b.current += b.weight;
    total += b.weight;
    if (!best || b.current > best.current) best = b;
  }
  if (best) best.current -= total;
  return best;
}

/** A 32-bit integer finalizer (murmur3's): spreads a hash over all 32 bits. */
function mix32(x: number): number {
  x ^= x >>> 16;
  x = Math.imul(x, 0x85ebca6b);
  x ^= x >>> 13;
  x = Math.imul(x, 0xc2b2ae35);
  x ^= x >>> 16;
  return x >>> 0;
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
