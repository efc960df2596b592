/**
 * The proxy as a child process: `deno run main.ts --config PATH --ready-fd 1` on a config with
 * the test log section, ready when its ready line comes (which says the listeners' ports), its
 * log and access log read back, stopped with SIGTERM (SIGKILL after a while). One way to start
 * it, {@linkcode startProxy}; {@linkcode withProxy} for a test without a scope.
 *
 * @module
 */
import assert from "node:assert/strict";
import type { ReadyLine } from "../../src/run/ready.ts";
import { type AccessEntry, readAccessLog, waitAccess } from "./access_log.ts";
import { type CommandResult, whoAnswers } from "./clients.ts";
import { ROOT, Scope } from "./scope.ts";

const decoder = new TextDecoder();

/** A listener as the proxy's ready line reported it. */
export interface ListenerInfo {
  /** The bound IP address, without brackets. */
  host: string;
  port: number;
  protocol: string;
  table: string;
}

/** A running proxy child process. */
export interface ProxyProcess {
  pid: number;
  /** Its ready line (`--ready-fd`), as written. */
  ready: ReadyLine;
  /** Listeners from the ready line, in config order. */
  listeners: ListenerInfo[];
  /** Port of listener `i` (default the first). */
  port(i?: number): number;
  configPath: string;
  accessLogPath: string;
  /** Its output (the log on stderr) so far. */
  stderr(): string;
  /** Waits until the output (from `from` chars on) matches `what`. */
  waitForLog(what: string | RegExp, ms?: number, from?: number): Promise<void>;
  /** Access-log entries written so far. */
  access(): Promise<AccessEntry[]>;
  /** Polls the access log until an entry matches `pred`. */
  waitAccess(pred: (e: AccessEntry) => boolean, ms?: number): Promise<AccessEntry>;
  /** Rewrites the config file (the harness adds the test log section). */
  writeConfig(config: Record<string, unknown>): Promise<void>;
  signal(sig: Deno.Signal): void;
  /** Exit status once exited. */
  status: Promise<Deno.CommandStatus>;
  /** Sends SIGTERM and waits for exit (SIGKILL after `ms`); returns the exit code. */
  stop(ms?: number): Promise<number>;
}

/** How to start the proxy process. */
export interface SpawnOptions {
  /** How long to wait for its ready line. */
  readyMs?: number;
  /** A command to run it under, e.g. `["ip", "netns", "exec", "ns1"]` or setpriv. */
  wrapper?: string[];
  /** Variables added to its environment. */
  env?: Record<string, string>;
  /**
   * The user it runs as (with a `wrapper` that switches to it, e.g. setpriv): its temp dir (config,
   * access log) is that user's, and deno gets a cache dir there and runs from the local packages
   * only (no registry access).
   */
  uid?: number;
  /**
   * A command line to run instead of `deno run main.ts --config PATH`, for a proxy that reads its
   * config elsewhere (the harness's config file is written all the same, and unused); it must pass
   * `readyArgs` on to the proxy.
   */
  command?: (readyArgs: string[]) => string[];
}

/** Asks for the ready line on stdout. */
const READY_ARGS = ["--ready-fd", "1"];
/**
 * Runs the proxy's command with stderr on the stdout pipe: the log before the ready line is read
 * before it (one stream keeps their order), so a test sees the start-up log once it is ready.
 * `exec` keeps the pid the proxy's.
 */
const ONE_PIPE = ["sh", "-c", 'exec "$@" 2>&1', "sh"];

/** Adds the test log section (stderr only, access log in the temp dir, debug) and drain_ms. */
function withTestDefaults(
  config: Record<string, unknown>,
  accessLogPath: string,
): Record<string, unknown> {
  const timeouts = { drain_ms: 2000, ...(config.timeouts as Record<string, unknown> ?? {}) };
  const log = {
    file: false,
    access_log: accessLogPath,
    level: "debug",
    ...(config.log as Record<string, unknown> ?? {}),
  };
  // one process unless the test asks for workers: what most tests observe (pids, strace, RSS)
  // is the proxy process itself; tests/proxy_workers_test.ts covers several
  return { workers: 1, ...config, timeouts, log };
}

/** The command line of the proxy on `configPath`, as `opts` say. */
async function commandLine(dir: string, configPath: string, opts: SpawnOptions): Promise<string[]> {
  if (opts.command) return opts.command(READY_ARGS);
  const deno = ["run", "-A", "--unstable-net"];
  if (opts.uid !== undefined) {
    await Deno.mkdir(`${dir}/deno-cache`);
    for (const p of [dir, configPath, `${dir}/deno-cache`]) await Deno.chown(p, opts.uid, opts.uid);
    await Deno.chmod(dir, 0o755);
    deno.push("--node-modules-dir=manual", "--cached-only");
  }
  const main = [`${ROOT}main.ts`, "--config", configPath, ...READY_ARGS];
  return [...(opts.wrapper ?? []), Deno.execPath(), ...deno, ...main];
}

/**
 * Starts the proxy on `config` (plus the test log section) and waits for its ready line. The
 * process is stopped (SIGTERM, then SIGKILL) and its temp dir removed when the scope closes,
 * also when it does not get ready (the error carries its exit and output).
 */
export async function startProxy(
  scope: Scope,
  config: Record<string, unknown>,
  opts: SpawnOptions = {},
): Promise<ProxyProcess> {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-proxy-" });
  scope.defer(() => Deno.remove(dir, { recursive: true }).catch(() => {}));
  const accessLogPath = `${dir}/access.log`;
  const configPath = `${dir}/config.json`;
  const writeConfig = (c: Record<string, unknown>) =>
    Deno.writeTextFile(configPath, JSON.stringify(withTestDefaults(c, accessLogPath), null, 2));
  await writeConfig(config);
  const argv = [...ONE_PIPE, ...await commandLine(dir, configPath, opts)];
  const env = opts.uid === undefined
    ? opts.env
    : { DENO_DIR: `${dir}/deno-cache`, HOME: dir, NO_COLOR: "1", ...opts.env };
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "inherit",
    env,
  }).spawn();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  const output = readOutput(child.stdout);

  const stop = async (ms = 10_000) => {
    if (!exited) {
      try {
        child.kill("SIGTERM");
      } catch { /* exited meanwhile */ }
    }
    let timer: ReturnType<typeof setTimeout> | undefined;
    const killed = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* exited */ }
        resolve();
      }, ms);
    });
    await Promise.race([status, killed]);
    const s = await status;
    clearTimeout(timer);
    await output.done;
    return s.code;
  };
  scope.defer(async () => {
    await stop(5000);
  });

  const waitForLog = (what: string | RegExp, ms = 15_000, from = 0) =>
    output.waitFor(what, ms, from, status);
  const ready = await readyLine(output, status, opts.readyMs ?? 20_000);
  const listeners = ready.listeners.map((l) => ({
    host: l.address,
    port: l.port,
    protocol: l.protocol,
    table: l.table,
  }));
  const access = () => readAccessLog(accessLogPath);
  return {
    pid: child.pid,
    ready,
    listeners,
    port: (i = 0) => {
      assert.ok(listeners[i], `no listener ${i} in the ready line ${JSON.stringify(ready)}`);
      return listeners[i].port;
    },
    configPath,
    accessLogPath,
    stderr: output.text,
    waitForLog,
    access,
    waitAccess: (pred, ms) => waitAccess({ access }, pred, ms),
    writeConfig,
    signal: (sig) => child.kill(sig),
    status,
    stop,
  };
}

/**
 * Starts the proxy on `config`, runs `f` with it and stops it, asserting it exits 0: for a test
 * that has no scope of its own.
 */
export async function withProxy(
  config: Record<string, unknown>,
  f: (p: ProxyProcess) => Promise<void>,
): Promise<void> {
  await using scope = new Scope();
  const p = await startProxy(scope, config);
  try {
    await f(p);
  } finally {
    const code = await p.stop();
    assert.equal(code, 0, `proxy exit code; stderr:\n${p.stderr()}`);
  }
}

/** The proxy's output as it comes: its log lines, and its ready line taken out of them. */
interface Output {
  /** The log so far. */
  text(): string;
  /** The ready line once it came (pending forever when it does not). */
  ready: Promise<ReadyLine>;
  /** Settles when the output ends. */
  done: Promise<void>;
  /** Waits until the log (from `from` chars on) matches `what`; fails on exit or after `ms`. */
  waitFor(
    what: string | RegExp,
    ms: number,
    from: number,
    status: Promise<Deno.CommandStatus>,
  ): Promise<void>;
}

function readOutput(stream: ReadableStream<Uint8Array>): Output {
  let text = "";
  let partial = "";
  // never rejected: an exit without it is told by the exit status
  const ready = Promise.withResolvers<ReadyLine>();
  const changed = new Set<() => void>();
  const take = (lines: string) => {
    partial += lines;
    let nl;
    while ((nl = partial.indexOf("\n")) >= 0) {
      const line = partial.slice(0, nl + 1);
      partial = partial.slice(nl + 1);
      if (line.startsWith('{"ready":')) ready.resolve(JSON.parse(line));
      else text += line;
    }
  };
  const done = (async () => {
    const d = new TextDecoder();
    for await (const chunk of stream) {
      take(d.decode(chunk, { stream: true }));
      for (const f of changed) f();
    }
    text += partial + d.decode();
  })().catch(() => {});

  const waitFor = async (
    what: string | RegExp,
    ms: number,
    from: number,
    status: Promise<Deno.CommandStatus>,
  ) => {
    const has = () => {
      const t = text.slice(from);
      return typeof what === "string" ? t.includes(what) : what.test(t);
    };
    if (has()) return;
    const found = Promise.withResolvers<void>();
    const check = () => {
      if (has()) found.resolve();
    };
    changed.add(check);
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await Promise.race([
        found.promise,
        status.then(async (st) => {
          await done;
          if (!has()) throw new Error(`proxy ${how(st)} before logging ${what}; output:\n${text}`);
        }),
        new Promise((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`proxy did not log ${what} within ${ms} ms; output:\n${text}`)),
            ms,
          );
        }),
      ]);
    } finally {
      clearTimeout(timer);
      changed.delete(check);
    }
  };
  return { text: () => text, ready: ready.promise, done, waitFor };
}

function how(status: Deno.CommandStatus): string {
  return status.signal ? `killed by ${status.signal}` : `exited ${status.code}`;
}

/** The ready line; fails when the proxy exits first (a failed start) or after `ms`. */
async function readyLine(
  output: Output,
  status: Promise<Deno.CommandStatus>,
  ms: number,
): Promise<ReadyLine> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      output.ready,
      status.then(async (st): Promise<never> => {
        await output.done;
        throw new Error(
          `proxy ${how(st)} before logging its ready line (--ready-fd); output:\n${output.text()}`,
        );
      }),
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new Error(`proxy wrote no ready line within ${ms} ms; output:\n${output.text()}`),
            ),
          ms,
        );
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Spawns `main.ts` with `args` and collects its output (for CLI tests). */
export async function runCli(args: string[], ms = 30_000): Promise<CommandResult> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--unstable-net", `${ROOT}main.ts`, ...args],
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  }, ms);
  const out = await child.output();
  clearTimeout(timer);
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** Writes `config` to a temp file (as is) and returns its path. */
export async function writeTempConfig(config: unknown): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-config-" });
  const path = `${dir}/config.json`;
  await Deno.writeTextFile(path, typeof config === "string" ? config : JSON.stringify(config));
  return path;
}

/**
 * Asserts the proxy is alive and serving: a fresh TLS client with SNI `serverName` on listener 0
 * gets an answer from `backend`.
 */
export async function assertStillServes(
  proxy: ProxyProcess,
  serverName: string,
  backend: string,
): Promise<void> {
  assert.equal(await whoAnswers(proxy.port(), serverName), backend, proxy.stderr());
}

/** Asserts the proxy exits 0 on SIGTERM and did not log an uncaught error. */
export async function assertCleanStop(proxy: ProxyProcess): Promise<void> {
  const code = await proxy.stop();
  assert.equal(code, 0, `exit code after SIGTERM; output:\n${proxy.stderr()}`);
  assert.doesNotMatch(proxy.stderr(), /Uncaught|panicked/, "no uncaught error in the output");
}

/** Until the process `pid` is stopped (SIGSTOP, or a tracing stop under strace). */
export async function untilStopped(pid: number): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const stat = await Deno.readTextFile(`/proc/${pid}/stat`);
    if (/^[Tt]$/.test(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0])) return;
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error(`process ${pid} did not stop`);
}

/** The descriptors the process `pid` holds. */
export function fdCount(pid: number): number {
  let n = 0;
  for (const _ of Deno.readDirSync(`/proc/${pid}/fd`)) n++;
  return n;
}
