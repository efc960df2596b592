/**
 * The config file's schema: every field once, with its type, bounds and default, keyed as in the
 * JSON. What it parses is {@link ConfigSource}; resolve.ts turns that into the `Config` the proxy
 * runs on (the same fields in camelCase, with values converted where the proxy needs another form).
 *
 * @module
 */
import { z } from "zod";
import {
  DNS_CACHE_ENTRIES,
  QUIC_DEFAULT_FLOWS,
  QUIC_FLOWS,
  SOCKET_BUFFER_BYTES,
  SOCKMAP_ENTRIES,
  XDP_DEFAULT_BLOCK_ENTRIES,
  XDP_DEFAULT_ENTRIES,
  XDP_ENTRIES,
} from "../ebpf/bounds.ts";

/** The name of the route table made of the top-level `routes` and `default_backend`. */
export const DEFAULT_TABLE = "default";

/** `admin.socket` when the admin section does not say (relative: see resolve.ts). */
export const DEFAULT_ADMIN_SOCKET = "sni-proxy-admin.sock";

/** Defaults a cross-field check needs when the field is absent. */
export const DNS_TTL_DEFAULTS = { min_ttl_s: 5, max_ttl_s: 3600 };

/** A duration in ms, 1 ms to a day. */
const ms = (def: number) => z.number().int().min(1).max(86_400_000).default(def);
/** A file path, or `false` for none. */
const pathOrOff = (def: string) =>
  z.union([z.string().min(1), z.literal(false)], { error: "expected a file path or false" })
    .default(def);
/** A whole number within one of the shared bounds (see src/ebpf/bounds.ts). */
const within = (range: { min: number; max: number }) =>
  z.number().int().min(range.min).max(range.max);

/** A backend: `"host:port"`, or the same as `address` with its weight, backup role and limit. */
const backendSchema = z.preprocess(
  (v) => (typeof v === "string" ? { address: v } : v),
  z.strictObject({
    /** `host:port`, `[v6]:port` or `$sni:port` (the host the client asked for). */
    address: z.string(),
    /** Relative share of the route's connections. */
    weight: z.number().int().min(1).max(1000).default(1),
    /** Used only while every primary (non-backup) backend of the route is down. */
    backup: z.boolean().default(false),
    /** Live connections it takes at most (absent: no limit); a full backend is skipped. */
    max_connections: z.number().int().min(1).max(1_000_000).optional(),
  }, {
    error: (issue) =>
      issue.code === "invalid_type"
        ? 'expected "host:port" or { "address": "host:port", ... }'
        : undefined,
  }),
);

/** JA4 / JA3 fingerprints, `*` matching any run of characters. */
const fingerprintsSchema = z.array(
  z.string().regex(/^[a-z0-9_*]{1,64}$/, {
    error: "not a JA4 or JA3 fingerprint (lower-case letters, digits, _ and * only)",
  }),
).default([]);

/** A route's backend health settings. */
export const healthSchema = z.strictObject({
  /** Consecutive failed connects that mark a backend down (passive check). */
  max_fails: z.number().int().min(1).max(1000).default(3),
  /** How long a passively failed backend stays down. */
  fail_timeout_ms: ms(10_000),
  /** Active TCP connect checks; absent: none. */
  check: z.strictObject({
    interval_ms: ms(2_000),
    timeout_ms: ms(1_000),
    /** Consecutive successes that bring a backend back up. */
    rise: z.number().int().min(1).max(100).default(2),
    /** Consecutive failures that take it down. */
    fall: z.number().int().min(1).max(100).default(3),
  }).optional(),
}).prefault({});

/** A route: names it serves and the backends it sends them to. */
const routeSchema = z.strictObject({
  /** A name, a `*.` wildcard, `*`, or `~regex`. */
  match: z.string(),
  /** ALPN protocols of which the client must offer one; absent: any hello. */
  alpn: z.array(z.string().min(1).max(255)).min(1, { error: "at least one protocol" })
    .optional(),
  backends: z.array(backendSchema).min(1, { error: "at least one backend is required" }),
  /** How the route picks one of its backends. */
  balance: z.enum(["round_robin", "random", "least_conn", "source_hash"]).default(
    "round_robin",
  ),
  /** Required for `$sni` backends: the names they may connect to. */
  allow: z.array(z.string()).optional(),
  /** `$sni` backends only: every internal address may be dialled. */
  allow_private: z.boolean().default(false),
  /** `$sni` backends only: internal addresses in these CIDRs may be dialled. */
  allow_addresses: z.array(z.string()).default([]),
  /** PROXY protocol header to send to the backend before the client's bytes. */
  proxy_protocol: z.enum(["v1", "v2"]).optional(),
  /** TLVs to add to a v2 header. */
  proxy_protocol_tlvs: z.array(z.enum(["authority", "alpn", "unique_id"])).default([]),
  /** Clients whose TLS fingerprint matches are refused. */
  deny_fingerprints: fingerprintsSchema,
  health: healthSchema,
});

/** A route table: ordered routes and the backend for names none of them takes. */
const tableSchema = z.strictObject({
  routes: z.array(routeSchema),
  default_backend: z.string().optional(),
});

/** A listening socket. */
const listenerSchema = z.strictObject({
  /** `IP:port` or `[IPv6]:port`. */
  address: z.string(),
  /** `quic`: UDP, routed by the SNI of the client's QUIC Initial packets. */
  protocol: z.enum(["tls", "http", "quic"]).default("tls"),
  /** Sources (CIDRs) trusted to send a PROXY protocol header first. */
  accept_proxy_protocol: z.array(z.string()).default([]),
  /** The name of the route table it serves (`default`: the top-level routes). */
  table: z.string().default(DEFAULT_TABLE),
});

const timeoutsSchema = z.strictObject({
  client_hello_ms: ms(10_000),
  connect_ms: ms(5_000),
  idle_ms: ms(300_000),
  drain_ms: ms(30_000),
  /**
   * A refused client's lingering close: after the refusal and a FIN, what it still sends is
   * read and dropped for up to this long, so its unread bytes do not turn the close into a reset
   * that discards the refusal; 0: closed at once.
   */
  linger_ms: z.number().int().min(0).max(600_000).default(5_000),
  /** After SIGTERM, how long /healthz answers 503 while the listeners still accept. */
  stop_delay_ms: z.number().int().min(0).max(600_000).default(0),
});

const limitsSchema = z.strictObject({
  max_connections: z.number().int().min(1).max(1_000_000).default(10_000),
  max_client_hello_bytes: z.number().int().min(512).max(1_048_576).default(16_384),
  /** Refused clients in their lingering close at once; more are closed at once. */
  max_lingering: z.number().int().min(1).max(1_000_000).default(1024),
  /** Per client address, checked at accept; absent: no such limit. */
  per_source: z.strictObject({
    max_connections: z.number().int().min(1).max(1_000_000).optional(),
    new_per_second: z.number().gt(0).max(1_000_000).optional(),
    /** Default: new_per_second rounded up. */
    burst: z.number().int().min(1).max(1_000_000).optional(),
  }).optional(),
});

/** QUIC listeners' flows (see src/conn/quic_listener.ts). */
const quicSchema = z.strictObject({
  /** A flow with no datagram either way for this long ends (QUIC's default idle timeout). */
  idle_ms: ms(30_000),
  /** Flows at once, in all (with workers: shared out evenly). */
  max_flows: z.number().int().min(1).max(1_000_000).default(10_000),
  /** Flows one client address may hold at once; absent: no such limit. */
  max_flows_per_source: z.number().int().min(1).max(1_000_000).optional(),
  /** Flows whose ClientHello is not whole yet, at once; the oldest gives way to a new one. */
  max_pending_flows: z.number().int().min(1).max(1_000_000).default(1024),
  /** Datagrams one flow may have buffered before its ClientHello is whole and routed. */
  max_pending_datagrams: z.number().int().min(1).max(1024).default(16),
  /** Bytes of those buffered datagrams. */
  max_pending_bytes: z.number().int().min(1200).max(1_048_576).default(65_536),
}).prefault({});

const aclSchema = z.strictObject({
  /** When non-empty, only these CIDRs may connect. */
  allow: z.array(z.string()).default([]),
  deny: z.array(z.string()).default([]),
  deny_fingerprints: fingerprintsSchema,
});

const logSchema = z.strictObject({
  level: z.enum(["debug", "info", "warning", "error"]).default("info"),
  /** Relative: against `$LOGS_DIRECTORY`, else the config's directory. */
  file: pathOrOff("logs/sni-proxy.log"),
  access_log: pathOrOff("logs/access.log"),
  max_file_bytes: z.number().int().min(4096).default(10 * 1024 * 1024),
  max_files: z.number().int().min(1).max(1000).default(5),
});

/** Backend name resolution and its cache. */
const dnsSchema = z.strictObject({
  /** `IP` or `IP:port`; absent: the nameservers of /etc/resolv.conf. */
  servers: z.array(z.string()).min(1).optional(),
  min_ttl_s: z.number().int().min(0).max(86_400).default(DNS_TTL_DEFAULTS.min_ttl_s),
  max_ttl_s: z.number().int().min(1).max(604_800).default(DNS_TTL_DEFAULTS.max_ttl_s),
  negative_ttl_s: z.number().int().min(0).max(86_400).default(10),
  cache_entries: within(DNS_CACHE_ENTRIES).default(4096),
  timeout_ms: ms(2_000),
  attempts: z.number().int().min(1).max(10).default(2),
  /** Relative: against the config's directory. */
  hosts_file: pathOrOff("/etc/hosts"),
});

/** The admin API's UNIX socket. */
const adminSchema = z.strictObject({
  /** Relative: against `$RUNTIME_DIRECTORY`, else the config's directory. */
  socket: z.string().min(1).default(DEFAULT_ADMIN_SOCKET),
  /** The group that may use it besides the owner (a name or a gid); absent: the owner only. */
  group: z.union([z.string().regex(/^[a-z_][a-z0-9_.-]*\$?$/i), z.number().int().min(0)], {
    error: "expected a group name or a numeric gid",
  }).optional(),
});

/** XDP source filtering from the ACL. */
const xdpSchema = z.strictObject({
  interfaces: z.array(
    z.string().regex(/^[a-zA-Z0-9_.:@-]{1,15}$/, {
      error: "not an interface name",
    }),
  ).min(1),
  mode: z.enum(["auto", "native", "generic"]).default("auto"),
  /** Capacity of each trie (deny/allow x IPv4/IPv6). */
  max_entries: within(XDP_ENTRIES).default(XDP_DEFAULT_ENTRIES),
  /**
   * Temporary XDP blocks of misbehaving sources: a source with `after` offences (per-source
   * limit refusals, bad hellos) within `window_ms` is dropped for `block_ms`; at most
   * `max_entries` sources at once.
   */
  block: z.strictObject({
    after: z.number().int().min(1).max(1_000_000).default(10),
    window_ms: ms(10_000),
    block_ms: ms(60_000),
    max_entries: within(XDP_ENTRIES).default(XDP_DEFAULT_BLOCK_ENTRIES),
  }).optional(),
});

const ebpfSchema = z.strictObject({
  enabled: z.boolean().default(false),
  sockmap_enabled: z.boolean().default(false),
  dns_cache_enabled: z.boolean().default(false),
  /** Default: room for limits.max_connections spliced connections (see resolve.ts). */
  maps: z.strictObject({
    /** Capacity of the pairing map (2 entries per spliced connection). */
    pairs: within(SOCKMAP_ENTRIES).optional(),
    /** Capacity of the sockhash (one entry per proxy socket). */
    sockets: within(SOCKMAP_ENTRIES).optional(),
  }).prefault({}),
  /**
   * How kernel mode moves a pair's bytes: `pipe` (splice(2) through a pipe, with TCP flow
   * control) or `sockmap` (the eBPF redirect: no syscall per chunk, but no backpressure).
   */
  splice_mode: z.enum(["pipe", "sockmap"]).default("pipe"),
  /** Pipe mode: the capacity of each direction's pipe (bytes held between the sockets). */
  pipe_bytes: z.number().int().min(4096).max(1 << 20).default(256 * 1024),
  /** SO_SNDBUF / SO_RCVBUF of spliced sockets; 0 keeps the kernel's autotuning. */
  sndbuf: within(SOCKET_BUFFER_BYTES).default(0),
  rcvbuf: within(SOCKET_BUFFER_BYTES).default(0),
  /** How long a closing spliced side waits for the kernel's redirect queue to drain. */
  drain_timeout_ms: ms(5_000),
  /**
   * No effect any more (the proxy owns its sockets, on its own epoll, in every mode): accepted
   * so that older configs still load, with a warning.
   */
  detach_spliced: z.boolean().optional(),
  /** A BPF object file to load instead of the bundled one (relative: the config's directory). */
  object: z.string().min(1).optional(),
  xdp: xdpSchema.optional(),
  /**
   * Kernel forwarding of routed QUIC flows (a tc program on these interfaces, see
   * src/ebpf/quic.ts); absent: QUIC flows are forwarded in userspace.
   */
  quic: z.strictObject({
    /** Interfaces the flows' datagrams arrive on, client and backend side (`lo` for local). */
    interfaces: z.array(
      z.string().regex(/^[a-zA-Z0-9_.:@-]{1,15}$/, { error: "not an interface name" }),
    ).min(1),
    /** Flows in the kernel at most (two map entries each); more stay in userspace, counted. */
    max_flows: within(QUIC_FLOWS).default(QUIC_DEFAULT_FLOWS),
  }).optional(),
});

/** The config file. */
export const configSchema = z.strictObject({
  /** Proxy processes sharing the listeners (SO_REUSEPORT); `auto`: one per CPU. */
  workers: z.union([z.literal("auto"), z.number().int().min(1).max(256)], {
    error: 'expected "auto" or a whole number from 1 to 256',
  }).default("auto"),
  listeners: z.array(listenerSchema).min(1, { error: "at least one listener is required" }),
  /** The default table's routes. */
  routes: z.array(routeSchema),
  default_backend: z.string().optional(),
  /** Further route tables by name, for listeners[].table. */
  tables: z.record(z.string(), tableSchema).default({}),
  timeouts: timeoutsSchema.prefault({}),
  limits: limitsSchema.prefault({}),
  quic: quicSchema,
  acl: aclSchema.prefault({}),
  log: logSchema.prefault({}),
  dns: dnsSchema.prefault({}),
  /** The metrics endpoint (`IP:port`); absent: off. */
  metrics: z.strictObject({ address: z.string() }).optional(),
  /** Absent: no admin API. */
  admin: adminSchema.optional(),
  ebpf: ebpfSchema.prefault({}),
});

/** A config file's values with their defaults filled in, keyed as in the JSON. */
export type ConfigSource = z.output<typeof configSchema>;
