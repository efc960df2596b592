/**
 * Connecting a session to a backend of its route: backends are tried until one connects (a
 * failed one is marked by passive health and skipped); a backend's name is resolved and its
 * addresses the dial guard allows are tried in turn, all within one `connect_ms` budget. No
 * promise, timer or abort signal of its own per connection: socket events and a shared deadline
 * queue drive it.
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
import { connectOutcome, connectTcp, type TcpSocket } from "../io/tcp.ts";
import { eventLoop } from "../io/loop.ts";
import { type Deadline, deadline } from "../io/deadlines.ts";
import { isIpAddress } from "../net/ip.ts";

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

/**
 * A dial: {@link start} it once the caller holds it (its callback may come at once, e.g. when
 * no backend is up); {@link stop} gives it up (its callback then gets `stopped`).
 */
export interface Dialling {
  start(): void;
  stop(): void;
}

/**
 * Tries the backends of `pool` until one connects, or none is left to try; `done` is called
 * once with the result, from {@link Dialling.start} on. Event-driven on the socket engine: an IP-literal backend is connected
 * with no promise and no timer of its own (the connect_ms deadline shares one timer with every
 * other session's, see src/io/deadlines.ts).
 */
export function dialBackend(
  pool: BackendPool,
  o: DialOptions,
  done: (r: DialResult) => void,
): Dialling {
  return new Dial(pool, o, done);
}

/** One session's dial: backend after backend, each address of one in turn. */
class Dial implements Dialling {
  readonly #pool: BackendPool;
  readonly #o: DialOptions;
  readonly #done: (r: DialResult) => void;
  readonly #tried = new Set<Backend>();
  /** The backend being tried, and how it is dialled (for log lines). */
  #backend: Backend | null = null;
  #dialled = "";
  /** The attempt's addresses still to try, its socket, its deadline, its start. */
  #addresses: readonly string[] = [];
  /** The next of `#addresses` to dial (the list may be the resolver's: never changed). */
  #nextAddress = 0;
  #sock: TcpSocket | null = null;
  #deadline: Deadline | null = null;
  #t0 = 0;
  /** Bumped per attempt: a DNS answer for an attempt given up is ignored. */
  #attempt = 0;
  /** The last attempt's error. */
  #error: unknown = null;
  #ended = false;
  readonly #onIo = () => this.#check();

  constructor(pool: BackendPool, o: DialOptions, done: (r: DialResult) => void) {
    this.#pool = pool;
    this.#o = o;
    this.#done = done;
  }

  start(): void {
    this.next();
  }

  stop(): void {
    if (this.#ended) return;
    this.#giveUp();
    this.#end({ kind: "stopped", error: this.#error });
  }

  /** Tries the next backend the pool picks, or ends when none is left. */
  next(): void {
    const o = this.#o;
    const b = this.#pool.pick(o.clientIp, this.#tried);
    if (!b) {
      this.#end(noBackendLeft(this.#pool, this.#tried, this.#error, o.clientAddr));
      return;
    }
    this.#tried.add(b);
    b.active++;
    this.#backend = b;
    const host = b.address.dynamic ? o.name! : b.address.host;
    this.#dialled = b.address.dynamic ? `${host}:${b.address.port}` : b.address.text;
    o.onTry(this.#dialled, b.address.text);
    const attempt = ++this.#attempt;
    this.#t0 = performance.now();
    this.#deadline = deadline(o.connectMs, () => {
      this.#failed(this.#giveUp(), new Error(`timed out after ${o.connectMs} ms`));
    });
    if (isIpAddress(host)) {
      this.#resolved(host, [host]);
      return;
    }
    o.resolver.resolve(host).then(
      (addresses) => {
        if (attempt === this.#attempt && !this.#ended) this.#resolved(host, addresses);
      },
      (e) => {
        if (attempt === this.#attempt && !this.#ended) this.#failed(this.#giveUp(), e);
      },
    );
  }

  /** The attempt's addresses are known: the guard filters them, the first is dialled. */
  #resolved(host: string, addresses: string[]): void {
    const b = this.#backend!;
    const policy = b.address.dynamic ? this.#pool.internal : null;
    try {
      this.#addresses = dialable(host, b.address.port, addresses, policy, this.#o);
      this.#nextAddress = 0;
    } catch (e) {
      this.#failed(this.#giveUp(), e);
      return;
    }
    this.#connectNext();
  }

  /** Connects the attempt's next address, or fails the attempt when none is left. */
  #connectNext(): void {
    const hostname = this.#addresses[this.#nextAddress++];
    if (hostname === undefined) {
      this.#failed(this.#giveUp(), this.#error ?? new Error("connect failed"));
      return;
    }
    try {
      this.#sock = connectTcp(eventLoop(), hostname, this.#backend!.address.port);
    } catch (e) {
      this.#error = e;
      this.#connectNext();
      return;
    }
    this.#sock.setHandler(this.#onIo);
    this.#check();
  }

  /** The socket's events: connected (room to write, no error), failed, or not yet. */
  #check(): void {
    const sock = this.#sock!;
    const outcome = connectOutcome(sock);
    if (outcome === true) {
      this.#connected(sock);
      return;
    }
    if (outcome === null) return;
    this.#error = outcome;
    sock.close();
    this.#sock = null;
    this.#connectNext();
  }

  #connected(sock: TcpSocket): void {
    sock.setHandler(null);
    this.#sock = null;
    this.#deadline?.cancel();
    this.#deadline = null;
    const b = this.#backend!;
    const seconds = (performance.now() - this.#t0) / 1000;
    this.#o.fds?.backendOpened();
    this.#pool.connected(b);
    this.#end({ kind: "connected", conn: sock, backend: b, seconds });
  }

  /**
   * Ends the attempt under way: its socket closed, its deadline cancelled, its backend no
   * longer counted as taken (returned).
   */
  #giveUp(): Backend | null {
    this.#attempt++;
    this.#deadline?.cancel();
    this.#deadline = null;
    this.#sock?.close();
    this.#sock = null;
    this.#addresses = [];
    const b = this.#backend;
    if (b) b.active--;
    this.#backend = null;
    return b;
  }

  /** Backend `b`'s attempt failed with `e`: the next one is tried, unless none is to blame. */
  #failed(b: Backend | null, e: unknown): void {
    const o = this.#o;
    this.#error = e;
    const dialled = this.#dialled;
    if (e instanceof AddressDeniedError) {
      // not the backend's failure: its health is untouched; the next backend may do
      logDenied(this.#pool, e.denied[0], dialled, o.clientAddr);
      this.next();
      return;
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
      this.#end({ kind: "failed", reason: "resource_exhausted", refusal: "unavailable", error: e });
      return;
    }
    o.metrics.connectFailures++;
    log.warn(`connect to ${dialled} failed for ${o.clientAddr}: ${errText(e)}`);
    if (b && !b.address.dynamic) this.#pool.connectFailed(b, errText(e));
    this.next();
  }

  #end(r: DialResult): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#done(r);
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

/** The addresses of `host` the guard lets this session dial; each refused one is counted. */
function dialable(
  host: string,
  port: number,
  addresses: string[],
  policy: InternalPolicy | null,
  o: DialOptions,
): string[] {
  // the common case (every address allowed, often one) allocates nothing
  if (addresses.every((address) => o.guard.check(address, port, policy) === null)) {
    return addresses;
  }
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
