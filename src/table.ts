/**
 * The routing table a connection is served by: routes with their backend pools, the default
 * backend, the ACL and the limits of one config. Built whole from a config and swapped whole
 * on reload, so a live connection keeps the table it started with.
 *
 * @module
 */
import { Acl } from "./acl.ts";
import { BackendPool } from "./backend.ts";
import type { Config } from "./config.ts";
import { Router } from "./router.ts";

/** Everything a new connection needs to be routed. */
export interface RoutingTable {
  config: Config;
  router: Router<BackendPool>;
  defaultPool: BackendPool | null;
  acl: Acl;
}

/** Starts the active health checks of every pool of `table`. */
export function startHealthChecks(table: RoutingTable): void {
  for (const r of table.router.routes) r.target.startChecks();
}

/** Stops them (the table was replaced, or the proxy stops). */
export function stopHealthChecks(table: RoutingTable): void {
  for (const r of table.router.routes) r.target.stopChecks();
}

/** Builds the routing table of a validated config. */
export function buildTable(config: Config): RoutingTable {
  return {
    config,
    router: new Router(config.routes.map((r) => ({
      pattern: r.match,
      allow: r.allow,
      target: new BackendPool(r.match.text, r.backends, r.balance, r.proxyProtocol, r.health),
    }))),
    defaultPool: config.defaultBackend
      ? new BackendPool("default_backend", [config.defaultBackend], "round_robin")
      : null,
    acl: new Acl(config.acl.allow, config.acl.deny),
  };
}
