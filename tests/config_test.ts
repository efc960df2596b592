import assert from "node:assert/strict";
import { ConfigError, reloadable, resolveConfig } from "../src/config/mod.ts";

const base = {
  listeners: [{ address: "127.0.0.1:8443" }],
  routes: [{ match: "a.test", backends: ["127.0.0.1:9443"] }],
};

function errorsOf(raw: unknown): string[] {
  try {
    resolveConfig(raw, "/etc/sni/config.json");
  } catch (e) {
    assert.ok(e instanceof ConfigError, `expected ConfigError, got ${e}`);
    return e.errors;
  }
  assert.fail("config was accepted");
}

/** Asserts that `errors` has one starting with each of `prefixes`. */
function assertErrors(errors: string[], prefixes: string[]): void {
  for (const e of prefixes) {
    assert.ok(errors.some((x) => x.startsWith(e)), `missing "${e}" in:\n${errors.join("\n")}`);
  }
}

Deno.test("a minimal config gets the documented defaults", () => {
  const c = resolveConfig(base, "/etc/sni/config.json");
  assert.equal(c.listeners[0].protocol, "tls");
  assert.equal(c.listeners[0].hostname, "127.0.0.1");
  assert.equal(c.listeners[0].port, 8443);
  assert.deepEqual(c.timeouts, {
    clientHelloMs: 10000,
    connectMs: 5000,
    idleMs: 300000,
    drainMs: 30000,
    lingerMs: 5000,
    stopDelayMs: 0,
  });
  assert.equal(c.limits.maxClientHelloBytes, 16384);
  assert.equal(c.limits.maxLingering, 1024);
  assert.equal(c.routes[0].balance, "round_robin");
  assert.equal(c.log.file, "/etc/sni/logs/sni-proxy.log", "relative to the config's directory");
  assert.equal(c.log.accessLog, "/etc/sni/logs/access.log");
  assert.equal(c.ebpf.enabled, false);
  assert.equal(c.workers, navigator.hardwareConcurrency, "workers: one per CPU");
});

Deno.test("workers: auto, a number, or an error naming the field", () => {
  assert.equal(
    resolveConfig({ ...base, workers: "auto" }, "/c.json").workers,
    navigator.hardwareConcurrency,
  );
  assert.equal(resolveConfig({ ...base, workers: 3 }, "/c.json").workers, 3);
  for (const bad of [0, 1.5, 257, "many", null]) {
    const errors = errorsOf({ ...base, workers: bad });
    assert.equal(errors.length, 1, JSON.stringify(errors));
    assert.match(
      errors[0],
      /^workers: (expected "auto" or a whole number from 1 to 256|Too small: expected number to be >=1|Too big: expected number to be <=256)$/,
      `${bad}`,
    );
  }
});

Deno.test("IPv6 listeners and backends, hostnames and $sni parse", () => {
  const c = resolveConfig({
    listeners: [{ address: "[::]:8443", protocol: "http" }],
    routes: [
      { match: "*.b.test", backends: ["[::1]:443", "backend.local:9443"] },
      { match: "*", backends: ["$sni:443"], allow: ["*.internal.test"] },
    ],
    default_backend: "10.0.0.1:443",
  }, "c.json");
  assert.equal(c.listeners[0].hostname, "::");
  assert.deepEqual(c.routes[0].backends.map((b) => [b.host, b.port, b.dynamic]), [
    ["::1", 443, false],
    ["backend.local", 9443, false],
  ]);
  assert.equal(c.routes[1].backends[0].dynamic, true);
  assert.equal(c.routes[1].allow?.[0].test("x.internal.test"), true);
  assert.equal(c.defaultBackend?.port, 443);
});

Deno.test("every error names the JSON path of the bad field, all at once", () => {
  const errors = errorsOf({
    listeners: [{ address: "127.0.0.1:99999" }],
    routes: [
      { match: "a.test", backends: ["127.0.0.1:443"] },
      { match: "~([", backends: ["127.0.0.1:0", "::1:443"] },
      { match: "*", backends: ["$sni:443"] },
    ],
    acl: { deny: ["10.0.0.0/33", "not-an-ip"] },
    default_backend: "nope",
  });
  const expect = [
    "listeners[0].address: port out of range (0-65535)",
    "routes[1].match: bad regular expression",
    "routes[1].backends[0]: port out of range (1-65535)",
    "routes[1].backends[1]: IPv6 addresses need brackets",
    "routes[2].allow: a route with a $sni backend needs an allow list",
    "acl.deny[0]: prefix length must be 0-32",
    'acl.deny[1]: not an IP address: "not-an-ip"',
    'default_backend: expected "host:port"',
  ];
  assertErrors(errors, expect);
});

Deno.test("schema errors name their path: types, enums, unknown keys, missing fields", () => {
  const errors = errorsOf({
    listeners: [{ address: 8443, protocol: "udp" }],
    routes: [{ match: "a.test", backends: [], balance: "fastest" }],
    timeouts: { idle_ms: -1 },
    limits: { max_conections: 5 },
    ebpf: { detach_spliced: "yes" },
  });
  for (
    const path of [
      "listeners[0].address:",
      "listeners[0].protocol:",
      "routes[0].backends:",
      "routes[0].balance:",
      "timeouts.idle_ms:",
      "limits:",
      "ebpf.detach_spliced:",
    ]
  ) {
    assert.ok(
      errors.some((x) => x.startsWith(path)),
      `no error at ${path} in:\n${errors.join("\n")}`,
    );
  }
  assert.ok(errors.some((x) => x.includes("max_conections")), "the unknown key is named");
  assert.ok(errorsOf({ routes: [] }).some((x) => x.startsWith("listeners:")));
});

Deno.test("schema errors and cross-field errors are listed together, in one run", () => {
  const errors = errorsOf({
    listeners: [{ address: "127.0.0.1:8443", table: "htp" }],
    routes: [
      { match: "a.test", backends: ["127.0.0.1:1"], balance: "fastest" },
      { match: "*", backends: ["$sni:443"] },
    ],
    default_backend: "$sni:443",
    timeouts: { idle_ms: "soon" },
    dns: { min_ttl_s: 600, max_ttl_s: 60, servers: ["not-an-ip"] },
  });
  const expect = [
    // the schema's
    "routes[0].balance:",
    "timeouts.idle_ms:",
    // the rules between fields, and values the schema cannot judge
    "routes[1].allow: a route with a $sni backend needs an allow list",
    "default_backend: default_backend cannot be $sni",
    "dns.min_ttl_s: larger than dns.max_ttl_s (600 > 60)",
    'dns.servers[0]: "not-an-ip" is not an IP address',
    'listeners[0].table: no table "htp" (tables: default)',
  ];
  assertErrors(errors, expect);
  assert.equal(new Set(errors).size, errors.length, `an error is listed twice:\n${errors}`);
  // a default the file leaves out still takes part: max_ttl_s defaults to 3600
  assert.ok(
    errorsOf({ ...base, dns: { min_ttl_s: 7200 } }).includes(
      "dns.min_ttl_s: larger than dns.max_ttl_s (7200 > 3600)",
    ),
  );
});

Deno.test("relative paths resolve against the config's directory, logs against LOGS_DIRECTORY", () => {
  const c = resolveConfig({
    ...base,
    dns: { hosts_file: "hosts.d/backends" },
    ebpf: { object: "bpf/custom.bpf.o" },
  }, "/etc/sni/config.json");
  assert.equal(c.dns.hostsFile, "/etc/sni/hosts.d/backends");
  assert.equal(c.ebpf.object, "/etc/sni/bpf/custom.bpf.o");
  assert.equal(resolveConfig(base, "/etc/sni/config.json").dns.hostsFile, "/etc/hosts");
  // a config named relative to the working directory still gives absolute paths
  const here = resolveConfig({ ...base, dns: { hosts_file: "hosts" } }, "conf/c.json");
  assert.equal(here.path, `${Deno.cwd()}/conf/c.json`);
  assert.equal(here.dns.hostsFile, `${Deno.cwd()}/conf/hosts`);
  // systemd's LogsDirectory= (as $LOGS_DIRECTORY) is where relative log paths go
  const unit = resolveConfig(base, "/etc/sni/config.json", { logsDirectory: "/var/log/sni" });
  assert.equal(unit.log.file, "/var/log/sni/logs/sni-proxy.log");
  assert.equal(unit.log.accessLog, "/var/log/sni/logs/access.log");
  assert.equal(unit.dns.hostsFile, "/etc/hosts", "only the log paths move");
  const absolute = resolveConfig(
    { ...base, log: { file: "/srv/log/p.log", access_log: false } },
    "/etc/sni/config.json",
    { logsDirectory: "/var/log/sni" },
  );
  assert.equal(absolute.log.file, "/srv/log/p.log");
  assert.equal(absolute.log.accessLog, null);
});

Deno.test("admin: off unless set; socket relative to RUNTIME_DIRECTORY or the config; a group", () => {
  assert.equal(resolveConfig(base, "/etc/sni/config.json").admin, null);
  const here = resolveConfig({ ...base, admin: {} }, "/etc/sni/config.json");
  assert.deepEqual(here.admin, { socket: "/etc/sni/sni-proxy-admin.sock", group: null });
  const unit = resolveConfig({ ...base, admin: { group: "sni-ops" } }, "/etc/sni/config.json", {
    runtimeDirectory: "/run/sni-proxy",
  });
  assert.deepEqual(unit.admin, { socket: "/run/sni-proxy/sni-proxy-admin.sock", group: "sni-ops" });
  const gid = resolveConfig({ ...base, admin: { socket: "/run/a.sock", group: 0 } }, "/c.json");
  assert.deepEqual(gid.admin, { socket: "/run/a.sock", group: 0 });
  const errors = errorsOf({ ...base, admin: { socket: "", group: "no way", port: 1 } });
  for (const p of ["admin.socket", "admin.group", "admin"]) {
    assert.ok(errors.some((e) => e.startsWith(`${p}: `)), `${p} in ${errors.join("\n")}`);
  }
  // a running admin socket stays until a restart
  const next = resolveConfig({ ...base, admin: { socket: "/run/b.sock" } }, "/c.json");
  const r = reloadable(gid, next);
  assert.deepEqual(r.ignored, ["admin.socket", "admin.group"]);
  assert.deepEqual(r.config.admin, gid.admin);
});

Deno.test("ebpf features set while ebpf.enabled is false are warned about, not ignored silently", () => {
  const xdp = { interfaces: ["lo"] };
  const off = resolveConfig(
    { ...base, ebpf: { enabled: false, sockmap_enabled: true, xdp } },
    "/c.json",
  );
  assert.deepEqual(off.warnings, [
    "ebpf.sockmap_enabled: ignored while ebpf.enabled is false (set ebpf.enabled to true to use it)",
    "ebpf.xdp: ignored while ebpf.enabled is false (set ebpf.enabled to true to use it)",
  ]);
  assert.deepEqual(
    resolveConfig({ ...base, ebpf: { enabled: true, xdp } }, "/c.json").warnings,
    [],
  );
  assert.deepEqual(resolveConfig(base, "/c.json").warnings, []);
});

Deno.test("route tables: listeners[].table picks one, routes is the default table", () => {
  const c = resolveConfig({
    listeners: [
      { address: "127.0.0.1:8443" },
      { address: "127.0.0.1:8080", protocol: "http", table: "plain" },
    ],
    routes: [{ match: "a.test", backends: ["127.0.0.1:9443"] }],
    default_backend: "127.0.0.1:9444",
    tables: {
      plain: { routes: [{ match: "a.test", backends: ["127.0.0.1:9080"] }] },
      spare: { routes: [], default_backend: "127.0.0.1:9" },
    },
  }, "/c.json");
  assert.deepEqual(c.listeners.map((l) => l.table), ["default", "plain"]);
  assert.equal(c.tables.default.routes, c.routes);
  assert.equal(c.tables.default.defaultBackend?.text, "127.0.0.1:9444");
  assert.equal(c.tables.plain.routes[0].backends[0].text, "127.0.0.1:9080");
  assert.equal(c.tables.plain.defaultBackend, null, "a table has its own default_backend");
  assert.equal(c.tables.spare.defaultBackend?.port, 9);
  assert.deepEqual(c.warnings, ["tables.spare: no listener uses this table (listeners[].table)"]);

  const errors = errorsOf({
    ...base,
    listeners: [{ address: "127.0.0.1:1", table: "nope" }],
    tables: {
      default: { routes: [] },
      "bad name": { routes: [] },
      t: {
        routes: [{ match: "*", backends: ["$sni:443"] }, { match: "x", backends: ["h:0"] }],
        default_backend: "nowhere",
      },
    },
  });
  assertErrors(errors, [
    'listeners[0].table: no table "nope" (tables: default, bad name, t)',
    'tables.default: "default" is the table of the top-level routes',
    "tables.bad name: a table name is 1-64 letters, digits, _ or -",
    "tables.t.routes[0].allow: a route with a $sni backend needs an allow list",
    "tables.t.routes[1].backends[0]: port out of range",
    'tables.t.default_backend: expected "host:port"',
  ]);
});

Deno.test("a reload names every field it cannot apply and keeps their running values", () => {
  const running = resolveConfig({
    ...base,
    listeners: [{ address: "127.0.0.1:8443" }, { address: "127.0.0.1:8080", protocol: "http" }],
    log: { level: "info" },
    ebpf: { maps: { pairs: 1024 } },
  }, "/c.json");
  const next = resolveConfig({
    ...base,
    workers: running.workers + 1,
    listeners: [
      { address: "127.0.0.1:9443" },
      { address: "127.0.0.1:8080", protocol: "http", table: "plain" },
    ],
    routes: [{ match: "b.test", backends: ["127.0.0.1:1"] }],
    tables: { plain: { routes: [] } },
    log: { level: "debug" },
    metrics: { address: "127.0.0.1:9090" },
    timeouts: { idle_ms: 5 },
    ebpf: {
      maps: { pairs: 2048 },
      sndbuf: 65536,
      detach_spliced: false,
      drain_timeout_ms: 700,
      xdp: { interfaces: ["lo"] },
    },
  }, "/c.json");
  const { config, ignored, warnings } = reloadable(running, next);
  assert.deepEqual(ignored, [
    "workers",
    "listeners[0].address",
    "log.level",
    "metrics",
    "ebpf.maps.pairs",
    "ebpf.sndbuf",
    "ebpf.xdp",
  ]);
  assert.equal(
    warnings[0],
    "reload: these changes need a restart and were not applied: workers, listeners[0].address, " +
      "log.level, metrics, ebpf.maps.pairs, ebpf.sndbuf, ebpf.xdp",
  );
  assert.ok(warnings.some((w) => w.startsWith("ebpf.xdp: ignored while ebpf.enabled is false")));
  // applied: routes, tables, timeouts, the listener's table, the per-connection ebpf fields
  assert.equal(config.routes[0].match.text, "b.test");
  assert.equal(config.timeouts.idleMs, 5);
  assert.deepEqual(config.listeners.map((l) => [l.address, l.table]), [
    ["127.0.0.1:8443", "default"],
    ["127.0.0.1:8080", "plain"],
  ]);
  assert.equal(config.ebpf.drainTimeoutMs, 700);
  assert.ok(
    warnings.some((w) => w.startsWith("ebpf.detach_spliced: has no effect")),
    "a config that still sets ebpf.detach_spliced is told it has no effect",
  );
  // kept: what needs a restart
  assert.equal(config.workers, running.workers);
  assert.equal(config.log.level, "info");
  assert.equal(config.metrics, null);
  assert.equal(config.ebpf.maxPairs, 1024);
  assert.equal(config.ebpf.xdp, null);
  // and the next reload compares against what runs, so it warns again
  assert.deepEqual(reloadable(config, next).ignored, ignored);
  assert.deepEqual(reloadable(running, running).warnings, []);

  // a running listener whose table the new config drops cannot be served: the reload fails
  const onPlain = { ...next, listeners: [next.listeners[1]] };
  const dropped = resolveConfig({ ...base, listeners: [{ address: "127.0.0.1:8080" }] }, "/c.json");
  assert.throws(
    () => reloadable(onPlain, dropped),
    (e: unknown) =>
      e instanceof ConfigError &&
      /running listener 127\.0\.0\.1:8080 serves table "plain"/.test(e.errors[0]),
  );
});

/**
 * Config paths named in messages and docs (`ebpf.maps.sockets`, `routes[].allow`) must exist:
 * each is set in a config, and the schema must not call it an unknown key.
 */
Deno.test("every config field that a message or the README names exists", async () => {
  const root = new URL("..", import.meta.url).pathname;
  const sources = [await Deno.readTextFile(`${root}README.md`)];
  const readTree = async (dir: string) => {
    for (const f of Deno.readDirSync(dir)) {
      if (f.isDirectory) await readTree(`${dir}/${f.name}`);
      else sources.push(await Deno.readTextFile(`${dir}/${f.name}`));
    }
  };
  await readTree(`${root}src`);
  const sections =
    "workers|listeners|routes|tables|timeouts|limits|quic|acl|log|dns|metrics|admin|ebpf";
  // inside string literals or `code` spans only: code such as config.dns.servers is not a name
  const literal = /"[^"\n]*"|'[^'\n]*'|`[^`\n]*`/g;
  const path = new RegExp(`(?<![\\w.$/-])(${sections})((?:\\[\\d*\\])?\\.[a-z_]+)+`, "g");
  const named = new Set<string>();
  for (const text of sources) {
    for (const lit of text.match(literal) ?? []) {
      for (const m of lit.replace(/\$\{[^}]*\}/g, "").matchAll(path)) named.add(m[0]);
    }
  }
  assert.ok(named.has("ebpf.maps.sockets") && named.has("routes[].allow"), [...named].join(" "));
  const unknown = [...named].filter((p) => {
    // build { a: [{ b: { c: null } }] } for a[].b.c
    const keys = p.split(".").flatMap((k) =>
      k.endsWith("]") ? [k.replace(/\[\d*\]$/, ""), 0] : [k]
    );
    const raw: Record<string, unknown> = {};
    let at: Record<string | number, unknown> = raw;
    keys.forEach((k, i) => {
      if (i === keys.length - 1) at[k] = null;
      else at = (at[k] = typeof keys[i + 1] === "number" ? [] : {}) as typeof at;
    });
    let errors: string[] = [];
    try {
      resolveConfig(raw, "/c.json");
    } catch (e) {
      errors = (e as ConfigError).errors;
    }
    const last = keys.at(-1) as string;
    return errors.some((e) => /Unrecognized key/.test(e) && e.includes(`"${last}"`));
  });
  assert.deepEqual(unknown, [], "named in a message or the README, but not a config field");
});

Deno.test("allow_private and allow_addresses: $sni routes only, CIDRs with their paths", () => {
  const c = resolveConfig({
    ...base,
    routes: [
      { match: "a.test", backends: ["127.0.0.1:9443"] },
      {
        match: "*.x.test",
        backends: ["$sni:443"],
        allow: ["*.x.test"],
        allow_addresses: ["10.1.0.0/16", "fd00::/8"],
      },
      { match: "*", backends: ["$sni:443"], allow: ["*.y.test"], allow_private: true },
    ],
  }, "c.json");
  assert.equal(c.routes[0].internal, null, "configured backends have no policy");
  assert.deepEqual(c.routes[1].internal?.allowAddresses.map((a) => a.text), [
    "10.1.0.0/16",
    "fd00::/8",
  ]);
  assert.equal(c.routes[1].internal?.allowPrivate, false, "internal addresses refused by default");
  assert.equal(c.routes[1].internal?.path, "routes[1]");
  assert.equal(c.routes[2].internal?.allowPrivate, true);
  // in a named table, the path that log lines point the operator to is the table's
  const named = resolveConfig({
    ...base,
    listeners: [{ address: "127.0.0.1:8443", table: "edge" }],
    tables: {
      edge: { routes: [{ match: "*", backends: ["$sni:443"], allow: ["*"], allow_private: true }] },
    },
  }, "c.json");
  assert.equal(named.tables.edge.routes[0].internal?.path, "tables.edge.routes[0]");

  const errors = errorsOf({
    ...base,
    routes: [
      { match: "a.test", backends: ["127.0.0.1:9443"], allow_private: true },
      { match: "b.test", backends: ["127.0.0.1:9443"], allow_addresses: ["10.0.0.0/8"] },
      {
        match: "*",
        backends: ["$sni:443"],
        allow: ["*.x.test"],
        allow_addresses: ["10.0.0.0/33", "nope"],
      },
    ],
  });
  assertErrors(errors, [
    "routes[0].allow_private: only a route with a $sni backend can use it",
    "routes[1].allow_addresses: only a route with a $sni backend can use it",
    "routes[2].allow_addresses[0]: prefix length must be 0-32",
    'routes[2].allow_addresses[1]: not an IP address: "nope"',
  ]);
  // a schema error elsewhere still lists the bad CIDR, and a non-boolean allow_private
  const both = errorsOf({
    ...base,
    routes: [{
      match: "*",
      backends: ["$sni:443"],
      allow: ["*.x.test"],
      allow_private: "yes",
      allow_addresses: ["nope"],
    }],
  });
  assert.ok(both.some((x) => x.startsWith("routes[0].allow_private:")), both.join("\n"));
  assert.ok(both.some((x) => x.startsWith("routes[0].allow_addresses[0]:")), both.join("\n"));
});

Deno.test("alpn, weighted/backup/limited backends and deny_fingerprints: values and paths", () => {
  const c = resolveConfig({
    ...base,
    routes: [
      { match: "a.test", alpn: ["acme-tls/1"], backends: ["127.0.0.1:9001"] },
      {
        match: "a.test",
        backends: [
          "127.0.0.1:9002",
          { address: "[::1]:9003", weight: 3, max_connections: 100 },
          { address: "backup.test:9004", backup: true },
        ],
        deny_fingerprints: ["t13d1516h2_8daaf6152771_*"],
      },
    ],
    acl: { deny_fingerprints: ["0149f47eabf9a20d0893e2a44e5a6323"] },
  }, "/c.json");
  assert.deepEqual(c.routes[0].alpn, ["acme-tls/1"]);
  assert.equal(c.routes[1].alpn, null, "no alpn: any hello");
  assert.deepEqual(
    c.routes[1].backends.map((b) => [b.text, b.host, b.weight, b.backup, b.maxConnections]),
    [
      ["127.0.0.1:9002", "127.0.0.1", 1, false, 0],
      ["[::1]:9003", "::1", 3, false, 100],
      ["backup.test:9004", "backup.test", 1, true, 0],
    ],
  );
  assert.deepEqual(c.routes[1].denyFingerprints?.texts, ["t13d1516h2_8daaf6152771_*"]);
  assert.equal(c.routes[0].denyFingerprints, null);
  assert.deepEqual(c.acl.denyFingerprints?.texts, ["0149f47eabf9a20d0893e2a44e5a6323"]);

  const errors = errorsOf({
    ...base,
    routes: [{
      match: "a.test",
      alpn: [""],
      backends: [
        { address: "127.0.0.1:0", weight: 0 },
        { address: "$sni:443", backup: "yes", max_connections: 0 },
        { weight: 2 },
        { address: "127.0.0.1:1", priority: 1 },
        7,
      ],
      deny_fingerprints: ["T13D*"],
    }, { match: "b.test", alpn: [], backends: ["127.0.0.1:1"] }],
    acl: { deny_fingerprints: ["ja4 with spaces"] },
  });
  const expect = [
    "routes[0].alpn[0]:",
    "routes[0].backends[0].weight:",
    "routes[0].backends[0].address: port out of range (1-65535)",
    "routes[0].backends[1].backup:",
    "routes[0].backends[1].max_connections:",
    "routes[0].allow: a route with a $sni backend needs an allow list",
    "routes[0].backends[2].address:",
    'routes[0].backends[3]: Unrecognized key: "priority"',
    'routes[0].backends[4]: expected "host:port" or',
    "routes[0].deny_fingerprints[0]: not a JA4 or JA3 fingerprint",
    "routes[1].alpn: at least one protocol",
    "acl.deny_fingerprints[0]: not a JA4 or JA3 fingerprint",
  ];
  assertErrors(errors, expect);
});

Deno.test("alpn and deny_fingerprints on a table only HTTP listeners serve are warned about", () => {
  const c = resolveConfig({
    listeners: [
      { address: "127.0.0.1:8443" },
      { address: "127.0.0.1:8080", protocol: "http", table: "plain" },
    ],
    routes: [{ match: "a.test", alpn: ["h2"], backends: ["127.0.0.1:9443"] }],
    tables: {
      plain: {
        routes: [{
          match: "a.test",
          alpn: ["h2"],
          deny_fingerprints: ["t13*"],
          backends: ["127.0.0.1:9080"],
        }],
      },
    },
  }, "/c.json");
  assert.deepEqual(c.warnings.map((w) => w.split(":")[0]), [
    "tables.plain.routes[0].alpn",
    "tables.plain.routes[0].deny_fingerprints",
  ]);
});

Deno.test("the README's example config is valid", async () => {
  const readme = await Deno.readTextFile(new URL("../README.md", import.meta.url));
  const section = readme.slice(readme.indexOf("## Config reference"));
  const example = /```json\n([\s\S]*?)\n```/.exec(section)![1];
  const c = resolveConfig(JSON.parse(example), "/etc/sni-proxy/config.json");
  assert.deepEqual(c.routes[0].alpn, ["acme-tls/1"]);
  assert.ok(c.routes[2].backends.some((b) => b.backup));
});

Deno.test("proxy_protocol_tlvs: v2 only, known TLVs, each once", () => {
  const c = resolveConfig({
    ...base,
    routes: [{
      match: "a.test",
      backends: ["127.0.0.1:1"],
      proxy_protocol: "v2",
      proxy_protocol_tlvs: ["unique_id", "authority", "unique_id"],
    }],
  }, "/c.json");
  assert.deepEqual(c.routes[0].proxyTlvs, ["unique_id", "authority"]);
  assert.deepEqual(resolveConfig(base, "/c.json").routes[0].proxyTlvs, []);
  const errors = errorsOf({
    ...base,
    routes: [
      { match: "a.test", backends: ["127.0.0.1:1"], proxy_protocol_tlvs: ["authority"] },
      {
        match: "b.test",
        backends: ["127.0.0.1:1"],
        proxy_protocol: "v1",
        proxy_protocol_tlvs: ["alpn"],
      },
      {
        match: "c.test",
        backends: ["127.0.0.1:1"],
        proxy_protocol: "v2",
        proxy_protocol_tlvs: ["netns"],
      },
    ],
  });
  assertErrors(errors, [
    'routes[0].proxy_protocol_tlvs: TLVs are part of PROXY protocol v2 only: set proxy_protocol to "v2"',
    "routes[1].proxy_protocol_tlvs: TLVs are part of PROXY protocol v2 only",
    "routes[2].proxy_protocol_tlvs[0]:",
  ]);
});

Deno.test("limits.per_source: values, the burst's default, and errors with their paths", () => {
  const at = (per_source: unknown) =>
    resolveConfig({ ...base, limits: { per_source } }, "/c.json").limits.perSource;
  assert.equal(resolveConfig(base, "/c.json").limits.perSource, null);
  assert.deepEqual(at({ max_connections: 50 }), {
    maxConnections: 50,
    newPerSecond: null,
    burst: 1,
  });
  assert.deepEqual(at({ new_per_second: 2.5 }), {
    maxConnections: null,
    newPerSecond: 2.5,
    burst: 3,
  });
  assert.equal(at({ new_per_second: 10, burst: 40 })?.burst, 40);
  assertErrors(errorsOf({ ...base, limits: { per_source: {} } }), [
    "limits.per_source: set max_connections, new_per_second or both",
  ]);
  assertErrors(errorsOf({ ...base, limits: { per_source: { max_connections: 5, burst: 9 } } }), [
    "limits.per_source.burst: a burst needs limits.per_source.new_per_second",
  ]);
  assertErrors(
    errorsOf({ ...base, limits: { per_source: { new_per_second: 0, max_connections: 1.5 } } }),
    ["limits.per_source.new_per_second:", "limits.per_source.max_connections:"],
  );
});

Deno.test("a route whose backends are all backups is warned about", () => {
  const c = resolveConfig({
    ...base,
    routes: [{ match: "a.test", backends: [{ address: "127.0.0.1:1", backup: true }] }],
  }, "/c.json");
  assert.deepEqual(c.warnings.map((w) => w.split(":")[0]), ["routes[0].backends"]);
  assert.deepEqual(resolveConfig(base, "/c.json").warnings, []);
});

Deno.test("ebpf.xdp.block: defaults, and no warning with several workers (they report)", () => {
  const xdp = { interfaces: ["lo"], block: {} };
  const one = resolveConfig({ ...base, workers: 1, ebpf: { enabled: true, xdp } }, "/c.json");
  assert.deepEqual(one.ebpf.xdp?.block, {
    after: 10,
    windowMs: 10_000,
    blockMs: 60_000,
    maxEntries: 4096,
  });
  assert.deepEqual(one.warnings, []);
  const many = resolveConfig({ ...base, workers: 2, ebpf: { enabled: true, xdp } }, "/c.json");
  assert.deepEqual(many.warnings, [], "workers report their offences to the supervisor");
  assert.equal(
    resolveConfig({ ...base, ebpf: { enabled: true, xdp: { interfaces: ["lo"] } } }, "/c.json")
      .ebpf.xdp?.block,
    null,
  );
  assert.throws(
    () =>
      resolveConfig(
        { ...base, ebpf: { enabled: true, xdp: { ...xdp, block: { after: 0 } } } },
        "/c.json",
      ),
    /ebpf\.xdp\.block\.after/,
  );
});

Deno.test("quic: a QUIC listener beside a TLS one on the same address; the quic section's defaults and errors", () => {
  const c = resolveConfig({
    ...base,
    listeners: [{ address: "0.0.0.0:443" }, { address: "0.0.0.0:443", protocol: "quic" }],
  }, "/c.json");
  assert.equal(c.listeners[1].protocol, "quic");
  assert.equal(c.listeners[1].port, 443);
  assert.deepEqual(c.quic, {
    idleMs: 30000,
    maxFlows: 10000,
    maxFlowsPerSource: null,
    maxPendingFlows: 1024,
    maxPendingDatagrams: 16,
    maxPendingBytes: 65536,
  });
  assert.deepEqual(c.warnings, []);
  const set = resolveConfig({
    ...base,
    quic: { idle_ms: 5000, max_flows_per_source: 8, max_pending_datagrams: 4 },
  }, "/c.json").quic;
  assert.equal(set.idleMs, 5000);
  assert.equal(set.maxFlowsPerSource, 8);
  assert.equal(set.maxPendingDatagrams, 4);
  assertErrors(
    errorsOf({
      ...base,
      listeners: [{
        address: "127.0.0.1:443",
        protocol: "quic",
        accept_proxy_protocol: ["10.0.0.0/8"],
      }],
      quic: {
        idle_ms: 0,
        max_flows: 0,
        max_pending_bytes: 100,
        max_pending_datagrams: 5000,
        bogus: 1,
      },
    }),
    [
      "listeners[0].accept_proxy_protocol",
      "quic.idle_ms",
      "quic.max_flows",
      "quic.max_pending_bytes",
      "quic.max_pending_datagrams",
      "quic: ",
    ],
  );
  assertErrors(errorsOf({ ...base, listeners: [{ address: "127.0.0.1:443", protocol: "udp" }] }), [
    "listeners[0].protocol",
  ]);
});

Deno.test("proxy_protocol and health.check on a table only QUIC listeners serve are warned about", () => {
  const c = resolveConfig({
    listeners: [
      { address: "127.0.0.1:8443" },
      { address: "127.0.0.1:8443", protocol: "quic", table: "h3" },
    ],
    routes: [{ match: "a.test", proxy_protocol: "v1", backends: ["127.0.0.1:9443"] }],
    tables: {
      h3: {
        routes: [{
          match: "a.test",
          proxy_protocol: "v2",
          health: { check: {} },
          backends: ["127.0.0.1:9443"],
        }],
      },
    },
  }, "/c.json");
  assert.deepEqual(c.warnings.map((w) => w.split(":")[0]), [
    "tables.h3.routes[0].proxy_protocol",
    "tables.h3.routes[0].health.check",
  ]);
});
