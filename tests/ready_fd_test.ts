/**
 * `--ready-fd N`: once every listener serves, one line of JSON on descriptor N (then closed) says
 * where: the listeners' bound ports (reachable), the metrics endpoint and the admin socket; with
 * workers only once every worker serves; nothing when the start fails. The proxy is run here
 * directly (not through the harness, which itself starts every proxy this way) to see its stdout
 * and stderr apart.
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  httpWho,
  identityBackend,
  ROOT,
  runCli,
  type Scope,
  unusedPort,
  whoAnswers,
  within,
  writeTempConfig,
} from "./harness/mod.ts";

/** The proxy run directly: its ready descriptor's content and its log, each read apart. */
interface Run {
  child: Deno.ChildProcess;
  /** All that came on the ready descriptor, once it is closed. */
  readyOutput: Promise<string>;
  stderr(): string;
  status: Promise<Deno.CommandStatus>;
  /** Whether it has exited. */
  exited(): boolean;
}

/**
 * Starts main.ts on `config` with `--ready-fd 1`, or `--ready-fd 3` when `fd3` (through sh:
 * fd 3 is the stdout pipe, stdout itself /dev/null). Killed when the scope closes.
 */
function run(
  scope: Scope,
  configPath: string,
  opts: { fd3?: boolean; env?: Record<string, string> } = {},
): Run {
  const proxy = [Deno.execPath(), "run", "-A", "--unstable-net", `${ROOT}main.ts`];
  const argv = opts.fd3
    ? ["sh", "-c", 'exec "$@" 3>&1 1>/dev/null', "sh", ...proxy, "--config", configPath]
    : [...proxy, "--config", configPath];
  const child = new Deno.Command(argv[0], {
    args: [...argv.slice(1), "--ready-fd", opts.fd3 ? "3" : "1"],
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: opts.env,
  }).spawn();
  let stderr = "";
  const logged = (async () => {
    for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) stderr += text;
  })();
  const readyOutput = new Response(child.stdout).text();
  let exited = false;
  const status = child.status.finally(() => (exited = true));
  scope.defer(async () => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await child.status;
    await logged;
  });
  return { child, readyOutput, stderr: () => stderr, status, exited: () => exited };
}

/**
 * The one line the descriptor carried, read until it is closed; asserts that the proxy still
 * runs then (the close came from it, not from its exit) and that nothing else came.
 */
async function readyLineOf(r: Run): Promise<Record<string, unknown>> {
  const out = await within(30_000, "the ready descriptor closed", r.readyOutput);
  assert.equal(r.exited(), false, `the proxy runs on after closing it; stderr:\n${r.stderr()}`);
  const lines = out.split("\n");
  assert.equal(lines.length, 2, `one line, then the close: ${JSON.stringify(out)}`);
  assert.equal(lines[1], "");
  return JSON.parse(lines[0]);
}

/** Two listeners (TLS on ::1, HTTP on 127.0.0.1 with its own table) to identity backends. */
async function twoListeners(scope: Scope, extra: Record<string, unknown> = {}) {
  const tls = await identityBackend(scope, "tls-backend");
  const http = await identityBackend(scope, "http-backend", { tls: false });
  const dir = await Deno.makeTempDir({ prefix: "sni-ready-" });
  scope.defer(() => Deno.remove(dir, { recursive: true }));
  const admin = `${dir}/admin.sock`;
  const configPath = await writeTempConfig({
    listeners: [
      { address: "[::1]:0", protocol: "tls" },
      { address: "127.0.0.1:0", protocol: "http", table: "plain" },
    ],
    routes: [{ match: "a.test", backends: [tls.address] }],
    tables: { plain: { routes: [{ match: "a.test", backends: [http.address] }] } },
    metrics: { address: "127.0.0.1:0" },
    admin: { socket: admin },
    log: { file: false, access_log: false, level: "info" },
    ...extra,
  });
  return { configPath, admin };
}

/** Asserts the line's shape and that every address in it is the running proxy's. */
async function assertServesAsSaid(
  line: Record<string, unknown>,
  pid: number,
  admin: string,
  workers: number[],
): Promise<void> {
  assert.deepEqual(Object.keys(line), [
    "ready",
    "pid",
    "listeners",
    "metrics",
    "admin",
    "mode",
    "workers",
  ]);
  assert.equal(line.mode, "userspace");
  assert.deepEqual(line.workers, workers);
  assert.equal(line.ready, true);
  assert.equal(line.pid, pid, "the pid of the process that was started");
  const [tls, http] = line.listeners as { address: string; port: number }[];
  assert.deepEqual(line.listeners, [
    { address: "::1", port: tls.port, protocol: "tls", table: "default" },
    { address: "127.0.0.1", port: http.port, protocol: "http", table: "plain" },
  ]);
  assert.ok(tls.port > 0 && http.port > 0, "the bound ports, not the config's 0");
  assert.equal(await whoAnswers(tls.port, "a.test", "::1"), "tls-backend");
  assert.equal(await httpWho(http.port), "http-backend");
  assert.match(line.metrics as string, /^127\.0\.0\.1:\d+$/);
  const metrics = await fetch(`http://${line.metrics}/metrics`);
  assert.equal(metrics.status, 200);
  assert.match(await metrics.text(), /^sni_proxy_connections_accepted_total \d+$/m);
  assert.equal(line.admin, admin);
  assert.ok((await Deno.stat(admin)).isSocket, "the admin socket is there");
}

e2eTest(
  "--ready-fd 1: one line of JSON once serving (pid, bound listeners, metrics, admin), then stdout is closed",
  async (s) => {
    const { configPath, admin } = await twoListeners(s, { workers: 1 });
    const r = run(s, configPath);
    const line = await readyLineOf(r);
    assert.match(r.stderr(), /ready: 2 listener\(s\)/, "written once the proxy is ready");
    await assertServesAsSaid(line, r.child.pid, admin, []);
    r.child.kill("SIGTERM");
    assert.equal((await r.status).code, 0, r.stderr());
  },
);

e2eTest(
  "--ready-fd 3 with workers 2: the line once both workers serve, from the supervisor; no worker holds the descriptor",
  async (s) => {
    const { configPath, admin } = await twoListeners(s, { workers: 2 });
    const r = run(s, configPath, { fd3: true });
    // the close is seen while the workers run: they did not inherit descriptor 3
    const line = await readyLineOf(r);
    const pids = /ready: 2 workers \(pids (\d+), (\d+)\)/.exec(r.stderr());
    assert.ok(pids, `the supervisor logged both workers ready first:\n${r.stderr()}`);
    await assertServesAsSaid(line, r.child.pid, admin, [Number(pids[1]), Number(pids[2])]);
    r.child.kill("SIGTERM");
    assert.equal((await r.status).code, 0, r.stderr());
  },
  { timeoutMs: 60_000 },
);

e2eTest("under systemd (Type=notify): READY=1 on $NOTIFY_SOCKET once serving", async (s) => {
  const { configPath } = await twoListeners(s, { workers: 1 });
  const dir = await Deno.makeTempDir({ prefix: "sni-notify-" });
  s.defer(() => Deno.remove(dir, { recursive: true }));
  const notify = Deno.listenDatagram({ transport: "unixpacket", path: `${dir}/notify` });
  s.defer(() => notify.close());
  const r = run(s, configPath, { env: { NOTIFY_SOCKET: `${dir}/notify` } });
  const [message] = await within(30_000, "a message on NOTIFY_SOCKET", notify.receive());
  assert.equal(new TextDecoder().decode(message), "READY=1");
  assert.equal((await readyLineOf(r)).ready, true, "and the ready line, the same moment");
  assert.doesNotMatch(r.stderr(), /cannot tell systemd/);
});

e2eTest("a start that fails writes no ready line: exit 1, the cause on stderr", async (s) => {
  const held = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  s.defer(() => held.close());
  const port = (held.addr as Deno.NetAddr).port;
  const configPath = await writeTempConfig({
    workers: 1,
    listeners: [{ address: "127.0.0.1:0" }, { address: `127.0.0.1:${port}` }],
    routes: [{ match: "a.test", backends: ["127.0.0.1:9"] }],
    log: { file: false, access_log: false },
  });
  // a listener held without SO_REUSEPORT cannot be shared
  const r = run(s, configPath);
  assert.equal((await r.status).code, 1);
  assert.equal(await r.readyOutput, "", "nothing on the ready descriptor");
  assert.match(r.stderr(), new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}`));
});

e2eTest("--ready-fd refuses 0, 2 (the log) and what is not a number: exit 2", async () => {
  const configPath = await writeTempConfig({
    workers: 1,
    listeners: [{ address: `127.0.0.1:${unusedPort()}` }],
    routes: [{ match: "a.test", backends: ["127.0.0.1:9"] }],
    log: { file: false, access_log: false },
  });
  for (const fd of ["0", "2", "x", "-1"]) {
    const r = await runCli(["--config", configPath, "--ready-fd", fd]);
    assert.equal(r.code, 2, `--ready-fd ${fd}: ${r.stderr}`);
    assert.match(r.stderr, /ready-fd/);
    assert.doesNotMatch(r.stderr, /listening on/, "refused before starting");
  }
});
