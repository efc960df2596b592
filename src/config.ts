/**
 * Config file: JSON validated against a schema, then resolved into the typed form the
 * proxy runs on. Every error carries the JSON path of the bad field.
 *
 * @module
 */
import { dirname, resolve as resolvePath } from "node:path";
import { z } from "zod";
import { type Cidr, parseCidr } from "./route/acl.ts";
import { isIpAddress } from "./net/ip.ts";
import type { InternalPolicy } from "./route/dialguard.ts";
import { compileFingerprintPatterns, type FingerprintPatterns } from "./proto/fingerprint.ts";
import type { ProxyTlv } from "./proto/proxyproto.ts";
import type { SourceLimits } from "./conn/sourcelimit.ts";
import { compilePattern, type NamePattern } from "./route/router.ts";
import {
  SOCKET_BUFFER_BYTES,
  SOCKMAP_ENTRIES,
  XDP_DEFAULT_BLOCK_ENTRIES,
  XDP_DEFAULT_ENTRIES,
  XDP_ENTRIES,
} from "./ebpf/bounds.ts";

/** How a route picks one of its backends. */
export type Balance = "round_robin" | "random" | "least_conn" | "source_hash";

/** A `host:port` backend; `dynamic` means the host is the client's requested name (`$sni`). */
export interface BackendAddress {
  /** As written in the config, for logs. */
  text: string;
  /** IP literal (no brackets) or DNS name; empty for dynamic backends. */
  host: string;
  port: number;
  dynamic: boolean;
}

/** A listening socket. */
export interface ListenerConfig {
  address: string;
  hostname: string;
  port: number;
  protocol: "tls" | "http";
  /** Sources trusted to send a PROXY protocol header first (empty: none). */
  acceptProxyProtocol: Cidr[];
  /** The name of the route table it serves (`default`: the top-level routes). */
  table: string;
}

/** A backend of a route, with its share of the route's connections and its limit. */
export interface RouteBackend extends BackendAddress {
  /** Relative share of the connections (1-1000). */
  weight: number;
  /** Used only while every primary (non-backup) backend of the route is down. */
  backup: boolean;
  /** Live connections it takes at most (0: no limit); a full backend is skipped. */
  maxConnections: number;
}

/** Backend health settings of a route. */
export interface HealthConfig {
  /** Consecutive failed connects that mark a backend down (passive check). */
  maxFails: number;
  /** How long a passively failed backend stays down. */
  failTimeoutMs: number;
  /** Active TCP connect checks, or null. */
  active: { intervalMs: number; timeoutMs: number; rise: number; fall: number } | null;
}

/** A route: names it serves and the backends it sends them to. */
export interface RouteConfig {
  match: NamePattern;
  /** ALPN protocols of which the client must offer one; null: any hello. */
  alpn: string[] | null;
  backends: RouteBackend[];
  balance: Balance;
  /** Required for dynamic backends: names they may connect to. */
  allow: NamePattern[] | null;
  /** Dynamic backends only: which internal addresses they may still be dialled at. */
  internal: InternalPolicy | null;
  /** PROXY protocol header to send to the backend before the client's bytes. */
  proxyProtocol: "v1" | "v2" | null;
  /** TLVs to add to a v2 header. */
  proxyTlvs: ProxyTlv[];
  health: HealthConfig;
  /** Clients whose TLS fingerprint matches are refused; null: none. */
  denyFingerprints: FingerprintPatterns | null;
}

/** A route table: ordered routes and the backend for names none of them takes. */
export interface RouteTableConfig {
  routes: RouteConfig[];
  defaultBackend: BackendAddress | null;
}

/** The name of the route table made of the top-level `routes` and `default_backend`. */
export const DEFAULT_TABLE = "default";

/** The resolved, validated config the proxy runs on. */
export interface Config {
  /** Absolute path of the file it came from. */
  path: string;
  /** The file's values with their defaults, as the schema read them (for reload diffs). */
  source: ConfigSource;
  /** Fields that are valid but have no effect as set, each starting with its JSON path. */
  warnings: string[];
  /** Proxy processes sharing the listeners (SO_REUSEPORT); 1: a single process, no supervisor. */
  workers: number;
  listeners: ListenerConfig[];
  /** The default table's routes (`routes`). */
  routes: RouteConfig[];
  defaultBackend: BackendAddress | null;
  /** Every route table by name: `default` (the two fields above) and each of `tables`. */
  tables: Record<string, RouteTableConfig>;
  timeouts: {
    clientHelloMs: number;
    connectMs: number;
    idleMs: number;
    drainMs: number;
    /** After SIGTERM, how long /healthz answers 503 while the listeners still accept. */
    stopDelayMs: number;
  };
  limits: {
    maxConnections: number;
    maxClientHelloBytes: number;
    /** Per client address, checked at accept; null: no such limit. */
    perSource: SourceLimits | null;
  };
  acl: { allow: Cidr[]; deny: Cidr[]; denyFingerprints: FingerprintPatterns | null };
  log: {
    level: "debug" | "info" | "warning" | "error";
    file: string | null;
    accessLog: string | null;
    maxFileBytes: number;
    maxFiles: number;
  };
  /** Backend name resolution and its cache. */
  dns: {
    /** null: the nameservers of /etc/resolv.conf. */
    servers: { ipAddr: string; port: number }[] | null;
    minTtlMs: number;
    maxTtlMs: number;
    negativeTtlMs: number;
    cacheEntries: number;
    timeoutMs: number;
    attempts: number;
    hostsFile: string | null;
  };
  /** The metrics endpoint, or null when off. */
  metrics: { address: string; hostname: string; port: number } | null;
  /**
   * The admin API's UNIX socket (absolute path) and the group that may use it besides the
   * owner (a name or a gid; null: the owner only), or null when off.
   */
  admin: { socket: string; group: string | number | null } | null;
  ebpf: {
    enabled: boolean;
    sockmapEnabled: boolean;
    dnsCacheEnabled: boolean;
    /** Capacity of the pairing map (2 entries per spliced connection). */
    maxPairs: number;
    /** Capacity of the sockhash (one entry per proxy socket). */
    maxSockets: number;
    /**
     * How kernel mode moves a pair's bytes: `pipe` (splice(2) through a pipe, with TCP flow
     * control) or `sockmap` (the eBPF redirect: no syscall per chunk, but no backpressure).
     */
    spliceMode: "pipe" | "sockmap";
    /** Pipe mode: the capacity of each direction's pipe (bytes held between the sockets). */
    pipeBytes: number;
    /** SO_SNDBUF / SO_RCVBUF of spliced sockets; 0 keeps the kernel's autotuning. */
    sndbuf: number;
    rcvbuf: number;
    /** How long a closing spliced side waits for the kernel's redirect queue to drain. */
    drainTimeoutMs: number;
    /**
     * Take spliced sockets out of Deno's event loop (the proxy's own epoll, the stream-parser
     * sockhash); false leaves them in Deno's loop, woken by their traffic.
     */
    detachSpliced: boolean;
    /** A BPF object file to load instead of the bundled one (absolute path), or null. */
    object: string | null;
    /** XDP source filtering from the ACL, or null when off. */
    xdp: {
      interfaces: string[];
      mode: "auto" | "native" | "generic";
      maxEntries: number;
      /** Temporary XDP blocks of misbehaving sources, or null when off. */
      block: XdpBlockConfig | null;
    } | null;
  };
}

/**
 * `ebpf.xdp.block`: a source with `after` offences (per-source limit refusals, bad hellos)
 * within `windowMs` is dropped by XDP for `blockMs`; at most `maxEntries` sources at once.
 */
export interface XdpBlockConfig {
  after: number;
  windowMs: number;
  blockMs: number;
  maxEntries: number;
}

/** Raised when a config cannot be used; `errors` lists every problem, each with its path. */
export class ConfigError extends Error {
  readonly errors: string[];
  constructor(source: string, errors: string[]) {
    super(`${source}: ${errors.length} error(s):\n  ${errors.join("\n  ")}`);
    this.name = "ConfigError";
    this.errors = errors;
  }
}

const ms = (def: number) => z.number().int().min(1).max(86_400_000).default(def);
/** A whole number within one of the shared bounds (see src/ebpf/bounds.ts). */
const within = (range: { min: number; max: number }) =>
  z.number().int().min(range.min).max(range.max);
const pathOrOff = (def: string) =>
  z.union([z.string().min(1), z.literal(false)], { error: "expected a file path or false" })
    .default(def);

/** `admin.socket` when the admin section does not say (relative: see resolveConfig). */
export const DEFAULT_ADMIN_SOCKET = "sni-proxy-admin.sock";

/** Defaults a cross-field check needs when the field is absent. */
const DNS_TTL_DEFAULTS = { min_ttl_s: 5, max_ttl_s: 3600 };

/** A backend: `"host:port"`, or the same as `address` with its weight, backup role and limit. */
const backendSchema = z.preprocess(
  (v) => (typeof v === "string" ? { address: v } : v),
  z.strictObject({
    address: z.string(),
    weight: z.number().int().min(1).max(1000).default(1),
    backup: z.boolean().default(false),
    max_connections: z.number().int().min(1).max(1_000_000).optional(),
  }, {
    error: (issue) =>
      issue.code === "invalid_type"
        ? 'expected "host:port" or { "address": "host:port", … }'
        : undefined,
  }),
);

/** JA4 / JA3 fingerprints, `*` matching any run of characters. */
const fingerprintsSchema = z.array(
  z.string().regex(/^[a-z0-9_*]{1,64}$/, {
    error: "not a JA4 or JA3 fingerprint (lower-case letters, digits, _ and * only)",
  }),
).default([]);

const routeSchema = z.strictObject({
  match: z.string(),
  alpn: z.array(z.string().min(1).max(255)).min(1, { error: "at least one protocol" })
    .optional(),
  backends: z.array(backendSchema).min(1, { error: "at least one backend is required" }),
  balance: z.enum(["round_robin", "random", "least_conn", "source_hash"]).default(
    "round_robin",
  ),
  allow: z.array(z.string()).optional(),
  allow_private: z.boolean().default(false),
  allow_addresses: z.array(z.string()).default([]),
  proxy_protocol: z.enum(["v1", "v2"]).optional(),
  proxy_protocol_tlvs: z.array(z.enum(["authority", "alpn", "unique_id"])).default([]),
  deny_fingerprints: fingerprintsSchema,
  health: z.strictObject({
    max_fails: z.number().int().min(1).max(1000).default(3),
    fail_timeout_ms: ms(10_000),
    check: z.strictObject({
      interval_ms: ms(2_000),
      timeout_ms: ms(1_000),
      rise: z.number().int().min(1).max(100).default(2),
      fall: z.number().int().min(1).max(100).default(3),
    }).optional(),
  }).prefault({}),
});

const schema = z.strictObject({
  workers: z.union([z.literal("auto"), z.number().int().min(1).max(256)], {
    error: 'expected "auto" or a whole number from 1 to 256',
  }).default("auto"),
  listeners: z.array(z.strictObject({
    address: z.string(),
    protocol: z.enum(["tls", "http"]).default("tls"),
    accept_proxy_protocol: z.array(z.string()).default([]),
    table: z.string().default(DEFAULT_TABLE),
  })).min(1, { error: "at least one listener is required" }),
  routes: z.array(routeSchema),
  default_backend: z.string().optional(),
  tables: z.record(
    z.string(),
    z.strictObject({ routes: z.array(routeSchema), default_backend: z.string().optional() }),
  ).default({}),
  timeouts: z.strictObject({
    client_hello_ms: ms(10_000),
    connect_ms: ms(5_000),
    idle_ms: ms(300_000),
    drain_ms: ms(30_000),
    stop_delay_ms: z.number().int().min(0).max(600_000).default(0),
  }).prefault({}),
  limits: z.strictObject({
    max_connections: z.number().int().min(1).max(1_000_000).default(10_000),
    max_client_hello_bytes: z.number().int().min(512).max(1_048_576).default(16_384),
    per_source: z.strictObject({
      max_connections: z.number().int().min(1).max(1_000_000).optional(),
      new_per_second: z.number().gt(0).max(1_000_000).optional(),
      burst: z.number().int().min(1).max(1_000_000).optional(),
    }).optional(),
  }).prefault({}),
  acl: z.strictObject({
    allow: z.array(z.string()).default([]),
    deny: z.array(z.string()).default([]),
    deny_fingerprints: fingerprintsSchema,
  }).prefault({}),
  log: z.strictObject({
    level: z.enum(["debug", "info", "warning", "error"]).default("info"),
    file: pathOrOff("logs/sni-proxy.log"),
    access_log: pathOrOff("logs/access.log"),
    max_file_bytes: z.number().int().min(4096).default(10 * 1024 * 1024),
    max_files: z.number().int().min(1).max(1000).default(5),
  }).prefault({}),
  dns: z.strictObject({
    servers: z.array(z.string()).min(1).optional(),
    min_ttl_s: z.number().int().min(0).max(86_400).default(DNS_TTL_DEFAULTS.min_ttl_s),
    max_ttl_s: z.number().int().min(1).max(604_800).default(DNS_TTL_DEFAULTS.max_ttl_s),
    negative_ttl_s: z.number().int().min(0).max(86_400).default(10),
    cache_entries: z.number().int().min(16).max(16_777_216).default(4096),
    timeout_ms: ms(2_000),
    attempts: z.number().int().min(1).max(10).default(2),
    hosts_file: pathOrOff("/etc/hosts"),
  }).prefault({}),
  metrics: z.strictObject({ address: z.string() }).optional(),
  admin: z.strictObject({
    socket: z.string().min(1).default(DEFAULT_ADMIN_SOCKET),
    group: z.union([z.string().regex(/^[a-z_][a-z0-9_.-]*\$?$/i), z.number().int().min(0)], {
      error: "expected a group name or a numeric gid",
    }).optional(),
  }).optional(),
  ebpf: z.strictObject({
    enabled: z.boolean().default(false),
    sockmap_enabled: z.boolean().default(false),
    dns_cache_enabled: z.boolean().default(false),
    // default: room for limits.max_connections spliced connections (see resolveConfig)
    maps: z.strictObject({
      pairs: within(SOCKMAP_ENTRIES).optional(),
      sockets: within(SOCKMAP_ENTRIES).optional(),
    }).prefault({}),
    splice_mode: z.enum(["pipe", "sockmap"]).default("pipe"),
    pipe_bytes: z.number().int().min(4096).max(1 << 20).default(256 * 1024),
    sndbuf: within(SOCKET_BUFFER_BYTES).default(0),
    rcvbuf: within(SOCKET_BUFFER_BYTES).default(0),
    drain_timeout_ms: ms(5_000),
    detach_spliced: z.boolean().default(true),
    object: z.string().min(1).optional(),
    xdp: z.strictObject({
      interfaces: z.array(
        z.string().regex(/^[a-zA-Z0-9_.:@-]{1,15}$/, {
          error: "not an interface name",
        }),
      ).min(1),
      mode: z.enum(["auto", "native", "generic"]).default("auto"),
      max_entries: within(XDP_ENTRIES).default(XDP_DEFAULT_ENTRIES),
      block: z.strictObject({
        after: z.number().int().min(1).max(1_000_000).default(10),
        window_ms: ms(10_000),
        block_ms: ms(60_000),
        max_entries: within(XDP_ENTRIES).default(XDP_DEFAULT_BLOCK_ENTRIES),
      }).optional(),
    }).optional(),
  }).prefault({}),
});

/** A config file's values with their defaults filled in, keyed as in the JSON. */
export type ConfigSource = z.output<typeof schema>;

/** Formats `["routes", 2, "backends", 0]` as `routes[2].backends[0]`. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const part of path) {
    if (typeof part === "number") out += `[${part}]`;
    else out += out === "" ? String(part) : `.${String(part)}`;
  }
  return out === "" ? "(top level)" : out;
}

/** Splits `host:port` / `[v6]:port`; throws with a reason. */
function splitHostPort(text: string, minPort: number): { host: string; port: number } {
  let host: string;
  let portText: string;
  if (text.startsWith("[")) {
    const close = text.indexOf("]");
    if (close < 0 || text[close + 1] !== ":") throw new Error(`expected "[IPv6]:port"`);
    host = text.slice(1, close);
    portText = text.slice(close + 2);
    if (!isIpAddress(host) || !host.includes(":")) {
      throw new Error(`"${host}" is not an IPv6 address`);
    }
  } else {
    const colon = text.lastIndexOf(":");
    if (colon < 0) throw new Error(`expected "host:port"`);
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(":")) throw new Error(`IPv6 addresses need brackets: "[${host}]:port"`);
  }
  if (!/^[0-9]{1,5}$/.test(portText)) throw new Error(`port "${portText}" is not a number`);
  const port = Number(portText);
  if (port < minPort || port > 65535) throw new Error(`port out of range (${minPort}-65535)`);
  return { host, port };
}

const hostnameRe = /^(?=.{1,253}$)([a-zA-Z0-9_]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?\.?)+$/;

function parseBackend(text: string): BackendAddress {
  const { host, port } = splitHostPort(text, 1);
  if (host === "$sni") return { text, host: "", port, dynamic: true };
  if (!isIpAddress(host) && !hostnameRe.test(host)) {
    throw new Error(`"${host}" is not an IP address, a host name or $sni`);
  }
  return { text, host, port, dynamic: false };
}

function parseDefaultBackend(text: string): BackendAddress {
  const b = parseBackend(text);
  if (b.dynamic) throw new Error("default_backend cannot be $sni");
  return b;
}

function parseListener(text: string): { hostname: string; port: number } {
  const { host, port } = splitHostPort(text, 0);
  if (!isIpAddress(host)) throw new Error(`listener host must be an IP address, got "${host}"`);
  return { hostname: host, port };
}

/** `"IP"` (port 53) or `"IP:port"` / `"[IPv6]:port"`. */
function parseDnsServer(text: string): { ipAddr: string; port: number } {
  const { hostname, port } = text.includes("]") || /:\d+$/.test(text) && !text.includes("::")
    ? parseListener(text)
    : { hostname: text.replace(/^\[|\]$/g, ""), port: 53 };
  if (!isIpAddress(hostname)) throw new Error(`"${text}" is not an IP address`);
  if (port === 0) throw new Error("port out of range (1-65535)");
  return { ipAddr: hostname, port };
}

const tableNameRe = /^[A-Za-z0-9_-]{1,64}$/;

/**
 * Every error the schema cannot see: the meaning of string values (addresses, patterns, CIDRs)
 * and the rules between fields (`$sni` needs `allow`, TTL bounds, table names). Reads the raw
 * input leniently, skipping values of the wrong type (the schema reports those), so that one
 * run lists these errors together with the schema's.
 */
function semanticErrors(raw: unknown): string[] {
  const errors: string[] = [];
  const obj = (v: unknown): Record<string, unknown> =>
    v !== null && typeof v === "object" && !Array.isArray(v) ? v as Record<string, unknown> : {};
  const list = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);
  const fail = (where: PropertyKey[], message: string) =>
    errors.push(`${formatPath(where)}: ${message}`);
  const check = (where: PropertyKey[], value: unknown, f: (s: string) => unknown) => {
    if (typeof value !== "string") return;
    try {
      f(value);
    } catch (e) {
      fail(where, (e as Error).message);
    }
  };
  /** A backend's address text (`"host:port"` or `{ "address": … }`) and where it is. */
  const backendAt = (where: PropertyKey[], b: unknown): [PropertyKey[], unknown] =>
    typeof b === "string" ? [where, b] : [[...where, "address"], obj(b).address];
  const isDynamic = (b: unknown) => {
    const text = backendAt([], b)[1];
    try {
      return typeof text === "string" && parseBackend(text).dynamic;
    } catch {
      return false;
    }
  };
  const routeTable = (at: PropertyKey[], routes: unknown, defaultBackend: unknown) => {
    list(routes).forEach((r, i) => {
      const route = obj(r);
      check([...at, i, "match"], route.match, compilePattern);
      list(route.backends).forEach((b, j) =>
        check(...backendAt([...at, i, "backends", j], b), parseBackend)
      );
      list(route.allow).forEach((a, j) => check([...at, i, "allow", j], a, compilePattern));
      list(route.allow_addresses).forEach((c, j) =>
        check([...at, i, "allow_addresses", j], c, parseCidr)
      );
      const dynamic = list(route.backends).some(isDynamic);
      const noAllow = route.allow === undefined || list(route.allow).length === 0;
      if (dynamic && noAllow) {
        fail(
          [...at, i, "allow"],
          "a route with a $sni backend needs an allow list of name patterns " +
            "(otherwise it is an open proxy)",
        );
      }
      if (list(route.proxy_protocol_tlvs).length > 0 && route.proxy_protocol !== "v2") {
        fail(
          [...at, i, "proxy_protocol_tlvs"],
          'TLVs are part of PROXY protocol v2 only: set proxy_protocol to "v2"',
        );
      }
      const optIn = {
        allow_private: route.allow_private === true,
        allow_addresses: list(route.allow_addresses).length > 0,
      };
      for (const [key, set] of Object.entries(optIn)) {
        if (set && !dynamic) {
          fail(
            [...at, i, key],
            "only a route with a $sni backend can use it " +
              "(configured backends may be internal addresses anyway)",
          );
        }
      }
    });
    check([...at.slice(0, -1), "default_backend"], defaultBackend, parseDefaultBackend);
  };

  const top = obj(raw);
  const tables = obj(top.tables);
  const tableNames = [...new Set([DEFAULT_TABLE, ...Object.keys(tables)])];
  list(top.listeners).forEach((l, i) => {
    check(["listeners", i, "address"], obj(l).address, parseListener);
    list(obj(l).accept_proxy_protocol).forEach((c, j) =>
      check(["listeners", i, "accept_proxy_protocol", j], c, parseCidr)
    );
    const table = obj(l).table;
    if (typeof table === "string" && !tableNames.includes(table)) {
      fail(["listeners", i, "table"], `no table "${table}" (tables: ${tableNames.join(", ")})`);
    }
  });
  routeTable(["routes"], top.routes, top.default_backend);
  for (const [name, t] of Object.entries(tables)) {
    if (name === DEFAULT_TABLE) {
      fail(
        ["tables", name],
        `"${DEFAULT_TABLE}" is the table of the top-level routes and default_backend; ` +
          `use another name`,
      );
    } else if (!tableNameRe.test(name)) {
      fail(["tables", name], "a table name is 1-64 letters, digits, _ or -");
    }
    routeTable(["tables", name, "routes"], obj(t).routes, obj(t).default_backend);
  }
  for (const key of ["allow", "deny"]) {
    list(obj(top.acl)[key]).forEach((c, i) => check(["acl", key, i], c, parseCidr));
  }
  const perSource = obj(obj(top.limits).per_source);
  if (obj(top.limits).per_source !== undefined) {
    if (perSource.max_connections === undefined && perSource.new_per_second === undefined) {
      fail(["limits", "per_source"], "set max_connections, new_per_second or both");
    } else if (perSource.burst !== undefined && perSource.new_per_second === undefined) {
      fail(["limits", "per_source", "burst"], "a burst needs limits.per_source.new_per_second");
    }
  }
  check(["metrics", "address"], obj(top.metrics).address, parseListener);
  const dns = obj(top.dns);
  list(dns.servers).forEach((s, i) => check(["dns", "servers", i], s, parseDnsServer));
  const ttl = (key: keyof typeof DNS_TTL_DEFAULTS) =>
    dns[key] === undefined ? DNS_TTL_DEFAULTS[key] : dns[key];
  const [minTtl, maxTtl] = [ttl("min_ttl_s"), ttl("max_ttl_s")];
  if (typeof minTtl === "number" && typeof maxTtl === "number" && minTtl > maxTtl) {
    fail(["dns", "min_ttl_s"], `larger than dns.max_ttl_s (${minTtl} > ${maxTtl})`);
  }
  return errors;
}

/** Fields of a valid config that have no effect as set, each starting with its JSON path. */
function configWarnings(c: ConfigSource): string[] {
  const warnings: string[] = [];
  if (!c.ebpf.enabled) {
    const unused = [
      c.ebpf.sockmap_enabled && "ebpf.sockmap_enabled",
      c.ebpf.dns_cache_enabled && "ebpf.dns_cache_enabled",
      c.ebpf.xdp && "ebpf.xdp",
    ].filter((x) => x);
    for (const field of unused) {
      warnings.push(
        `${field}: ignored while ebpf.enabled is false (set ebpf.enabled to true to use it)`,
      );
    }
  }
  const workers = c.workers === "auto" ? navigator.hardwareConcurrency || 1 : c.workers;
  if (c.ebpf.enabled && c.ebpf.xdp?.block && workers > 1) {
    warnings.push(
      "ebpf.xdp.block: not enforced with more than one worker process (offences are counted " +
        "by the workers, the XDP maps belong to the supervisor); set workers to 1 to use it",
    );
  }
  // an HTTP request has no ALPN and no TLS fingerprint: such route fields cannot apply there
  for (const name of new Set(c.listeners.map((l) => l.table))) {
    if (c.listeners.some((l) => l.table === name && l.protocol === "tls")) continue;
    const at = name === DEFAULT_TABLE ? "routes" : `tables.${name}.routes`;
    const routes = name === DEFAULT_TABLE ? c.routes : c.tables[name]?.routes ?? [];
    routes.forEach((r, i) => {
      const fields = [r.alpn && "alpn", r.deny_fingerprints.length > 0 && "deny_fingerprints"];
      for (const field of fields.filter((f) => f)) {
        warnings.push(
          `${at}[${i}].${field}: only HTTP listeners serve this table, and an HTTP request ` +
            `has no ${field === "alpn" ? "ALPN (the route never matches)" : "TLS fingerprint"}`,
        );
      }
    });
  }
  const tables = [
    ["routes", c.routes] as const,
    ...Object.entries(c.tables).map(([n, t]) => [`tables.${n}.routes`, t.routes] as const),
  ];
  for (const [at, routes] of tables) {
    routes.forEach((r, i) => {
      if (r.backends.length > 0 && r.backends.every((b) => b.backup)) {
        warnings.push(
          `${at}[${i}].backends: every backend is a backup, so they serve as primaries ` +
            `(mark the ones to prefer without backup)`,
        );
      }
    });
  }
  for (const name of Object.keys(c.tables)) {
    if (!c.listeners.some((l) => l.table === name)) {
      warnings.push(`tables.${name}: no listener uses this table (listeners[].table)`);
    }
  }
  return warnings;
}

/** Where relative paths in a config resolve. */
export interface PathBase {
  /** For `log.file` and `log.access_log`: systemd's `$LOGS_DIRECTORY` (LogsDirectory=). */
  logsDirectory?: string | null;
  /** For `admin.socket`: systemd's `$RUNTIME_DIRECTORY` (RuntimeDirectory=). */
  runtimeDirectory?: string | null;
}

/** `p` against `dir` unless it is absolute. */
function against(dir: string, p: string): string {
  return p.startsWith("/") ? p : resolvePath(dir, p);
}

/**
 * Validates a parsed JSON value and resolves it. `path` is the file it came from: relative
 * paths in it resolve against its directory (log paths against `base.logsDirectory` when set).
 * Throws ConfigError listing every problem.
 */
export function resolveConfig(raw: unknown, path: string, base: PathBase = {}): Config {
  const parsed = schema.safeParse(raw);
  const errors = parsed.success
    ? []
    : parsed.error.issues.map((i) => `${formatPath(i.path)}: ${i.message}`);
  for (const e of semanticErrors(raw)) if (!errors.includes(e)) errors.push(e);
  if (!parsed.success || errors.length > 0) throw new ConfigError(path, errors);
  const c = parsed.data;

  const listeners: ListenerConfig[] = c.listeners.map((l) => ({
    address: l.address,
    protocol: l.protocol,
    ...parseListener(l.address),
    acceptProxyProtocol: l.accept_proxy_protocol.map(parseCidr),
    table: l.table,
  }));
  const routeTable = (
    at: PropertyKey[],
    routes: typeof c.routes,
    defaultBackend?: string,
  ): RouteTableConfig => ({
    routes: routes.map((r, i): RouteConfig => {
      const backends = r.backends.map((b): RouteBackend => ({
        ...parseBackend(b.address),
        weight: b.weight,
        backup: b.backup,
        maxConnections: b.max_connections ?? 0,
      }));
      const dynamic = backends.some((b) => b.dynamic);
      return {
        match: compilePattern(r.match),
        alpn: r.alpn ?? null,
        backends,
        balance: r.balance,
        allow: dynamic ? r.allow!.map(compilePattern) : null,
        internal: dynamic
          ? {
            allowPrivate: r.allow_private,
            allowAddresses: r.allow_addresses.map(parseCidr),
            path: formatPath([...at, i]),
          }
          : null,
        proxyProtocol: r.proxy_protocol ?? null,
        proxyTlvs: [...new Set(r.proxy_protocol_tlvs)],
        denyFingerprints: compileFingerprintPatterns(r.deny_fingerprints),
        health: {
          maxFails: r.health.max_fails,
          failTimeoutMs: r.health.fail_timeout_ms,
          active: r.health.check
            ? {
              intervalMs: r.health.check.interval_ms,
              timeoutMs: r.health.check.timeout_ms,
              rise: r.health.check.rise,
              fall: r.health.check.fall,
            }
            : null,
        },
      };
    }),
    defaultBackend: defaultBackend === undefined ? null : parseDefaultBackend(defaultBackend),
  });
  const tables: Record<string, RouteTableConfig> = {
    [DEFAULT_TABLE]: routeTable(["routes"], c.routes, c.default_backend),
  };
  for (const [name, t] of Object.entries(c.tables)) {
    tables[name] = routeTable(["tables", name, "routes"], t.routes, t.default_backend);
  }

  const absolute = resolvePath(path);
  const dir = dirname(absolute);
  const logDir = base.logsDirectory || dir;
  const rel = (p: string | false, from = dir) => (p === false ? null : against(from, p));
  return {
    path: absolute,
    source: c,
    warnings: configWarnings(c),
    workers: c.workers === "auto" ? Math.max(1, navigator.hardwareConcurrency || 1) : c.workers,
    listeners,
    routes: tables[DEFAULT_TABLE].routes,
    defaultBackend: tables[DEFAULT_TABLE].defaultBackend,
    tables,
    timeouts: {
      clientHelloMs: c.timeouts.client_hello_ms,
      connectMs: c.timeouts.connect_ms,
      idleMs: c.timeouts.idle_ms,
      drainMs: c.timeouts.drain_ms,
      stopDelayMs: c.timeouts.stop_delay_ms,
    },
    limits: {
      maxConnections: c.limits.max_connections,
      maxClientHelloBytes: c.limits.max_client_hello_bytes,
      perSource: c.limits.per_source
        ? {
          maxConnections: c.limits.per_source.max_connections ?? null,
          newPerSecond: c.limits.per_source.new_per_second ?? null,
          burst: c.limits.per_source.burst ??
            Math.max(1, Math.ceil(c.limits.per_source.new_per_second ?? 1)),
        }
        : null,
    },
    acl: {
      allow: c.acl.allow.map(parseCidr),
      deny: c.acl.deny.map(parseCidr),
      denyFingerprints: compileFingerprintPatterns(c.acl.deny_fingerprints),
    },
    log: {
      level: c.log.level,
      file: rel(c.log.file, logDir),
      accessLog: rel(c.log.access_log, logDir),
      maxFileBytes: c.log.max_file_bytes,
      maxFiles: c.log.max_files,
    },
    dns: {
      servers: c.dns.servers?.map(parseDnsServer) ?? null,
      minTtlMs: c.dns.min_ttl_s * 1000,
      maxTtlMs: c.dns.max_ttl_s * 1000,
      negativeTtlMs: c.dns.negative_ttl_s * 1000,
      cacheEntries: c.dns.cache_entries,
      timeoutMs: c.dns.timeout_ms,
      attempts: c.dns.attempts,
      hostsFile: rel(c.dns.hosts_file),
    },
    metrics: c.metrics === undefined
      ? null
      : { address: c.metrics.address, ...parseListener(c.metrics.address) },
    admin: c.admin === undefined ? null : {
      socket: against(base.runtimeDirectory || dir, c.admin.socket),
      group: c.admin.group ?? null,
    },
    ebpf: {
      enabled: c.ebpf.enabled,
      sockmapEnabled: c.ebpf.sockmap_enabled,
      dnsCacheEnabled: c.ebpf.dns_cache_enabled,
      // two entries per spliced connection; sockets also hold health checks and DNS over TCP
      maxPairs: c.ebpf.maps.pairs ?? Math.max(SOCKMAP_ENTRIES.min, 2 * c.limits.max_connections),
      maxSockets: c.ebpf.maps.sockets ??
        Math.max(SOCKMAP_ENTRIES.min, 2 * c.limits.max_connections + 1024),
      spliceMode: c.ebpf.splice_mode,
      pipeBytes: c.ebpf.pipe_bytes,
      sndbuf: c.ebpf.sndbuf,
      rcvbuf: c.ebpf.rcvbuf,
      drainTimeoutMs: c.ebpf.drain_timeout_ms,
      detachSpliced: c.ebpf.detach_spliced,
      object: c.ebpf.object === undefined ? null : rel(c.ebpf.object),
      xdp: c.ebpf.xdp
        ? {
          interfaces: c.ebpf.xdp.interfaces,
          mode: c.ebpf.xdp.mode,
          maxEntries: c.ebpf.xdp.max_entries,
          block: c.ebpf.xdp.block
            ? {
              after: c.ebpf.xdp.block.after,
              windowMs: c.ebpf.xdp.block.window_ms,
              blockMs: c.ebpf.xdp.block.block_ms,
              maxEntries: c.ebpf.xdp.block.max_entries,
            }
            : null,
        }
        : null,
    },
  };
}

/** Reads, parses and resolves a config file. Throws ConfigError (also for I/O and JSON errors). */
export async function loadConfig(path: string): Promise<Config> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new ConfigError(path, [`cannot read file: ${(e as Error).message}`]);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(path, [`not valid JSON: ${(e as Error).message}`]);
  }
  // systemd's LogsDirectory= / RuntimeDirectory= set them (several are separated by colons)
  const systemdDir = (name: string) => Deno.env.get(name)?.split(":")[0] || null;
  return resolveConfig(raw, path, {
    logsDirectory: systemdDir("LOGS_DIRECTORY"),
    runtimeDirectory: systemdDir("RUNTIME_DIRECTORY"),
  });
}

/** "3 route(s)", or with several tables served "5 route(s) in 2 tables". */
export function routeSummary(config: Config): string {
  const served = [...new Set(config.listeners.map((l) => l.table))];
  const routes = served.reduce((n, t) => n + config.tables[t].routes.length, 0);
  return served.length > 1 ? `${routes} route(s) in ${served.length} tables` : `${routes} route(s)`;
}

/** Fields a running process keeps until a restart; the rest of a reload applies. */
const RESTART_ONLY = ["workers", "listeners", "log", "metrics", "admin", "ebpf"] as const;
/** Fields inside those that a reload does apply. */
const RELOADABLE =
  /^(listeners\[\d+\]\.table|ebpf\.(dns_cache_enabled|drain_timeout_ms|detach_spliced))$/;

/** The JSON paths under `path` where `a` and `b` differ, skipping reloadable fields. */
function changedPaths(a: unknown, b: unknown, path: PropertyKey[], out: string[]): void {
  const where = formatPath(path);
  if (RELOADABLE.test(where)) return;
  const isObj = (v: unknown): v is Record<string, unknown> =>
    v !== null && typeof v === "object" && !Array.isArray(v);
  if (isObj(a) && isObj(b)) {
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
      changedPaths(a[k], b[k], [...path, k], out);
    }
  } else if (Array.isArray(a) && Array.isArray(b) && a.length === b.length) {
    a.forEach((x, i) => changedPaths(x, b[i], [...path, i], out));
  } else if (JSON.stringify(a) !== JSON.stringify(b)) {
    out.push(where);
  }
}

/**
 * What a process running `running` applies of a reloaded `next`: `next`, except that the
 * fields needing a restart (workers, listeners, log, metrics, admin, most of ebpf) keep their
 * running values; `ignored` names (as JSON paths) those of them that `next` changes, and `warnings`
 * has the lines to log: one naming them all, then `next`'s own warnings. A running listener
 * takes its `table` from the listener of `next` with the same address and protocol (the one
 * in the same place first). Throws a
 * ConfigError when a running listener would be left with a table `next` does not define.
 */
export function reloadable(
  running: Config,
  next: Config,
): { config: Config; ignored: string[]; warnings: string[] } {
  const ignored: string[] = [];
  for (const key of RESTART_ONLY) {
    if (key === "workers") {
      if (running.workers !== next.workers) ignored.push("workers");
    } else changedPaths(running.source[key], next.source[key], [key], ignored);
  }
  // the listener in the same place, else the first with its address (ports 0 repeat)
  const listeners = running.listeners.map((l, i) => {
    const same = (n?: ListenerConfig) => n?.address === l.address && n.protocol === l.protocol;
    const match = same(next.listeners[i]) ? next.listeners[i] : next.listeners.find(same);
    return match ? { ...l, table: match.table } : l;
  });
  const orphans = listeners.filter((l) => !(l.table in next.tables)).map((l) =>
    `listeners: the running listener ${l.address} serves table "${l.table}", which ` +
    `${next.path} no longer defines (a changed listener needs a restart)`
  );
  if (orphans.length > 0) throw new ConfigError(next.path, orphans);
  const source = { ...next.source };
  for (const key of ["workers", "listeners", "log", "metrics", "admin"] as const) {
    (source as Record<string, unknown>)[key] = running.source[key];
  }
  const { dns_cache_enabled, drain_timeout_ms, detach_spliced } = next.source.ebpf;
  source.ebpf = { ...running.source.ebpf, dns_cache_enabled, drain_timeout_ms, detach_spliced };
  const config: Config = {
    ...next,
    source,
    workers: running.workers,
    listeners,
    log: running.log,
    metrics: running.metrics,
    admin: running.admin,
    ebpf: {
      ...running.ebpf,
      dnsCacheEnabled: next.ebpf.dnsCacheEnabled,
      drainTimeoutMs: next.ebpf.drainTimeoutMs,
      detachSpliced: next.ebpf.detachSpliced,
    },
  };
  const warnings = ignored.length > 0
    ? [`reload: these changes need a restart and were not applied: ${ignored.join(", ")}`]
    : [];
  return { config, ignored, warnings: [...warnings, ...next.warnings] };
}
