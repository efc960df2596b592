import assert from "node:assert/strict";
import { ConfigError, resolveConfig } from "../src/config.ts";

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
  });
  assert.equal(c.limits.maxClientHelloBytes, 16384);
  assert.equal(c.routes[0].balance, "round_robin");
  assert.equal(c.log.file, "/etc/sni/logs/sni-proxy.log", "relative to the config's directory");
  assert.equal(c.log.accessLog, "/etc/sni/logs/access.log");
  assert.equal(c.ebpf.enabled, false);
  assert.equal(c.ebpf.detachSpliced, true, "spliced sockets leave Deno's event loop");
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
  for (const e of expect) {
    assert.ok(errors.some((x) => x.startsWith(e)), `missing "${e}" in:\n${errors.join("\n")}`);
  }
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
