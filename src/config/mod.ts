/**
 * The config: a JSON file validated against a schema (schema.ts) and cross-field checks
 * (checks.ts), resolved into the typed `Config` the proxy runs on (resolve.ts); what a reload
 * can apply (reload.ts). See the README's "Adding a config field".
 *
 * @module
 */
export type { BackendAddress } from "./address.ts";
export { formatPath } from "./address.ts";
export { ConfigError, loadConfig, resolveConfig } from "./load.ts";
export { reloadable } from "./reload.ts";
export type {
  Balance,
  Config,
  HealthConfig,
  ListenerConfig,
  PathBase,
  RouteBackend,
  RouteConfig,
  RouteTableConfig,
  XdpBlockConfig,
} from "./resolve.ts";
export { DEFAULT_HEALTH, routeSummary } from "./resolve.ts";
export { type ConfigSource, DEFAULT_ADMIN_SOCKET, DEFAULT_TABLE } from "./schema.ts";
