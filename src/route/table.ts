/**
 * The routing tables connections are served by: for each route table of one config, its routes
 * with their backend pools and its default backend; plus the ACL and the limits. Built whole
 * from a config and swapped whole on reload, so a live connection keeps the table it started
 * with.
 *
 * @module
 */
import { Acl } from "./acl.ts";
import { BackendPool } from "./backend.ts";
import type { Config, RouteTableConfig } from "../config/mod.ts";
import { Router } from "./router.ts";

/** Everything a new connection on one listener needs to be routed. */
export interface RoutingTable {
  config: Config;
  /** The route table's name (`default`: the top-level routes). */
  name: string;
  router: Router<BackendPool>;
  defaultPool: BackendPool | null;
  acl: Acl;
  /** Whether sessions compute the hello's fingerprints (access log, or patterns to check). */
  fingerprints: boolean;
}

/** The routing tables of one config. */
export interface RoutingTables {
  config: Config;
  acl: Acl;
  /** Every route table a listener serves, by name. */
  byName: Map<string, RoutingTable>;
  /** The table of each listener of `config.listeners`, in that order. */
  byListener: RoutingTable[];
}

/** Starts the active health checks of every pool of `tables`. */
export function startHealthChecks(tables: RoutingTables): void {
  for (const t of tables.byName.values()) for (const r of t.router.routes) r.target.startChecks();
}

/** Stops them (the tables were replaced, or the proxy stops). */
export function stopHealthChecks(tables: RoutingTables): void {
  for (const t of tables.byName.values()) for (const r of t.router.routes) r.target.stopChecks();
}

/** Builds the routing tables of a validated config. */
export function buildTables(config: Config): RoutingTables {
  const acl = new Acl(config.acl.allow, config.acl.deny);
  const pool = (r: RouteTableConfig["routes"][number]) => {
    // two routes may share a `match` and differ by ALPN: the name tells them apart in logs
    return new BackendPool(
      r.alpn ? `${r.match.text} alpn=${r.alpn.join(",")}` : r.match.text,
      r.backends,
      r.balance,
      {
        proxyProtocol: r.proxyProtocol,
        proxyTlvs: r.proxyTlvs,
        health: r.health,
        internal: r.internal,
        workers: config.workers,
        denyFingerprints: r.denyFingerprints,
      },
    );
  };
  const table = (name: string, t: RouteTableConfig): RoutingTable => ({
    config,
    name,
    router: new Router(t.routes.map((r) => ({
      pattern: r.match,
      alpn: r.alpn,
      allow: r.allow,
      target: pool(r),
    }))),
    defaultPool: t.defaultBackend
      ? new BackendPool("default_backend", [t.defaultBackend], "round_robin")
      : null,
    acl,
    fingerprints: config.log.accessLog !== null || config.acl.denyFingerprints !== null ||
      t.routes.some((r) => r.denyFingerprints !== null),
  });
  // tables no listener serves get no pools (and so no health checks)
  const used = new Set(config.listeners.map((l) => l.table));
  const byName = new Map(
    Object.entries(config.tables).filter(([n]) => used.has(n)).map(([n, t]) => [n, table(n, t)]),
  );
  return {
    config,
    acl,
    byName,
    byListener: config.listeners.map((l) => byName.get(l.table)!),
  };
}
