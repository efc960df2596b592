/**
 * What the schema cannot judge: errors in the meaning of string values and between fields, and
 * warnings about fields that are valid but have no effect as set. Each starts with its JSON path.
 *
 * @module
 */
import { parseCidr } from "../route/acl.ts";
import { compilePattern } from "../route/router.ts";
import {
  formatPath,
  parseBackend,
  parseDefaultBackend,
  parseDnsServer,
  parseListener,
} from "./address.ts";
import { type ConfigSource, DEFAULT_TABLE, DNS_TTL_DEFAULTS } from "./schema.ts";

/** The raw input read leniently: a value of another type reads as empty (the schema says why). */
const obj = (v: unknown): Record<string, unknown> =>
  v !== null && typeof v === "object" && !Array.isArray(v) ? v as Record<string, unknown> : {};
const list = (v: unknown): unknown[] => (Array.isArray(v) ? v : []);

const tableNameRe = /^[A-Za-z0-9_-]{1,64}$/;

/** Errors found so far, each with its JSON path. */
class Errors {
  readonly found: string[] = [];

  fail(where: PropertyKey[], message: string): void {
    this.found.push(`${formatPath(where)}: ${message}`);
  }

  /** Parses `value` when it is a string (the schema reports other types); records a throw. */
  check(where: PropertyKey[], value: unknown, parse: (s: string) => unknown): void {
    if (typeof value !== "string") return;
    try {
      parse(value);
    } catch (e) {
      this.fail(where, (e as Error).message);
    }
  }
}

/** A backend's address text (`"host:port"` or `{ "address": ... }`) and where it is. */
function backendAt(where: PropertyKey[], b: unknown): [PropertyKey[], unknown] {
  return typeof b === "string" ? [where, b] : [[...where, "address"], obj(b).address];
}

function isDynamic(b: unknown): boolean {
  const text = backendAt([], b)[1];
  try {
    return typeof text === "string" && parseBackend(text).dynamic;
  } catch {
    return false;
  }
}

/** The route at `at`: its patterns, backends and CIDRs, and the rules between its fields. */
function routeErrors(errors: Errors, at: PropertyKey[], route: Record<string, unknown>): void {
  errors.check([...at, "match"], route.match, compilePattern);
  list(route.backends).forEach((b, j) =>
    errors.check(...backendAt([...at, "backends", j], b), parseBackend)
  );
  list(route.allow).forEach((a, j) => errors.check([...at, "allow", j], a, compilePattern));
  list(route.allow_addresses).forEach((c, j) =>
    errors.check([...at, "allow_addresses", j], c, parseCidr)
  );
  const dynamic = list(route.backends).some(isDynamic);
  if (dynamic && list(route.allow).length === 0) {
    errors.fail(
      [...at, "allow"],
      "a route with a $sni backend needs an allow list of name patterns " +
        "(otherwise it is an open proxy)",
    );
  }
  if (list(route.proxy_protocol_tlvs).length > 0 && route.proxy_protocol !== "v2") {
    errors.fail(
      [...at, "proxy_protocol_tlvs"],
      'TLVs are part of PROXY protocol v2 only: set proxy_protocol to "v2"',
    );
  }
  const optIn = {
    allow_private: route.allow_private === true,
    allow_addresses: list(route.allow_addresses).length > 0,
  };
  for (const [key, set] of Object.entries(optIn)) {
    if (set && !dynamic) {
      errors.fail(
        [...at, key],
        "only a route with a $sni backend can use it " +
          "(configured backends may be internal addresses anyway)",
      );
    }
  }
}

/** The routes at `at` (`routes`, `tables.NAME.routes`) and the table's default_backend. */
function tableErrors(errors: Errors, at: PropertyKey[], routes: unknown, defaultBackend: unknown) {
  list(routes).forEach((r, i) => routeErrors(errors, [...at, i], obj(r)));
  errors.check([...at.slice(0, -1), "default_backend"], defaultBackend, parseDefaultBackend);
}

/** Listener addresses and CIDRs, and the table each one names. */
function listenerErrors(errors: Errors, top: Record<string, unknown>): void {
  const tableNames = [...new Set([DEFAULT_TABLE, ...Object.keys(obj(top.tables))])];
  list(top.listeners).forEach((l, i) => {
    errors.check(["listeners", i, "address"], obj(l).address, parseListener);
    list(obj(l).accept_proxy_protocol).forEach((c, j) =>
      errors.check(["listeners", i, "accept_proxy_protocol", j], c, parseCidr)
    );
    if (obj(l).protocol === "quic" && list(obj(l).accept_proxy_protocol).length > 0) {
      errors.fail(
        ["listeners", i, "accept_proxy_protocol"],
        "a QUIC listener reads no PROXY header (its clients' datagrams come as they are)",
      );
    }
    const table = obj(l).table;
    if (typeof table === "string" && !tableNames.includes(table)) {
      errors.fail(
        ["listeners", i, "table"],
        `no table "${table}" (tables: ${tableNames.join(", ")})`,
      );
    }
  });
}

/** Every route table: the top-level one, and each of `tables` with its name. */
function routeTablesErrors(errors: Errors, top: Record<string, unknown>): void {
  tableErrors(errors, ["routes"], top.routes, top.default_backend);
  for (const [name, t] of Object.entries(obj(top.tables))) {
    if (name === DEFAULT_TABLE) {
      errors.fail(
        ["tables", name],
        `"${DEFAULT_TABLE}" is the table of the top-level routes and default_backend; ` +
          `use another name`,
      );
    } else if (!tableNameRe.test(name)) {
      errors.fail(["tables", name], "a table name is 1-64 letters, digits, _ or -");
    }
    tableErrors(errors, ["tables", name, "routes"], obj(t).routes, obj(t).default_backend);
  }
}

/** The ACL's CIDRs, per_source's rules, the metrics address, DNS servers and TTL bounds. */
function sectionErrors(errors: Errors, top: Record<string, unknown>): void {
  for (const key of ["allow", "deny"]) {
    list(obj(top.acl)[key]).forEach((c, i) => errors.check(["acl", key, i], c, parseCidr));
  }
  const perSource = obj(obj(top.limits).per_source);
  if (obj(top.limits).per_source !== undefined) {
    if (perSource.max_connections === undefined && perSource.new_per_second === undefined) {
      errors.fail(["limits", "per_source"], "set max_connections, new_per_second or both");
    } else if (perSource.burst !== undefined && perSource.new_per_second === undefined) {
      errors.fail(
        ["limits", "per_source", "burst"],
        "a burst needs limits.per_source.new_per_second",
      );
    }
  }
  errors.check(["metrics", "address"], obj(top.metrics).address, parseListener);
  const dns = obj(top.dns);
  list(dns.servers).forEach((s, i) => errors.check(["dns", "servers", i], s, parseDnsServer));
  const ttl = (key: keyof typeof DNS_TTL_DEFAULTS) =>
    dns[key] === undefined ? DNS_TTL_DEFAULTS[key] : dns[key];
  const [minTtl, maxTtl] = [ttl("min_ttl_s"), ttl("max_ttl_s")];
  if (typeof minTtl === "number" && typeof maxTtl === "number" && minTtl > maxTtl) {
    errors.fail(["dns", "min_ttl_s"], `larger than dns.max_ttl_s (${minTtl} > ${maxTtl})`);
  }
}

/**
 * Every error the schema cannot see: the meaning of string values (addresses, patterns, CIDRs)
 * and the rules between fields (`$sni` needs `allow`, TTL bounds, table names). Reads the raw
 * input leniently, skipping values of the wrong type (the schema reports those), so that one
 * run lists these errors together with the schema's.
 */
export function semanticErrors(raw: unknown): string[] {
  const errors = new Errors();
  const top = obj(raw);
  listenerErrors(errors, top);
  routeTablesErrors(errors, top);
  sectionErrors(errors, top);
  return errors.found;
}

/** `ebpf.*` features set while ebpf is off, and a block several workers cannot enforce. */
function ebpfWarnings(c: ConfigSource): string[] {
  const warnings: string[] = [];
  if (!c.ebpf.enabled) {
    const unused = [
      c.ebpf.sockmap_enabled && "ebpf.sockmap_enabled",
      c.ebpf.dns_cache_enabled && "ebpf.dns_cache_enabled",
      c.ebpf.xdp && "ebpf.xdp",
      c.ebpf.quic && "ebpf.quic",
    ].filter((x) => x);
    for (const field of unused) {
      warnings.push(
        `${field}: ignored while ebpf.enabled is false (set ebpf.enabled to true to use it)`,
      );
    }
  }
  if (c.ebpf.detach_spliced !== undefined) {
    warnings.push(
      "ebpf.detach_spliced: has no effect (the proxy owns its sockets and watches them on its " +
        "own epoll in every mode); remove it",
    );
  }
  return warnings;
}

/** Each route table's routes with the JSON path of the list. */
function routeLists(c: ConfigSource): [string, ConfigSource["routes"]][] {
  return [
    ["routes", c.routes],
    ...Object.entries(c.tables).map(([n, t]): [string, ConfigSource["routes"]] => [
      `tables.${n}.routes`,
      t.routes,
    ]),
  ];
}

/** Route fields an HTTP request cannot meet (no ALPN, no TLS fingerprint) in HTTP-only tables. */
function httpTableWarnings(c: ConfigSource): string[] {
  const warnings: string[] = [];
  for (const name of new Set(c.listeners.map((l) => l.table))) {
    if (c.listeners.some((l) => l.table === name && l.protocol !== "http")) continue;
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
  return warnings;
}

/**
 * Route fields a QUIC flow cannot use, in tables only QUIC listeners serve: a PROXY header
 * (datagrams are forwarded as they are) and active checks (TCP connects, which a UDP-only
 * backend fails).
 */
function quicTableWarnings(c: ConfigSource): string[] {
  const warnings: string[] = [];
  for (const name of new Set(c.listeners.map((l) => l.table))) {
    if (c.listeners.some((l) => l.table === name && l.protocol !== "quic")) continue;
    const at = name === DEFAULT_TABLE ? "routes" : `tables.${name}.routes`;
    const routes = name === DEFAULT_TABLE ? c.routes : c.tables[name]?.routes ?? [];
    routes.forEach((r, i) => {
      if (r.proxy_protocol) {
        warnings.push(
          `${at}[${i}].proxy_protocol: only QUIC listeners serve this table, and a QUIC flow ` +
            `is forwarded as it is, without a PROXY header`,
        );
      }
      if (r.health.check) {
        warnings.push(
          `${at}[${i}].health.check: only QUIC listeners serve this table; the active checks ` +
            `are TCP connects, which a UDP-only backend fails (passive health applies to QUIC)`,
        );
      }
    });
  }
  return warnings;
}

/** Fields of a valid config that have no effect as set, each starting with its JSON path. */
export function configWarnings(c: ConfigSource): string[] {
  const warnings = [...ebpfWarnings(c), ...httpTableWarnings(c), ...quicTableWarnings(c)];
  for (const [at, routes] of routeLists(c)) {
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
