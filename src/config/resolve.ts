/**
 * The resolving step: a valid file's values (see schema.ts) turned into the `Config` the proxy
 * runs on. Every field keeps its name, in camelCase (`ebpf.drain_timeout_ms` is
 * `config.ebpf.drainTimeoutMs`), and its parsed value, unless a function here converts it:
 * addresses parsed, patterns and CIDRs compiled, relative paths made absolute, seconds made ms,
 * defaults that depend on other fields filled in. The `Config` type is what this returns.
 *
 * @module
 */
import { dirname, resolve as resolvePath } from "node:path";
import { parseCidr } from "../route/acl.ts";
import { compileFingerprintPatterns } from "../proto/fingerprint.ts";
import { compilePattern } from "../route/router.ts";
import { SOCKMAP_ENTRIES } from "../ebpf/bounds.ts";
import {
  formatPath,
  parseBackend,
  parseDefaultBackend,
  parseDnsServer,
  parseListener,
} from "./address.ts";
import { configWarnings } from "./checks.ts";
import { type ConfigSource, DEFAULT_TABLE, healthSchema } from "./schema.ts";

/** `max_file_bytes` as `maxFileBytes`. */
type Camel<S extends string> = S extends `${infer Head}_${infer Tail}`
  ? `${Head}${Capitalize<Camel<Tail>>}`
  : S;

/** A parsed value with the keys of its objects in camelCase, at every depth. */
type Camelized<T> = T extends readonly (infer E)[] ? Camelized<E>[]
  : T extends object ? { [K in keyof T as K extends string ? Camel<K> : K]: Camelized<T[K]> }
  : T;

/**
 * `value` with the keys of its objects in camelCase, at every depth. For file values only: the
 * keys of a record (`tables`) are names, not fields, and are resolved on their own.
 */
function camelize<T>(value: T): Camelized<T> {
  if (Array.isArray(value)) return value.map(camelize) as Camelized<T>;
  if (value === null || typeof value !== "object") return value as Camelized<T>;
  const camel = (key: string) => key.replace(/_(.)/g, (_, c: string) => c.toUpperCase());
  return Object.fromEntries(
    Object.entries(value).map(([k, v]) => [camel(k), camelize(v)]),
  ) as Camelized<T>;
}

/** Where relative paths in a config resolve. */
export interface PathBase {
  /** For `log.file` and `log.access_log`: systemd's `$LOGS_DIRECTORY` (LogsDirectory=). */
  logsDirectory?: string | null;
  /** For `admin.socket`: systemd's `$RUNTIME_DIRECTORY` (RuntimeDirectory=). */
  runtimeDirectory?: string | null;
}

/** `p` against `dir` unless it is absolute; null for `false` (off). */
function against<P extends string | false>(dir: string, p: P): P extends string ? string : null;
function against(dir: string, p: string | false): string | null {
  if (p === false) return null;
  return p.startsWith("/") ? p : resolvePath(dir, p);
}

type Route = ConfigSource["routes"][number];

function resolveRoute(route: Route, at: PropertyKey[]) {
  const { allow_private, allow_addresses, proxy_protocol_tlvs, ...rest } = route;
  const backends = route.backends.map(({ address, max_connections, ...b }) => ({
    ...parseBackend(address),
    ...camelize(b),
    /** Live connections it takes at most; 0: no limit. */
    maxConnections: max_connections ?? 0,
  }));
  const dynamic = backends.some((b) => b.dynamic);
  return {
    ...camelize(rest),
    match: compilePattern(route.match),
    alpn: route.alpn ?? null,
    backends,
    allow: dynamic ? route.allow!.map(compilePattern) : null,
    /** Dynamic backends only: which internal addresses they may still be dialled at. */
    internal: dynamic
      ? {
        allowPrivate: allow_private,
        allowAddresses: allow_addresses.map(parseCidr),
        path: formatPath(at),
      }
      : null,
    proxyProtocol: route.proxy_protocol ?? null,
    proxyTlvs: [...new Set(proxy_protocol_tlvs)],
    denyFingerprints: compileFingerprintPatterns(route.deny_fingerprints),
    health: resolveHealth(route.health),
  };
}

/** Health settings with `active`: the active checks (`health.check`), or null. */
function resolveHealth({ check, ...passive }: Route["health"]) {
  return { ...camelize(passive), active: check ? camelize(check) : null };
}

/** The health settings of a pool whose route names none (the default backend's). */
export const DEFAULT_HEALTH: HealthConfig = resolveHealth(healthSchema.parse({}));

/** The route table at `at` (`routes`, `tables.NAME.routes`). */
function resolveTable(at: PropertyKey[], t: Pick<ConfigSource, "routes" | "default_backend">) {
  return {
    routes: t.routes.map((r, i) => resolveRoute(r, [...at, i])),
    defaultBackend: t.default_backend === undefined ? null : parseDefaultBackend(t.default_backend),
  };
}

/** Every route table by name: `default` (the top-level routes) and each of `tables`. */
function resolveTables(c: ConfigSource) {
  const tables: Record<string, ReturnType<typeof resolveTable>> = {
    [DEFAULT_TABLE]: resolveTable(["routes"], c),
  };
  for (const [name, t] of Object.entries(c.tables)) {
    tables[name] = resolveTable(["tables", name, "routes"], t);
  }
  return tables;
}

function resolveLimits(limits: ConfigSource["limits"]) {
  const perSource = limits.per_source;
  return {
    ...camelize(limits),
    /** Per client address, checked at accept; null: no such limit. */
    perSource: perSource
      ? {
        ...camelize(perSource),
        maxConnections: perSource.max_connections ?? null,
        newPerSecond: perSource.new_per_second ?? null,
        burst: perSource.burst ?? Math.max(1, Math.ceil(perSource.new_per_second ?? 1)),
      }
      : null,
  };
}

function resolveDns(dns: ConfigSource["dns"], dir: string) {
  const { min_ttl_s, max_ttl_s, negative_ttl_s, ...rest } = dns;
  return {
    ...camelize(rest),
    /** null: the nameservers of /etc/resolv.conf. */
    servers: dns.servers?.map(parseDnsServer) ?? null,
    minTtlMs: min_ttl_s * 1000,
    maxTtlMs: max_ttl_s * 1000,
    negativeTtlMs: negative_ttl_s * 1000,
    hostsFile: against(dir, dns.hosts_file),
  };
}

function resolveEbpf(ebpf: ConfigSource["ebpf"], maxConnections: number, dir: string) {
  const { maps, xdp, quic, ...rest } = ebpf;
  return {
    ...camelize(rest),
    // two entries per spliced connection; sockets also hold health checks and DNS over TCP
    maxPairs: maps.pairs ?? Math.max(SOCKMAP_ENTRIES.min, 2 * maxConnections),
    maxSockets: maps.sockets ?? Math.max(SOCKMAP_ENTRIES.min, 2 * maxConnections + 1024),
    /** Absolute, or null: the bundled object. */
    object: ebpf.object === undefined ? null : against(dir, ebpf.object),
    /** XDP source filtering, or null when off; its `block` likewise. */
    xdp: xdp ? { ...camelize(xdp), block: xdp.block ? camelize(xdp.block) : null } : null,
    /** Kernel forwarding of QUIC flows, or null when off. */
    quic: quic ? camelize(quic) : null,
  };
}

/**
 * The config a valid file's values `c` describe. `path` is the file it came from: relative paths
 * in it resolve against its directory (log paths against `base.logsDirectory` when set, the admin
 * socket against `base.runtimeDirectory`).
 */
export function resolveSections(c: ConfigSource, path: string, base: PathBase = {}) {
  const absolute = resolvePath(path);
  const dir = dirname(absolute);
  const logDir = base.logsDirectory || dir;
  const tables = resolveTables(c);
  return {
    /** Absolute path of the file it came from. */
    path: absolute,
    /** The file's values with their defaults, as the schema read them (for reload diffs). */
    source: c,
    /** Fields that are valid but have no effect as set, each starting with its JSON path. */
    warnings: configWarnings(c),
    /** Proxy processes sharing the listeners; 1: a single process, no supervisor. */
    workers: c.workers === "auto" ? Math.max(1, navigator.hardwareConcurrency || 1) : c.workers,
    listeners: c.listeners.map((l) => ({
      ...camelize(l),
      ...parseListener(l.address),
      acceptProxyProtocol: l.accept_proxy_protocol.map(parseCidr),
    })),
    /** The default table's routes (`routes`). */
    routes: tables[DEFAULT_TABLE].routes,
    defaultBackend: tables[DEFAULT_TABLE].defaultBackend,
    /** Every route table by name: `default` (the two fields above) and each of `tables`. */
    tables,
    timeouts: camelize(c.timeouts),
    limits: resolveLimits(c.limits),
    quic: { ...camelize(c.quic), maxFlowsPerSource: c.quic.max_flows_per_source ?? null },
    acl: {
      ...camelize(c.acl),
      allow: c.acl.allow.map(parseCidr),
      deny: c.acl.deny.map(parseCidr),
      denyFingerprints: compileFingerprintPatterns(c.acl.deny_fingerprints),
    },
    log: {
      ...camelize(c.log),
      file: against(logDir, c.log.file),
      accessLog: against(logDir, c.log.access_log),
    },
    dns: resolveDns(c.dns, dir),
    /** The metrics endpoint, or null when off. */
    metrics: c.metrics ? { ...camelize(c.metrics), ...parseListener(c.metrics.address) } : null,
    /** The admin API's socket (absolute) and group (null: the owner only), or null when off. */
    admin: c.admin
      ? {
        ...camelize(c.admin),
        socket: against(base.runtimeDirectory || dir, c.admin.socket),
        group: c.admin.group ?? null,
      }
      : null,
    ebpf: resolveEbpf(c.ebpf, c.limits.max_connections, dir),
  };
}

/** "3 route(s)", or with several tables served "5 route(s) in 2 tables". */
export function routeSummary(config: Config): string {
  const served = [...new Set(config.listeners.map((l) => l.table))];
  const routes = served.reduce((n, t) => n + config.tables[t].routes.length, 0);
  return served.length > 1 ? `${routes} route(s) in ${served.length} tables` : `${routes} route(s)`;
}

/** The resolved, validated config the proxy runs on. */
export type Config = ReturnType<typeof resolveSections>;
/** A listening socket. */
export type ListenerConfig = Config["listeners"][number];
/** A route table: ordered routes and the backend for names none of them takes. */
export type RouteTableConfig = Config["tables"][string];
/** A route: names it serves and the backends it sends them to. */
export type RouteConfig = RouteTableConfig["routes"][number];
/** A backend of a route, with its share of the route's connections and its limit. */
export type RouteBackend = RouteConfig["backends"][number];
/** How a route picks one of its backends. */
export type Balance = RouteConfig["balance"];
/** Backend health settings of a route. */
export type HealthConfig = RouteConfig["health"];
/** `ebpf.xdp.block`: temporary XDP blocks of misbehaving sources. */
export type XdpBlockConfig = NonNullable<NonNullable<Config["ebpf"]["xdp"]>["block"]>;
