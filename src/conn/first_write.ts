/**
 * Writing a session's first bytes (the client's hello, after any PROXY header) to the backend
 * it just connected, in userspace and pipe mode (a sockmap relay writes them itself; the session
 * bounds that the same way, see {@link boundFirstWrite}). A backend that accepts but never reads (hung, or its
 * accept queue served by a process that stopped reading) would hold the session there for ever:
 * the relay and its idle timeout start only once the hello is written. So the write is bounded
 * by `timeouts.connect_ms`, counted from the first write the backend refused (just after the
 * connect): taking the hello is part of getting a backend. The deadline is armed only then (its
 * buffers full): a hello written in one send costs none.
 *
 * @module
 */
import { E } from "../../ffi/socket.ts";
import { socketError, type TcpSocket } from "../io/tcp.ts";
import { type Deadline, deadline } from "../io/deadlines.ts";
import type { Backend, BackendPool } from "../route/backend.ts";
import { logger } from "../ops/log.ts";
import type { Metrics } from "../ops/metrics.ts";
import type { ConnRecord } from "./conn_record.ts";
import type { ByteRelay } from "./relay.ts";

const log = logger("session");

/** How writing the first bytes ended. */
export type FirstWriteEnd =
  | { kind: "written" }
  /** The backend reset or closed (e.g. overloaded): the send's error. */
  | { kind: "failed"; error: Error }
  /** The backend took only `written` of `total` bytes within `ms`. */
  | { kind: "stalled"; written: number; total: number; ms: number };

/** What {@link writeFirst} returns. */
export interface FirstWrite {
  /**
   * Gives the write up (no callback then): the backend's socket is reset, so that it never takes
   * a part of the hello for all of it.
   */
  stop(): void;
}

/**
 * Writes `first` to `backend`, now and whenever it has room; `done` is called once (maybe
 * before this returns) unless the write is stopped first.
 */
export function writeFirst(
  backend: TcpSocket,
  first: Uint8Array,
  ms: number,
  done: (end: FirstWriteEnd) => void,
): FirstWrite {
  let rest: Uint8Array | null = first;
  let due: Deadline | null = null;
  const finish = (end: FirstWriteEnd) => {
    if (rest === null) return;
    rest = null;
    due?.cancel();
    backend.setHandler(null);
    done(end);
  };
  const write = () => {
    if (rest === null) return;
    if (backend.writable) {
      const w = backend.send(rest);
      if (w < 0 && w !== -E.EAGAIN) {
        return finish({ kind: "failed", error: socketError("send", -w) });
      }
      if (w === rest.length) return finish({ kind: "written" });
      if (w > 0) rest = rest.subarray(w);
    }
    due ??= deadline(ms, () => {
      const written = first.length - (rest?.length ?? 0);
      finish({ kind: "stalled", written, total: first.length, ms });
    });
  };
  backend.setHandler(write);
  write();
  return {
    stop: () => {
      if (rest === null) return;
      rest = null;
      due?.cancel();
      backend.reset();
    },
  };
}

/** A backend that did not take a session's first bytes in time, as it is reported. */
export interface StalledBackend {
  pool: BackendPool;
  backend: Backend;
  /** The connection (its backend as dialled, and its client: for the log line). */
  record: Pick<ConnRecord, "backend" | "client">;
  /** How much of them it took, when known (userspace mode writes them itself). */
  taken: { written: number; total: number } | null;
  /** `timeouts.connect_ms`. */
  ms: number;
  metrics: Metrics;
}

/**
 * Reports a backend that accepted a connection and did not take its first bytes within
 * connect_ms as the backend's failure, not this host's: logged, counted in
 * `connect_failures_total`, told to passive health. Returns the error for the access log.
 */
export function backendStalled(s: StalledBackend): Error {
  const took = s.taken
    ? `took ${s.taken.written} of the ${s.taken.total} bytes of the hello`
    : "did not take the hello";
  const what = `backend ${s.record.backend} ${took} within connect_ms (${s.ms} ms)`;
  log.warn(`${what} for ${s.record.client}: it accepts but does not read; giving up`);
  s.metrics.connectFailures++;
  if (!s.backend.address.dynamic) s.pool.connectFailed(s.backend, "took no hello");
  return new Error(`${what}: it accepts but does not read`);
}

/**
 * A sockmap relay writes the first bytes itself: calls `stalled` when they are not all in the
 * backend's socket `ms` after it started; null (no deadline) when they already are.
 */
export function boundFirstWrite(
  relay: ByteRelay,
  ms: number,
  stalled: () => void,
): Deadline | null {
  if (!relay.firstPending) return null;
  return deadline(ms, () => {
    if (relay.firstPending) stalled();
  });
}
