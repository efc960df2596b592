/**
 * Routing a QUIC flow once its ClientHello is whole: the route table's checks as for TLS over
 * TCP (fingerprints of the ACL and the route, the route by name and ALPN, the default backend),
 * a backend of the route's pool (its balancing, health and limits), its name resolved and the
 * addresses checked by the dial guard, and a UDP socket connected to the first allowed one.
 *
 * A UDP connect does not reach the backend (no handshake): whether it answers shows later, as
 * datagrams back, or ICMP port unreachable (ECONNREFUSED on the flow's socket), which the
 * listener turns into passive health (see src/conn/quic_listener.ts).
 *
 * @module
 */
import type { ClientHello } from "../proto/clienthello.ts";
import type { Backend, BackendPool } from "../route/backend.ts";
import type { DialGuard } from "../route/dialguard.ts";
import type { RoutingTable } from "../route/table.ts";
import type { HostResolver } from "../dns/resolver.ts";
import type { FdBudget } from "./fdbudget.ts";
import { connectUdp, type UdpSocket } from "../io/udp.ts";
import { eventLoop } from "../io/loop.ts";
import { BurstLog, logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { errText } from "../ops/errtext.ts";
import type { FlowEnd } from "./quic_flow.ts";

const log = logger("quic");
/**
 * Each flow socket's receive buffer: room for a backend's burst while the process is busy (a
 * ceiling, not an allocation: the kernel takes memory as datagrams wait).
 */
const FLOW_BUFFERS = { rcvbuf: 2 << 20 };
const bursts = new BurstLog(log);

/** What routing one flow needs. */
export interface QuicRouteOptions {
  table: RoutingTable;
  hello: ClientHello;
  clientIp: string;
  /** The client, for log lines. */
  client: string;
  resolver: HostResolver;
  /** Which resolved backend addresses may be used (loops to the proxy's own UDP sockets). */
  guard: DialGuard;
  metrics: Metrics;
  fds: FdBudget | null;
  /** Called with the flow socket's events (datagrams from the backend). */
  onReadable: (events: number) => void;
}

/** How routing ended. */
export type QuicRouteResult =
  | {
    kind: "routed";
    sock: UdpSocket;
    pool: BackendPool;
    /** Its `active` count includes this flow (the caller decrements it at the end). */
    backend: Backend;
    route: string;
    /** As dialled (`IP:port`) and as configured. */
    dialled: string;
    label: string;
  }
  | { kind: "refused"; reason: FlowEnd; route: string | null; error: string | null };

/** Routes a flow whose hello is whole; never throws. */
export async function routeQuic(o: QuicRouteOptions): Promise<QuicRouteResult> {
  const { table, hello } = o;
  const fp = hello.fingerprints;
  const acl = table.config.acl.denyFingerprints;
  if (acl && fp && acl.match(fp.ja4, fp.ja3) !== null) {
    return refused("fingerprint_denied", null, `fingerprint ${fp.ja4} denied by acl`);
  }
  const found = table.router.lookup(hello.serverName, hello.alpn);
  let pool: BackendPool | null = null;
  let route: string | null = null;
  if (found.kind === "route") {
    pool = found.route.target;
    route = pool.name;
  } else if (found.kind === "none" && table.defaultPool) {
    pool = table.defaultPool;
    route = "default_backend";
  }
  if (!pool) {
    log.info(`${o.client}: no route for ${hello.serverName ?? "a QUIC hello without SNI"}`);
    return refused("no_route", null, null);
  }
  const denied = pool.denyFingerprints;
  if (denied && fp && denied.match(fp.ja4, fp.ja3) !== null) {
    return refused("fingerprint_denied", route, `fingerprint ${fp.ja4} denied by the route`);
  }
  return await pickAndConnect(pool, route!, o);
}

/** Tries the pool's backends until a socket is connected to one. */
async function pickAndConnect(
  pool: BackendPool,
  route: string,
  o: QuicRouteOptions,
): Promise<QuicRouteResult> {
  const tried = new Set<Backend>();
  let lastError: string | null = null;
  let deniedOnly = true;
  for (;;) {
    const b = pool.pick(o.clientIp, tried);
    if (!b) {
      if (tried.size === 0) {
        return refused(pool.allFull() ? "backend_full" : "no_backend", route, null);
      }
      return refused(deniedOnly ? "address_denied" : "connect_failed", route, lastError);
    }
    tried.add(b);
    const host = b.address.dynamic ? o.hello.serverName! : b.address.host;
    const port = b.address.port;
    let addresses: string[];
    try {
      addresses = await o.resolver.resolve(host);
    } catch (e) {
      lastError = errText(e);
      deniedOnly = false;
      pool.connectFailed(b, lastError);
      continue;
    }
    const policy = b.address.dynamic ? pool.internal : null;
    for (const address of addresses) {
      const kind = o.guard.check(address, port, policy);
      if (kind !== null) {
        Metrics.bump(o.metrics.addressDenied, kind);
        bursts.warn(
          `quic-denied:${pool.name}:${kind}`,
          `route "${pool.name}": not sending QUIC for ${o.client} to ${address}:${port} (${kind})`,
        );
        continue;
      }
      deniedOnly = false;
      if (o.fds && !o.fds.hasRoom()) return refused("resource_exhausted", route, "no descriptor");
      try {
        const sock = connectUdp(eventLoop(), address, port, FLOW_BUFFERS, o.onReadable);
        o.fds?.backendOpened();
        b.active++;
        const dialled = address.includes(":") ? `[${address}]:${port}` : `${address}:${port}`;
        return { kind: "routed", sock, pool, backend: b, route, dialled, label: b.address.text };
      } catch (e) {
        lastError = errText(e);
      }
    }
  }
}

function refused(reason: FlowEnd, route: string | null, error: string | null): QuicRouteResult {
  return { kind: "refused", reason, route, error };
}
