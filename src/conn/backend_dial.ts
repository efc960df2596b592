/**
 * Connecting a session to a backend of its route: backends are tried until one connects (a
 * failed one is marked by passive health and skipped); a backend's name is resolved and its
 * addresses the dial guard allows are tried in turn, all within one `connect_ms` budget.
 *
 * @module
 */
import type { Backend, BackendPool } from "../route/backend.ts";
import {
  AddressDeniedError,
  type DeniedAddress,
  type DialGuard,
  type InternalPolicy,
} from "../route/dialguard.ts";
import { type FdBudget, localResourceError, localResourceHint } from "./fdbudget.ts";
import { BurstLog, logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { errText } from "../ops/errtext.ts";
import type { Refusal } from "../proto/protocol.ts";
import type { HostResolver } from "../dns/resolver.ts";
import type { CloseReason } from "./conn_record.ts";
import { connected, connectTcp, type TcpSocket } from "../io/tcp.ts";
import { eventLoop } from "../io/loop.ts";

const log = logger("session");
/** Warnings that can come once per connection: logged once per burst. */
const bursts = new BurstLog(log);

/** What dialling a backend for one session needs. */
export interface DialOptions {
  /** The name the client asked for: what a dynamic (`$sni`) backend is dialled by. */
  name: string | null;
  /** The client's IP address (balancing by source). */
  clientIp: string;
  /** The client, for log lines. */
  clientAddr: string;
  /** `timeouts.connect_ms`: the budget of one backend's connect, its name's resolution included. */
  connectMs: number;
  /** Resolves a backend's host. */
  resolver: HostResolver;
  /** Which resolved addresses may be dialled. */
  guard: DialGuard;
  metrics: Metrics;
  /** Told about each backend socket opened, or null. */
  fds: FdBudget | null;
  /** Aborted when the session is stopped: the connect in progress is given up. */
  signal: AbortSignal;
  /** Told each backend as it is tried: as dialled (for the access log) and as configured. */
  onTry(dialled: string, configured: string): void;
}

/** Why no backend was connected: the reason for the access log, what the client is told. */
export interface DialFailure {
  kind: "failed";
  reason: Extract<
    CloseReason,
    "backend_full" | "no_backend" | "address_denied" | "connect_failed" | "resource_exhausted"
  >;
  /** What the client is sent before it is closed; null: it is closed without a word. */
  refusal: Refusal | null;
  /** The last connect's error, or null. */
  error: unknown;
}

/** How dialling ended: connected, failed, or stopped with the session. */
export type DialResult =
  | {
    kind: "connected";
    conn: TcpSocket;
    /** The backend connected to; its `active` count is the caller's to decrement. */
    backend: Backend;
    /** How long the connect took. */
    seconds: number;
  }
  | DialFailure
  | { kind: "stopped"; error: unknown };

/** Tries the backends of `pool` until one connects, or none is left to try. */
export async function dialBackend(pool: BackendPool, o: DialOptions): Promise<DialResult> {
  const tried = new Set<Backend>();
  let error: unknown = null;
  for (;;) {
    const b = pool.pick(o.clientIp, tried);
    if (!b) return noBackendLeft(pool, tried, error, o.clientAddr);
    tried.add(b);
    b.active++;
    const host = b.address.dynamic ? o.name! : b.address.host;
    const dialled = b.address.dynamic ? `${host}:${b.address.port}` : b.address.text;
    o.onTry(dialled, b.address.text);
    try {
      const policy = b.address.dynamic ? pool.internal : null;
      const t = performance.now();
      const conn = await connect(host, b.address.port, policy, o);
      const seconds = (performance.now() - t) / 1000;
      o.fds?.backendOpened();
      pool.connected(b);
      return { kind: "connected", conn, backend: b, seconds };
    } catch (e) {
      b.active--;
      if (o.signal.aborted) return { kind: "stopped", error };
      error = e;
      if (e instanceof AddressDeniedError) {
        // not the backend's failure: its health is untouched; the next backend may do
        logDenied(pool, e.denied[0], dialled, o.clientAddr);
        continue;
      }
      const lacking = localResourceError(e);
      if (lacking) {
        // this host is out of descriptors, ports or memory: no backend is to blame
        Metrics.bump(o.metrics.localErrors, `connect:${lacking}`);
        bursts.warn(
          `local:${lacking}`,
          `connect to ${dialled} for ${o.clientAddr} failed for lack of a local ` +
            `resource (${errText(e)}); the backend is not marked down. ` +
            localResourceHint(lacking),
        );
        return { kind: "failed", reason: "resource_exhausted", refusal: "unavailable", error };
      }
      o.metrics.connectFailures++;
      log.warn(`connect to ${dialled} failed for ${o.clientAddr}: ${errText(e)}`);
      if (!b.address.dynamic) pool.connectFailed(b, errText(e));
    }
  }
}

/** Why no backend of `pool` is left to try, after `tried`; `error`: the last connect's. */
function noBackendLeft(
  pool: BackendPool,
  tried: Set<Backend>,
  error: unknown,
  clientAddr: string,
): DialFailure {
  if (pool.allFull(tried)) {
    bursts.warn(
      `full:${pool.name}`,
      `every backend of route "${pool.name}" that is up is at its max_connections: ` +
        `refusing ${clientAddr}`,
    );
    return { kind: "failed", reason: "backend_full", refusal: "unavailable", error };
  }
  if (tried.size === 0) {
    log.warn(`all backends of route "${pool.name}" are down: refusing ${clientAddr}`);
    return { kind: "failed", reason: "no_backend", refusal: "unavailable", error };
  }
  if (error instanceof AddressDeniedError) {
    return { kind: "failed", reason: "address_denied", refusal: "misdirected", error };
  }
  return { kind: "failed", reason: "connect_failed", refusal: null, error };
}

/** Logs, once per burst of its route and kind, that a backend address was refused. */
function logDenied(
  pool: BackendPool,
  first: DeniedAddress,
  dialled: string,
  clientAddr: string,
): void {
  const { address, kind } = first;
  const policy = pool.internal;
  const why = kind === "own_listener"
    ? "is one of this proxy's own listening sockets (a loop)"
    : `is a ${kind.replace("_", "-")} address` + (policy
      ? `, which the route does not allow (set ${policy.path}.allow_private, or list the ` +
        `address in ${policy.path}.allow_addresses, to allow it)`
      : "");
  bursts.warn(
    `denied:${pool.name}:${kind}`,
    `route "${pool.name}": refusing ${dialled} for ${clientAddr}: ${address} ${why}`,
  );
}

/**
 * Connects to `host:port`, trying each resolved address the guard allows within one
 * connect_ms budget. `policy`: the route's opt-in to internal addresses, for a dynamic backend.
 * @throws {AddressDeniedError} when the guard allows none of them.
 */
async function connect(
  host: string,
  port: number,
  policy: InternalPolicy | null,
  o: DialOptions,
): Promise<TcpSocket> {
  // one controller per attempt, aborted by its deadline or by the session's stop; the timer
  // is cleared once connected so no per-connection timer outlives the connect, and a timed-out
  // attempt leaves the next backend's attempt unaborted
  const abort = new AbortController();
  const onStop = () => abort.abort();
  o.signal.addEventListener("abort", onStop, { once: true });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    abort.abort();
  }, o.connectMs);
  try {
    const resolved = await abortable(o.resolver.resolve(host), abort.signal);
    const addresses = dialable(host, port, resolved, policy, o);
    let lastError: unknown = null;
    for (const hostname of addresses) {
      if (abort.signal.aborted) break;
      let sock: TcpSocket | null = null;
      try {
        sock = connectTcp(eventLoop(), hostname, port);
        await abortable(connected(sock), abort.signal);
        return sock;
      } catch (e) {
        sock?.close();
        lastError = e;
      }
    }
    throw lastError ?? new Error("connect aborted");
  } catch (e) {
    if (timedOut) throw new Error(`timed out after ${o.connectMs} ms`);
    throw e;
  } finally {
    clearTimeout(timer);
    o.signal.removeEventListener("abort", onStop);
  }
}

/** The addresses of `host` the guard lets this session dial; each refused one is counted. */
function dialable(
  host: string,
  port: number,
  addresses: string[],
  policy: InternalPolicy | null,
  o: DialOptions,
): string[] {
  const denied: DeniedAddress[] = [];
  const allowed = addresses.filter((address) => {
    const kind = o.guard.check(address, port, policy);
    if (kind === null) return true;
    denied.push({ address, kind });
    Metrics.bump(o.metrics.addressDenied, kind);
    return false;
  });
  if (denied.length === 0) return allowed;
  if (allowed.length === 0) throw new AddressDeniedError(host, port, denied);
  const skipped = denied.map((d) => `${d.address} (${d.kind})`).join(", ");
  log.debug(`${o.clientAddr}: ${host}: not dialling ${skipped}`);
  return allowed;
}

/** `p`, or its rejection with the signal's reason once `signal` aborts. */
function abortable<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason);
  return new Promise((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}
