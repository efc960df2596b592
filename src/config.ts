/**
 * Config file: JSON validated against a schema, then resolved into the typed form the
 * proxy runs on. Every error carries the JSON path of the bad field.
 *
 * @module
 */
import { z } from "zod";
import { type Cidr, isIpAddress, parseCidr } from "./acl.ts";
import { compilePattern, type NamePattern } from "./router.ts";

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
  backends: BackendAddress[];
  balance: Balance;
  /** Required for dynamic backends: names they may connect to. */
  allow: NamePattern[] | null;
  /** PROXY protocol header to send to the backend before the client's bytes. */
  proxyProtocol: "v1" | "v2" | null;
  health: HealthConfig;
}

/** The resolved, validated config the proxy runs on. */
export interface Config {
  /** Absolute path of the file it came from. */
  path: string;
  /** Proxy processes sharing the listeners (SO_REUSEPORT); 1: a single process, no supervisor. */
  workers: number;
  listeners: ListenerConfig[];
  routes: RouteConfig[];
  defaultBackend: BackendAddress | null;
  timeouts: { clientHelloMs: number; connectMs: number; idleMs: number; drainMs: number };
  limits: { maxConnections: number; maxClientHelloBytes: number };
  acl: { allow: Cidr[]; deny: Cidr[] };
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
  ebpf: {
    enabled: boolean;
    sockmapEnabled: boolean;
    dnsCacheEnabled: boolean;
    /** Capacity of the pairing map (2 entries per spliced connection). */
    maxPairs: number;
    /** Capacity of the sockhash (one entry per proxy socket). */
    maxSockets: number;
    /** Bytes a spliced direction may hold for its peer before it is relayed with flow control. */
    maxBufferedBytes: number;
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
    xdp: { interfaces: string[]; mode: "auto" | "native" | "generic"; maxEntries: number } | null;
  };
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
const pathOrOff = (def: string) =>
  z.union([z.string().min(1), z.literal(false)], { error: "expected a file path or false" })
    .default(def);

const schema = z.strictObject({
  workers: z.union([z.literal("auto"), z.number().int().min(1).max(256)], {
    error: 'expected "auto" or a whole number from 1 to 256',
  }).default("auto"),
  listeners: z.array(z.strictObject({
    address: z.string(),
    protocol: z.enum(["tls", "http"]).default("tls"),
    accept_proxy_protocol: z.array(z.string()).default([]),
  })).min(1, { error: "at least one listener is required" }),
  routes: z.array(z.strictObject({
    match: z.string(),
    backends: z.array(z.string()).min(1, { error: "at least one backend is required" }),
    balance: z.enum(["round_robin", "random", "least_conn", "source_hash"]).default(
      "round_robin",
    ),
    allow: z.array(z.string()).optional(),
    proxy_protocol: z.enum(["v1", "v2"]).optional(),
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
  })),
  default_backend: z.string().optional(),
  timeouts: z.strictObject({
    client_hello_ms: ms(10_000),
    connect_ms: ms(5_000),
    idle_ms: ms(300_000),
    drain_ms: ms(30_000),
  }).prefault({}),
  limits: z.strictObject({
    max_connections: z.number().int().min(1).max(1_000_000).default(10_000),
    max_client_hello_bytes: z.number().int().min(512).max(1_048_576).default(16_384),
  }).prefault({}),
  acl: z.strictObject({
    allow: z.array(z.string()).default([]),
    deny: z.array(z.string()).default([]),
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
    min_ttl_s: z.number().int().min(0).max(86_400).default(5),
    max_ttl_s: z.number().int().min(1).max(604_800).default(3600),
    negative_ttl_s: z.number().int().min(0).max(86_400).default(10),
    cache_entries: z.number().int().min(16).max(16_777_216).default(4096),
    timeout_ms: ms(2_000),
    attempts: z.number().int().min(1).max(10).default(2),
    hosts_file: pathOrOff("/etc/hosts"),
  }).prefault({}),
  metrics: z.strictObject({ address: z.string() }).optional(),
  ebpf: z.strictObject({
    enabled: z.boolean().default(false),
    sockmap_enabled: z.boolean().default(false),
    dns_cache_enabled: z.boolean().default(false),
    // default: room for limits.max_connections spliced connections (see resolveConfig)
    maps: z.strictObject({
      pairs: z.number().int().min(64).max(16_777_216).optional(),
      sockets: z.number().int().min(64).max(16_777_216).optional(),
    }).prefault({}),
    max_buffered_bytes: z.number().int().min(65_536).max(1 << 30).default(4 << 20),
    sndbuf: z.number().int().min(0).max(1 << 30).default(0),
    rcvbuf: z.number().int().min(0).max(1 << 30).default(0),
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
      max_entries: z.number().int().min(1).max(1_048_576).default(16_384),
    }).optional(),
  }).prefault({}),
});

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

function parseListener(text: string): { hostname: string; port: number } {
  const { host, port } = splitHostPort(text, 0);
  if (!isIpAddress(host)) throw new Error(`listener host must be an IP address, got "${host}"`);
  return { hostname: host, port };
}

/**
 * Checks the string values whose meaning the schema cannot see (addresses, patterns, CIDRs)
 * wherever they are strings, on input that failed the schema: each error with its path.
 */
function valueErrors(raw: unknown): string[] {
  const errors: string[] = [];
  const obj = (v: unknown): Record<string, unknown> =>
    v !== null && typeof v === "object" && !Array.isArray(v) ? v as Record<string, unknown> : {};
  const list = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);
  const check = (where: PropertyKey[], value: unknown, f: (s: string) => unknown) => {
    if (typeof value !== "string") return;
    try {
      f(value);
    } catch (e) {
      errors.push(`${formatPath(where)}: ${(e as Error).message}`);
    }
  };
  const top = obj(raw);
  list(top.listeners).forEach((l, i) => {
    check(["listeners", i, "address"], obj(l).address, parseListener);
    list(obj(l).accept_proxy_protocol).forEach((c, j) =>
      check(["listeners", i, "accept_proxy_protocol", j], c, parseCidr)
    );
  });
  list(top.routes).forEach((r, i) => {
    check(["routes", i, "match"], obj(r).match, compilePattern);
    list(obj(r).backends).forEach((b, j) => check(["routes", i, "backends", j], b, parseBackend));
    list(obj(r).allow).forEach((a, j) => check(["routes", i, "allow", j], a, compilePattern));
  });
  check(["default_backend"], top.default_backend, parseBackend);
  for (const key of ["allow", "deny"]) {
    list(obj(top.acl)[key]).forEach((c, i) => check(["acl", key, i], c, parseCidr));
  }
  check(["metrics", "address"], obj(top.metrics).address, parseListener);
  return errors;
}

/**
 * Validates a parsed JSON value and resolves it. `path` is the file it came from (relative
 * log paths are resolved against its directory). Throws ConfigError listing every problem.
 */
export function resolveConfig(raw: unknown, path: string): Config {
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    // list the value errors of the fields that are well-typed too, so one --check shows all
    const errors = parsed.error.issues.map((i) => `${formatPath(i.path)}: ${i.message}`);
    for (const e of valueErrors(raw)) if (!errors.includes(e)) errors.push(e);
    throw new ConfigError(path, errors);
  }
  const c = parsed.data;
  const errors: string[] = [];
  const at = <T>(where: PropertyKey[], f: () => T): T | undefined => {
    try {
      return f();
    } catch (e) {
      errors.push(`${formatPath(where)}: ${(e as Error).message}`);
      return undefined;
    }
  };

  const listeners = c.listeners.map((l, i) => {
    const a = at(["listeners", i, "address"], () => parseListener(l.address));
    const trusted = l.accept_proxy_protocol.map((t, j) =>
      at(["listeners", i, "accept_proxy_protocol", j], () => parseCidr(t))
    ).filter((x): x is Cidr => x !== undefined);
    return {
      address: l.address,
      protocol: l.protocol,
      hostname: a?.hostname ?? "",
      port: a?.port ?? 0,
      acceptProxyProtocol: trusted,
    };
  });
  const routes: RouteConfig[] = c.routes.map((r, i) => {
    const backends = r.backends.map((b, j) =>
      at(["routes", i, "backends", j], () => parseBackend(b))
    )
      .filter((b): b is BackendAddress => b !== undefined);
    const dynamic = backends.some((b) => b.dynamic);
    if (dynamic && (!r.allow || r.allow.length === 0)) {
      errors.push(
        `${formatPath(["routes", i, "allow"])}: a route with a $sni backend needs an allow list ` +
          `of name patterns (otherwise it is an open proxy)`,
      );
    }
    const allow = r.allow?.map((p, j) => at(["routes", i, "allow", j], () => compilePattern(p)))
      .filter((p): p is NamePattern => p !== undefined) ?? null;
    return {
      match: at(["routes", i, "match"], () => compilePattern(r.match)) ?? compilePattern("*"),
      backends,
      balance: r.balance,
      allow: dynamic ? allow : null,
      proxyProtocol: r.proxy_protocol ?? null,
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
  });
  const defaultBackend = c.default_backend === undefined ? null : at(["default_backend"], () => {
    const b = parseBackend(c.default_backend!);
    if (b.dynamic) throw new Error("default_backend cannot be $sni");
    return b;
  }) ?? null;
  const cidrs = (list: string[], key: string) =>
    list.map((t, i) => at(["acl", key, i], () => parseCidr(t)))
      .filter((x): x is Cidr => x !== undefined);
  const acl = { allow: cidrs(c.acl.allow, "allow"), deny: cidrs(c.acl.deny, "deny") };
  const metrics = c.metrics === undefined ? null : at(
    ["metrics", "address"],
    () => ({ address: c.metrics!.address, ...parseListener(c.metrics!.address) }),
  ) ??
    null;

  const servers = c.dns.servers?.map((text, i) =>
    at(["dns", "servers", i], () => {
      const { hostname, port } = text.includes("]") || /:\d+$/.test(text) && !text.includes("::")
        ? parseListener(text)
        : { hostname: text.replace(/^\[|\]$/g, ""), port: 53 };
      if (!isIpAddress(hostname)) throw new Error(`"${text}" is not an IP address`);
      if (port === 0) throw new Error("port out of range (1-65535)");
      return { ipAddr: hostname, port };
    })
  ).filter((x): x is { ipAddr: string; port: number } => x !== undefined) ?? null;
  if (c.dns.min_ttl_s > c.dns.max_ttl_s) {
    errors.push("dns.min_ttl_s: larger than dns.max_ttl_s");
  }

  if (errors.length > 0) throw new ConfigError(path, errors);
  const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/") + 1) : "";
  const rel = (p: string | false) => (p === false ? null : p.startsWith("/") ? p : dir + p);
  return {
    path,
    workers: c.workers === "auto" ? Math.max(1, navigator.hardwareConcurrency || 1) : c.workers,
    listeners,
    routes,
    defaultBackend,
    timeouts: {
      clientHelloMs: c.timeouts.client_hello_ms,
      connectMs: c.timeouts.connect_ms,
      idleMs: c.timeouts.idle_ms,
      drainMs: c.timeouts.drain_ms,
    },
    limits: {
      maxConnections: c.limits.max_connections,
      maxClientHelloBytes: c.limits.max_client_hello_bytes,
    },
    acl,
    log: {
      level: c.log.level,
      file: rel(c.log.file),
      accessLog: rel(c.log.access_log),
      maxFileBytes: c.log.max_file_bytes,
      maxFiles: c.log.max_files,
    },
    dns: {
      servers,
      minTtlMs: c.dns.min_ttl_s * 1000,
      maxTtlMs: c.dns.max_ttl_s * 1000,
      negativeTtlMs: c.dns.negative_ttl_s * 1000,
      cacheEntries: c.dns.cache_entries,
      timeoutMs: c.dns.timeout_ms,
      attempts: c.dns.attempts,
      hostsFile: c.dns.hosts_file === false ? null : c.dns.hosts_file,
    },
    metrics,
    ebpf: {
      enabled: c.ebpf.enabled,
      sockmapEnabled: c.ebpf.sockmap_enabled,
      dnsCacheEnabled: c.ebpf.dns_cache_enabled,
      // two entries per spliced connection; sockets also hold health checks and DNS over TCP
      maxPairs: c.ebpf.maps.pairs ?? Math.max(64, 2 * c.limits.max_connections),
      maxSockets: c.ebpf.maps.sockets ?? Math.max(64, 2 * c.limits.max_connections + 1024),
      maxBufferedBytes: c.ebpf.max_buffered_bytes,
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
  return resolveConfig(raw, path);
}
