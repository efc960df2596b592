/**
 * The lingering close of a refused client (nginx's `lingering_close`). A client the proxy refuses
 * (an alert, a 503...) may have sent more than was read: the rest of a hello, a pipelined
 * request, TLS early data. Closed at once, a socket with unread bytes sends a reset instead of a
 * FIN, and the reset makes the client's kernel drop what it has not read yet: the refusal, often.
 * So the refusal and a FIN are sent, the client's bytes are read and dropped until it closes or
 * resets, and only then is the socket closed.
 *
 * Bounded three ways: in time (`timeouts.linger_ms`, one deadline in the queue every lingering
 * close of that length shares: no timer per connection), in bytes ({@link DISCARD_MAX_BYTES}: a
 * client that keeps sending is closed then, with the reset), and in count (`limits.max_lingering`
 * per process: past it a refused client is closed at once, as without lingering, and counted as
 * `over_limit`). Their descriptors come last: when the accept loops would pause for want of
 * descriptors, the oldest lingering closes are cut to make room ({@link shedLingering}, counted
 * as `fd_reserve`), so refused clients never keep a client with a route waiting. A client that
 * resets is closed as it is (its reset is not turned into anything
 * else). Every end is counted by how it came.
 *
 * @module
 */
import { E } from "../../ffi/socket.ts";
import type { TcpSocket } from "../io/tcp.ts";
import { deadline } from "../io/deadlines.ts";
import { Metrics } from "../ops/metrics.ts";
import type { FdBudget } from "./fdbudget.ts";

/** What one lingering close may read and drop before it gives up on the client. */
export const DISCARD_MAX_BYTES = 256 * 1024;

/** How a lingering close ended: the label of `sni_proxy_lingering_closes_total`. */
export type LingerEnd = "eof" | "reset" | "timeout" | "bytes" | "over_limit" | "fd_reserve";

/** What a lingering close needs. */
export interface LingerOptions {
  /** How long the client's bytes are read and dropped at most (`timeouts.linger_ms`); 0: none. */
  ms: number;
  /** Lingering closes at once in this process (`limits.max_lingering`). */
  max: number;
  metrics: Metrics;
  /** Told about the descriptor kept meanwhile, or null. */
  fds: FdBudget | null;
}

/** Where dropped bytes are read to (shared: they are never looked at). */
const sink = new Uint8Array(64 * 1024);
const SINK_LEN = BigInt(sink.length);

/** Lingering closes under way in this process. */
let lingering = 0;
/** How to end each lingering close under way, oldest first (a Set keeps insertion order). */
const ends = new Set<(how: LingerEnd) => void>();

/** Lingering closes under way in this process now. */
export function lingeringNow(): number {
  return lingering;
}

/**
 * Ends the oldest lingering closes while `fds` has no room for a new client (counted as
 * `fd_reserve`): a refused client's descriptor is the first to give up. Returns how many.
 */
export function shedLingering(fds: FdBudget): number {
  let shed = 0;
  for (const end of ends) {
    if (fds.hasRoom()) break;
    end("fd_reserve");
    shed++;
  }
  return shed;
}

/**
 * Closes `sock`, whose refusal was written and whose FIN was sent (shutdown(SHUT_WR)), once
 * the client is done with it: see the module comment. Takes the socket over (its handler is
 * replaced); returns at once.
 */
export function lingerClose(sock: TcpSocket, o: LingerOptions): void {
  if (o.ms === 0) {
    sock.close();
    return;
  }
  if (lingering >= o.max) {
    Metrics.bump(o.metrics.lingerCloses, "over_limit");
    sock.close();
    return;
  }
  lingering++;
  o.metrics.lingering = lingering;
  o.fds?.lingerStarted();
  let dropped = 0;
  const end = (how: LingerEnd) => {
    if (sock.closed) return;
    due.cancel();
    ends.delete(end);
    sock.close();
    lingering--;
    o.metrics.lingering = lingering;
    o.fds?.lingerEnded();
    Metrics.bump(o.metrics.lingerCloses, how);
  };
  const drop = () => {
    while (sock.readable && !sock.closed) {
      const n = sock.recv(sink, SINK_LEN);
      if (n === -E.EAGAIN) return;
      if (n === 0) return end("eof");
      if (n < 0) return end("reset");
      dropped += n;
      if (dropped > DISCARD_MAX_BYTES) return end("bytes");
    }
  };
  const due = deadline(o.ms, () => end("timeout"));
  ends.add(end);
  sock.setHandler(drop);
  drop();
}
