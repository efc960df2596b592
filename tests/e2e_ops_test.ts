/**
 * End to end, operating the proxy: the command line, config errors with their JSON paths,
 * reload on SIGHUP and drain on SIGTERM/SIGINT, observed from outside the process.
 */
import assert from "node:assert/strict";
import {
  assertServesBundled,
  bundledConfig,
  e2eTest,
  identityBackend,
  LineReader,
  readAccessLog,
  readOutcome,
  ROOT,
  runCli,
  Scope,
  sleep,
  type SpawnOptions,
  startProxy,
  tlsConnect,
  tlsFailure,
  unusedPort,
  waitAccess,
  whoAnswers,
  within,
  writeAll,
  writeTempConfig,
} from "./harness/mod.ts";

const encoder = new TextEncoder();

const GOOD = {
  listeners: [{ address: "127.0.0.1:0" }],
  routes: [{ match: "a.test", backends: ["127.0.0.1:9443"] }],
};

/** Asks one more line on a live identity-backend connection. */
async function ask(conn: Deno.Conn, lines: LineReader, text: string): Promise<string | null> {
  await writeAll(conn, encoder.encode(`${text}\n`));
  return await within(5000, `answer to ${text}`, lines.line());
}

e2eTest("--version prints a version, --help the usage, both exit 0", async () => {
  const v = await runCli(["--version"]);
  assert.equal(v.code, 0, v.stderr);
  assert.match(v.stdout, /\d+\.\d+\.\d+/);
  const h = await runCli(["--help"]);
  assert.equal(h.code, 0, h.stderr);
  for (const flag of ["--config", "--check", "--version", "--help"]) {
    assert.ok(h.stdout.includes(flag), `usage mentions ${flag}:\n${h.stdout}`);
  }
});

e2eTest("an unknown flag exits 2 and names the flag", async () => {
  const r = await runCli(["--bogus-flag"]);
  assert.equal(r.code, 2, r.stdout + r.stderr);
  assert.match(r.stdout + r.stderr, /bogus-flag/);
});

e2eTest("--check on a valid config prints `config OK`, exits 0 and binds nothing", async () => {
  // a port someone else holds: --check must not try to listen on it
  const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (held.addr as Deno.NetAddr).port;
    const path = await writeTempConfig({
      ...GOOD,
      listeners: [{ address: `127.0.0.1:${port}` }, { address: "[::1]:0", protocol: "http" }],
      routes: [
        ...GOOD.routes,
        { match: "*.b.test", backends: ["[::1]:9443", "localhost:9443"], balance: "least_conn" },
        { match: "~^api[0-9]+\\.c\\.test$", backends: ["127.0.0.1:1"], balance: "source_hash" },
        { match: "*", backends: ["$sni:443"], allow: ["*.internal.test"] },
      ],
      default_backend: "127.0.0.1:9443",
      timeouts: { client_hello_ms: 1000, connect_ms: 1000, idle_ms: 1000, drain_ms: 1000 },
      acl: { allow: [], deny: ["192.0.2.0/24", "2001:db8::/32"] },
    });
    const r = await runCli(["--config", path, "--check"]);
    assert.equal(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /config OK/);
  } finally {
    held.close();
  }
});

/** One bad config and the JSON path its error must name. */
const BAD_CONFIGS: [string, Record<string, unknown>, string][] = [
  [
    "listener port out of range",
    { ...GOOD, listeners: [{ address: "127.0.0.1:70000" }] },
    "listeners[0].address",
  ],
  [
    "listener address without port",
    { ...GOOD, listeners: [{ address: "127.0.0.1" }] },
    "listeners[0].address",
  ],
  ["unknown listener protocol", {
    ...GOOD,
    listeners: [{ address: "127.0.0.1:0", protocol: "udp" }],
  }, "listeners[0].protocol"],
  [
    "backend port 0",
    { ...GOOD, routes: [{ match: "a.test", backends: ["127.0.0.1:0"] }] },
    "routes[0].backends[0]",
  ],
  [
    "second backend port out of range",
    {
      ...GOOD,
      routes: [GOOD.routes[0], { match: "b.test", backends: ["127.0.0.1:1", "[::1]:65536"] }],
    },
    "routes[1].backends[1]",
  ],
  [
    "route without backends",
    { ...GOOD, routes: [{ match: "a.test", backends: [] }] },
    "routes[0].backends",
  ],
  ["bad CIDR prefix", { ...GOOD, acl: { deny: ["10.0.0.0/33"] } }, "acl.deny[0]"],
  ["bad CIDR address", { ...GOOD, acl: { allow: ["127.0.0.1/8", "300.1.2.3/8"] } }, "acl.allow[1]"],
  [
    "bad regex",
    { ...GOOD, routes: [{ match: "~^(api", backends: ["127.0.0.1:1"] }] },
    "routes[0].match",
  ],
  [
    "unknown balance",
    { ...GOOD, routes: [{ match: "a.test", backends: ["127.0.0.1:1"], balance: "fastest" }] },
    "routes[0].balance",
  ],
  ["missing listeners", { routes: GOOD.routes }, "listeners"],
  ["empty listeners", { ...GOOD, listeners: [] }, "listeners"],
  ["missing routes", { listeners: GOOD.listeners }, "routes"],
  [
    "$sni without allow",
    { ...GOOD, routes: [{ match: "*", backends: ["$sni:443"] }] },
    "routes[0]",
  ],
  ["timeout of the wrong type", { ...GOOD, timeouts: { idle_ms: "soon" } }, "timeouts.idle_ms"],
  ["negative timeout", { ...GOOD, timeouts: { connect_ms: -1 } }, "timeouts.connect_ms"],
  [
    "limit of the wrong type",
    { ...GOOD, limits: { max_connections: "many" } },
    "limits.max_connections",
  ],
  ["listeners not a list", { ...GOOD, listeners: { address: "127.0.0.1:0" } }, "listeners"],
  ["bad default_backend", { ...GOOD, default_backend: "127.0.0.1" }, "default_backend"],
];

e2eTest("--check names the JSON path of each bad field and exits 1", async () => {
  const problems: string[] = [];
  for (const [what, config, path] of BAD_CONFIGS) {
    const file = await writeTempConfig(config);
    const r = await runCli(["--config", file, "--check"]);
    const out = r.stdout + r.stderr;
    const lines = out.split("\n").filter((l) => l.includes(path));
    if (r.code !== 1) problems.push(`${what}: exit ${r.code}, want 1:\n${out}`);
    else if (out.includes("config OK")) problems.push(`${what}: says config OK`);
    else if (lines.length === 0) problems.push(`${what}: no line names ${path}:\n${out}`);
  }
  assert.deepEqual(problems, []);
}, { timeoutMs: 90_000 });

e2eTest("--check lists every error of a config together, one per line", async () => {
  const file = await writeTempConfig({
    listeners: [{ address: "127.0.0.1:70000" }],
    routes: [
      { match: "~(", backends: ["127.0.0.1:1"] },
      { match: "a.test", backends: ["127.0.0.1:1"], balance: "fastest" },
    ],
    acl: { deny: ["10.0.0.0/33"] },
    timeouts: { idle_ms: "soon" },
  });
  const r = await runCli(["--config", file, "--check"]);
  assert.equal(r.code, 1);
  const out = r.stdout + r.stderr;
  const lines = out.split("\n");
  const missing = [
    "listeners[0].address",
    "routes[0].match",
    "routes[1].balance",
    "acl.deny[0]",
    "timeouts.idle_ms",
  ].filter((path) => !lines.some((l) => l.includes(path)));
  assert.deepEqual(missing, [], `errors not listed:\n${out}`);
});

e2eTest("a config that is not JSON, or missing, is an error naming the file", async () => {
  const file = await writeTempConfig('{"listeners": [ }');
  const bad = await runCli(["--config", file, "--check"]);
  assert.equal(bad.code, 1);
  assert.match(bad.stdout + bad.stderr, /JSON/);
  const missing = await runCli(["--config", "/nonexistent/sni-proxy.json", "--check"]);
  assert.equal(missing.code, 1);
  assert.match(missing.stdout + missing.stderr, /\/nonexistent\/sni-proxy\.json/);
});

e2eTest("starting with a bad config exits 1 with the error path and listens nowhere", async () => {
  const file = await writeTempConfig({ ...GOOD, acl: { deny: ["10.0.0.0/33"] } });
  const r = await runCli(["--config", file]);
  assert.equal(r.code, 1);
  assert.match(r.stdout + r.stderr, /acl\.deny\[0\]/);
  assert.doesNotMatch(r.stdout + r.stderr, /listening on/);
});

e2eTest("a listener address in use is a clear start error", async () => {
  const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (held.addr as Deno.NetAddr).port;
    const file = await writeTempConfig({
      ...GOOD,
      listeners: [{ address: `127.0.0.1:${port}` }],
      log: { file: false, access_log: false },
    });
    const r = await runCli(["--config", file], 15_000);
    assert.notEqual(r.code, 0);
    assert.match(r.stdout + r.stderr, new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}`));
    assert.match(r.stdout + r.stderr, /Address already in use \[EADDRINUSE\]/);
  } finally {
    held.close();
  }
});

e2eTest(
  "SIGHUP with a good config reroutes new connections; a live one keeps flowing",
  async (s) => {
    const one = await identityBackend(s, "one");
    const two = await identityBackend(s, "two");
    const config = {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [one.address] }],
    };
    const proxy = await startProxy(s, config);
    const live = await tlsConnect(proxy.port(), "a.test");
    try {
      const lines = new LineReader(live);
      assert.equal(await ask(live, lines, "before"), "backend=one before");
      assert.notEqual(await tlsFailure(proxy.port(), "x.b.test"), null, "no route yet");

      await proxy.writeConfig({
        ...config,
        routes: [
          { match: "a.test", backends: [two.address] },
          { match: "*.b.test", backends: [one.address] },
        ],
      });
      const mark = proxy.stderr().length;
      proxy.signal("SIGHUP");
      await proxy.waitForLog("reloaded", 5000, mark);

      assert.equal(await whoAnswers(proxy.port(), "a.test"), "two");
      assert.equal(await whoAnswers(proxy.port(), "x.b.test"), "one");
      // the live connection still talks to its backend
      assert.equal(await ask(live, lines, "after"), "backend=one after");
    } finally {
      live.close();
    }
    const e = await proxy.waitAccess((e) => e.backend === one.address && e.sni === "a.test");
    assert.equal(e.close_reason, "done");
  },
);

e2eTest(
  "SIGHUP with a bad config logs `reload failed` with the path and keeps the old routes",
  async (s) => {
    const one = await identityBackend(s, "one");
    const two = await identityBackend(s, "two");
    const config = {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [one.address] }],
    };
    const proxy = await startProxy(s, config);
    await proxy.writeConfig({
      ...config,
      routes: [{ match: "a.test", backends: [two.address], balance: "fastest" }],
    });
    const mark = proxy.stderr().length;
    proxy.signal("SIGHUP");
    await proxy.waitForLog("reload failed", 5000, mark);
    assert.match(proxy.stderr().slice(mark), /routes\[0\]\.balance/);
    assert.equal(await whoAnswers(proxy.port(), "a.test"), "one");

    // and a later good reload still works
    await proxy.writeConfig({ ...config, routes: [{ match: "a.test", backends: [two.address] }] });
    const mark2 = proxy.stderr().length;
    proxy.signal("SIGHUP");
    await proxy.waitForLog("reloaded", 5000, mark2);
    assert.equal(await whoAnswers(proxy.port(), "a.test"), "two");
  },
);

e2eTest(
  "a SIGHUP sent as soon as `ready` is logged reloads instead of killing the proxy",
  async (s) => {
    const one = await identityBackend(s, "one");
    const config = {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [one.address] }],
    };
    // an init system may reload right after start: `ready` must mean the signals are handled
    for (let i = 0; i < 8; i++) {
      const scope = new Scope();
      try {
        const proxy = await startProxy(scope, config);
        proxy.signal("SIGHUP");
        await proxy.waitForLog("reloaded", 5000);
        assert.equal(await whoAnswers(proxy.port(), "a.test"), "one");
      } finally {
        await scope.close();
      }
    }
  },
  { timeoutMs: 60_000 },
);

e2eTest("SIGTERM: new clients are refused, a live connection finishes, exit 0", async (s) => {
  const one = await identityBackend(s, "one");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [one.address] }],
    timeouts: { drain_ms: 20_000 },
  });
  const port = proxy.port();
  const live = await tlsConnect(port, "a.test");
  let closedAt = 0;
  try {
    const lines = new LineReader(live);
    assert.equal(await ask(live, lines, "1"), "backend=one 1");
    proxy.signal("SIGTERM");
    await proxy.waitForLog(/drain/i, 5000);
    // not accepting any more: within moments connects are refused; a connect that races the
    // listener's close may get through the kernel, but it is never served
    let refused = false;
    const until = Date.now() + 2000;
    while (!refused && Date.now() < until) {
      try {
        const c = await within(2000, "new connect", Deno.connect({ hostname: "127.0.0.1", port }));
        const o = await within(3000, "unserved connection ends", readOutcome(c));
        c.close();
        assert.notEqual(o.kind, "data");
        await sleep(50);
      } catch (e) {
        if ((e as Error).name === "ConnectionRefused") refused = true;
        else if ((e as Error).name !== "ConnectionReset") throw e;
      }
    }
    assert.ok(refused, "new connections are refused after SIGTERM");
    assert.equal(one.accepted, 1, "nothing new reached the backend");
    // the live one is served as before
    await sleep(300);
    assert.equal(await ask(live, lines, "2"), "backend=one 2");
    const status = await Promise.race([proxy.status.then(() => "exited"), sleep(300)]);
    assert.notEqual(status, "exited", "the proxy waits for the live connection");
  } finally {
    live.close();
    closedAt = performance.now();
  }
  const code = await within(5000, "exit after the last connection", proxy.status);
  assert.equal(code.code, 0, proxy.stderr());
  assert.ok(
    performance.now() - closedAt < 4000,
    "exits soon after the last connection, not at drain_ms",
  );
  const e = await proxy.waitAccess((e) => e.sni === "a.test");
  assert.equal(e.close_reason, "done");
});

e2eTest("SIGTERM: a connection still open at drain_ms is closed as shutdown, exit 0", async (s) => {
  const one = await identityBackend(s, "one");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [one.address] }],
    timeouts: { drain_ms: 800 },
  });
  const live = await tlsConnect(proxy.port(), "a.test");
  try {
    assert.equal(await ask(live, new LineReader(live), "x"), "backend=one x");
    const t0 = performance.now();
    proxy.signal("SIGTERM");
    const o = await within(5000, "closed at drain_ms", readOutcome(live));
    const ms = performance.now() - t0;
    assert.notEqual(o.kind, "data");
    assert.ok(ms >= 600 && ms < 4000, `closed after ${ms.toFixed(0)} ms, want ~800`);
  } finally {
    live.close();
  }
  const status = await within(5000, "exit", proxy.status);
  assert.equal(status.code, 0, proxy.stderr());
  const e = await proxy.waitAccess((e) => e.sni === "a.test");
  assert.equal(e.close_reason, "shutdown");
});

e2eTest("SIGINT stops the proxy like SIGTERM (exit 0)", async (s) => {
  const one = await identityBackend(s, "one");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [one.address] }],
  });
  assert.equal(await whoAnswers(proxy.port(), "a.test"), "one");
  proxy.signal("SIGINT");
  const status = await within(5000, "exit on SIGINT", proxy.status);
  assert.equal(status.code, 0, proxy.stderr());
});

e2eTest("at limits.max_connections a new client waits until a live one closes", async (s) => {
  const one = await identityBackend(s, "one");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [one.address] }],
    limits: { max_connections: 2 },
  });
  const first = await tlsConnect(proxy.port(), "a.test");
  const second = await tlsConnect(proxy.port(), "a.test");
  try {
    await ask(first, new LineReader(first), "1");
    await ask(second, new LineReader(second), "2");
    // the third is held in the kernel backlog, not refused and not served
    const third = whoAnswers(proxy.port(), "a.test");
    const early = await Promise.race([third.then(() => "served"), sleep(700).then(() => "wait")]);
    assert.equal(early, "wait", "a third client was served past max_connections");
    assert.equal(one.accepted, 2);
    await proxy.waitForLog("max_connections", 2000);
    first.close();
    assert.equal(await within(5000, "served after a slot frees", third), "one");
  } finally {
    try {
      first.close();
    } catch { /* closed above */ }
    second.close();
  }
});

e2eTest("--check lists schema errors and cross-field errors of one config together", async () => {
  const file = await writeTempConfig({
    listeners: [{ address: "127.0.0.1:0", table: "plain" }],
    routes: [
      { match: "a.test", backends: ["127.0.0.1:1"], balance: "fastest" },
      { match: "*", backends: ["$sni:443"] },
    ],
    default_backend: "$sni:443",
    timeouts: { idle_ms: "soon" },
    dns: { min_ttl_s: 600, max_ttl_s: 60 },
  });
  const r = await runCli(["--config", file, "--check"]);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  const lines = r.stderr.trim().split("\n");
  const want = [
    "routes[0].balance:",
    "timeouts.idle_ms:",
    "routes[1].allow: a route with a $sni backend needs an allow list",
    "default_backend: default_backend cannot be $sni",
    "dns.min_ttl_s: larger than dns.max_ttl_s",
    'listeners[0].table: no table "plain"',
  ];
  const missing = want.filter((w) => !lines.some((l) => l.startsWith(`${file}: ${w}`)));
  assert.deepEqual(missing, [], `not listed:\n${r.stderr}`);
  assert.equal(lines.length, want.length, `one line per error:\n${r.stderr}`);
});

e2eTest(
  "ebpf.xdp without ebpf.enabled: --check and the start warn that it is ignored",
  async (s) => {
    const one = await identityBackend(s, "one");
    const config = {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [one.address] }],
      ebpf: { enabled: false, xdp: { interfaces: ["lo"] } },
    };
    const warning = "ebpf.xdp: ignored while ebpf.enabled is false";
    const file = await writeTempConfig(config);
    const r = await runCli(["--config", file, "--check"]);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /config OK/);
    assert.ok(r.stderr.includes(`${file}: warning: ${warning}`), r.stderr);
    const proxy = await startProxy(s, config);
    assert.ok(proxy.stderr().includes(`[WRN] sni-proxy·proxy: ${warning}`), proxy.stderr());
    assert.doesNotMatch(proxy.stderr(), /XDP/, "no XDP filter was attempted");
    assert.equal(await whoAnswers(proxy.port(), "a.test"), "one");
  },
);

e2eTest("dns.hosts_file resolves against the config file's directory, not the cwd", async (s) => {
  const one = await identityBackend(s, "one");
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [`backend-one.hosts.test:${one.port}`] }],
    // nothing answers DNS there: only the hosts file can name the backend
    dns: { hosts_file: "hosts", servers: [`127.0.0.1:${unusedPort()}`], timeout_ms: 200 },
  });
  // the proxy runs in the repository; the file sits beside its config
  const dir = proxy.configPath.slice(0, proxy.configPath.lastIndexOf("/"));
  assert.notEqual(dir, ROOT.replace(/\/$/, ""));
  await Deno.writeTextFile(`${dir}/hosts`, "127.0.0.1 backend-one.hosts.test\n");
  assert.equal(await whoAnswers(proxy.port(), "a.test"), "one");
});

e2eTest("a log file that cannot be written is one line naming field and path, exit 1", async () => {
  const file = await writeTempConfig({
    ...GOOD,
    log: { file: "/proc/sni-proxy-no-such-dir/proxy.log", access_log: false },
  });
  const r = await runCli(["--config", file], 15_000);
  assert.equal(r.code, 1, r.stdout + r.stderr);
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `one line:\n${r.stderr}`);
  assert.match(lines[0], /log\.file: cannot write \/proc\/sni-proxy-no-such-dir\/proxy\.log: /);
  assert.doesNotMatch(r.stderr, /Uncaught|^\s+at /m);
});

/** Changes `config` in every field a reload cannot apply (ebpf stays off). */
function restartOnlyChanges(config: Record<string, unknown>, metricsPort: number) {
  return {
    ...config,
    workers: 3,
    listeners: [{ address: "127.0.0.1:1" }],
    log: { max_files: 9 },
    metrics: { address: `127.0.0.1:${metricsPort}` },
    ebpf: { maps: { pairs: 4096 }, sndbuf: 1 << 20, xdp: { interfaces: ["lo"] } },
  };
}
const IGNORED = "workers, listeners[0].address, log.max_files, metrics, ebpf.maps.pairs, " +
  "ebpf.sndbuf, ebpf.xdp";

for (const workers of [1, 2]) {
  e2eTest(
    `SIGHUP names every field it cannot apply in one warning (workers ${workers}) and applies the rest`,
    async (s) => {
      const one = await identityBackend(s, "one");
      const two = await identityBackend(s, "two");
      const config = {
        workers,
        listeners: [{ address: "127.0.0.1:0" }],
        routes: [{ match: "a.test", backends: [one.address] }],
      };
      const proxy = await startProxy(s, config);
      const metricsPort = unusedPort();
      await proxy.writeConfig(restartOnlyChanges({
        ...config,
        routes: [{ match: "a.test", backends: [two.address] }],
      }, metricsPort));
      const mark = proxy.stderr().length;
      proxy.signal("SIGHUP");
      await proxy.waitForLog(workers > 1 ? "passed to 2 workers" : "reloaded", 5000, mark);
      await sleep(300);
      const out = proxy.stderr().slice(mark);
      const warnings = out.split("\n").filter((l) => /\[WRN\] sni-proxy·proxy: reload: /.test(l));
      assert.deepEqual(
        warnings.map((l) => l.slice(l.indexOf("reload: "))),
        [`reload: these changes need a restart and were not applied: ${IGNORED}`],
        out,
      );
      assert.match(out, /\[WRN\] sni-proxy·proxy: ebpf\.xdp: ignored while ebpf\.enabled is false/);
      // applied: the route; not applied: the listener, the metrics endpoint
      await within(
        5000,
        "new route",
        (async () => {
          while (await whoAnswers(proxy.port(), "a.test") !== "two") await sleep(100);
        })(),
      );
      const metrics = await fetch(`http://127.0.0.1:${metricsPort}/metrics`).then(
        (r) => (r.body?.cancel(), "served"),
        () => "refused",
      );
      assert.equal(metrics, "refused");
    },
    { timeoutMs: 45_000 },
  );
}

/** The log's warning lines. */
function warnings(output: string): string[] {
  return output.split("\n").filter((l) => / \[WRN\] /.test(l));
}

/**
 * Starts the bundled config (as `opts` say: e.g. as another user) and asserts what an operator
 * sees: both listeners, the bytes relayed in kernel mode (splice(2) pipes, which need no
 * privilege) on the ready line and in the access log, and the warnings: none as root, exactly
 * one otherwise, the pinned DNS cache (a BPF map) giving way to an in-process one, with cause
 * and fix.
 */
async function assertBundledStarts(s: Scope, opts: SpawnOptions, root: boolean): Promise<void> {
  const bundled = await bundledConfig(s);
  const proxy = await startProxy(s, bundled.config, opts);
  const { tls, http } = bundled.ports;
  assert.deepEqual(proxy.listeners.map((l) => [l.port, l.protocol]), [[tls, "tls"], [
    http,
    "http",
  ]]);
  assert.equal(proxy.ready.mode, "kernel", proxy.stderr());
  await assertServesBundled(bundled);
  // the bundled log section keeps its own paths, beside the config
  const dir = proxy.configPath.slice(0, proxy.configPath.lastIndexOf("/"));
  const log = { access: () => readAccessLog(`${dir}/logs/access.log`) };
  const e = await waitAccess(log, (e) => e.sni === "localhost");
  assert.equal(e.mode, "kernel");
  assert.equal(e.close_reason, "done");
  const warned = warnings(proxy.stderr());
  if (root) {
    assert.deepEqual(warned, [], proxy.stderr());
    assert.match(proxy.stderr(), /DNS cache: (created and pinned|using the pinned map)/);
  } else {
    assert.equal(warned.length, 1, proxy.stderr());
    assert.match(warned[0], /DNS cache: .*(not permitted|root's).*; using an in-process cache/);
    assert.match(warned[0], /run as root|CAP_BPF/);
    assert.match(warned[0], /or set ebpf\.dns_cache_enabled to false/);
  }
  assert.equal(await proxy.stop(), 0);
}

e2eTest(
  "the bundled config.json asks for kernel mode and the pinned DNS cache, and passes --check",
  async () => {
    const file = JSON.parse(await Deno.readTextFile(`${ROOT}config.json`));
    assert.deepEqual(
      [file.ebpf.enabled, file.ebpf.sockmap_enabled, file.ebpf.dns_cache_enabled],
      [true, true, true],
    );
    const check = await runCli(["--check", "--config", `${ROOT}config.json`]);
    assert.equal(check.code, 0, check.stderr);
    assert.match(check.stdout, /config OK/);
  },
);

e2eTest(
  "the bundled config.json: HTTP on its HTTP listener, TLS on its TLS listener, in kernel mode",
  async (s) => await assertBundledStarts(s, {}, Deno.uid() === 0),
);

e2eTest(
  "the bundled config.json without privilege (nobody): kernel mode, one warning (the DNS cache), and it serves",
  async (s) =>
    await assertBundledStarts(s, {
      wrapper: ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"],
      uid: 65534,
    }, false),
  { ignore: Deno.uid() !== 0 },
);

e2eTest(
  "each listener routes by its table; SIGHUP can move a listener to another table",
  async (s) => {
    const one = await identityBackend(s, "one");
    const two = await identityBackend(s, "two");
    const config = {
      listeners: [{ address: "127.0.0.1:0" }, { address: "127.0.0.1:0", table: "other" }],
      routes: [{ match: "a.test", backends: [one.address] }],
      tables: { other: { routes: [{ match: "a.test", backends: [two.address] }] } },
    };
    const proxy = await startProxy(s, config);
    assert.match(proxy.stderr(), /ready: 2 listener\(s\), 2 route\(s\) in 2 tables/);
    assert.equal(await whoAnswers(proxy.port(0), "a.test"), "one");
    assert.equal(await whoAnswers(proxy.port(1), "a.test"), "two");
    // a table's default_backend serves only its listeners
    await proxy.writeConfig({
      ...config,
      listeners: [{ address: "127.0.0.1:0", table: "other" }, { address: "127.0.0.1:0" }],
      tables: { other: { routes: [], default_backend: two.address } },
    });
    const mark = proxy.stderr().length;
    proxy.signal("SIGHUP");
    await proxy.waitForLog("reloaded", 5000, mark);
    assert.doesNotMatch(proxy.stderr().slice(mark), /need a restart/, "a table is no restart");
    assert.equal(await whoAnswers(proxy.port(0), "b.test"), "two");
    assert.equal(await whoAnswers(proxy.port(1), "a.test"), "one");
    assert.notEqual(await tlsFailure(proxy.port(1), "b.test"), null, "no default in `default`");
  },
);
