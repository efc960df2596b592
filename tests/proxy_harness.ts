/**
 * Test harness: certificates made at test time, real TLS/HTTP backends, the real proxy as a
 * child process (`deno run main.ts`), and clients (Deno TLS, curl, openssl).
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  drainHash,
  makeCerts,
  type ProxyProcess as HelperProxyProcess,
  readToEnd,
  type SpawnOptions,
  spawnProxy,
  writeAll,
} from "./helpers.ts";

const NAMES = [
  "a.test",
  "*.b.test",
  "x.y.b.test",
  "b.test",
  "api7.c.test",
  "apix.c.test",
  "other.test",
  "evil.test",
  "localhost",
];

/** A CA and one leaf certificate for every test name, made once per test process. */
export interface Certs {
  dir: string;
  ca: string;
  caFile: string;
  cert: string;
  key: string;
}

let certsPromise: Promise<Certs> | null = null;

/** Makes (once) a CA and a leaf for the test names with openssl. */
export function certs(): Promise<Certs> {
  certsPromise ??= makeCerts(NAMES).then((c) => ({
    dir: c.dir,
    ca: c.caPem,
    caFile: c.caFile,
    cert: c.certPem,
    key: c.keyPem,
  }));
  return certsPromise;
}

/** A backend that answers every HTTP request with its name (HTTPS, or plain with tls false). */
export interface NamedBackend {
  name: string;
  port: number;
  /** `127.0.0.1:PORT` or `[::1]:PORT`. */
  address: string;
  /** SNI/Host names it was asked for, in order. */
  seen: string[];
  close(): Promise<void>;
}

/** Starts an HTTP(S) backend answering `NAME` to every request. */
export async function namedBackend(
  name: string,
  opts: { tls?: boolean; hostname?: string } = {},
): Promise<NamedBackend> {
  const c = await certs();
  const hostname = opts.hostname ?? "127.0.0.1";
  const seen: string[] = [];
  const ready = Promise.withResolvers<number>();
  const server = Deno.serve({
    hostname,
    port: 0,
    ...(opts.tls === false ? {} : { cert: c.cert, key: c.key }),
    onListen: (a) => ready.resolve(a.port),
  }, (req) => {
    seen.push(new URL(req.url).hostname);
    return new Response(name, { headers: { "x-backend": name } });
  });
  const port = await ready.promise;
  return {
    name,
    port,
    address: hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`,
    seen,
    close: () => server.shutdown(),
  };
}

/** A raw TLS backend: each connection is handed to `handle`. */
export interface TlsBackend {
  port: number;
  address: string;
  close(): void;
  /** Settles when every handler has finished. */
  idle(): Promise<void>;
}

/** Starts a TLS listener whose connections run `handle`. */
export async function tlsBackend(
  handle: (conn: Deno.TlsConn) => Promise<void>,
  hostname = "127.0.0.1",
): Promise<TlsBackend> {
  const c = await certs();
  const listener = Deno.listenTls({ hostname, port: 0, cert: c.cert, key: c.key });
  const running = new Set<Promise<void>>();
  (async () => {
    for await (const conn of listener) {
      const p = handle(conn).catch(() => {}).finally(() => {
        running.delete(p);
        try {
          conn.close();
        } catch { /* closed */ }
      });
      running.add(p);
    }
  })().catch(() => {});
  const port = (listener.addr as Deno.NetAddr).port;
  return {
    port,
    address: hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`,
    close: () => listener.close(),
    idle: async () => {
      while (running.size) await Promise.allSettled([...running]);
    },
  };
}

/** Echoes every byte back, passes EOF on as closeWrite. */
export function echo(conn: Deno.TlsConn): Promise<void> {
  return (async () => {
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      await writeAll(conn, buf.subarray(0, n));
    }
    await conn.closeWrite();
  })();
}

// byte-stream helpers shared with the other end-to-end suite
export { drainHash as drain, readToEnd as readAll, writeAll };

/** A TLS client to `port` on 127.0.0.1 (or `host`) that sends SNI `serverName`. */
export async function tlsClient(
  port: number,
  serverName: string,
  host = "127.0.0.1",
): Promise<Deno.TlsConn> {
  const c = await certs();
  const raw = await Deno.connect({ hostname: host, port });
  const conn = await Deno.startTls(raw, { hostname: serverName, caCerts: [c.ca] });
  await conn.handshake();
  return conn;
}

/** `curl` over HTTPS (or HTTP) to NAME on the proxy; returns the body, or throws with curl's error. */
export async function curl(
  port: number,
  name: string,
  opts: { http?: boolean; ip?: string; extra?: string[] } = {},
): Promise<{ code: number; body: string; stderr: string }> {
  const c = await certs();
  const ip = opts.ip ?? "127.0.0.1";
  const scheme = opts.http ? "http" : "https";
  const out = await new Deno.Command("curl", {
    args: [
      "-sS",
      "--max-time",
      "10",
      "--cacert",
      c.caFile,
      "--resolve",
      `${name}:${port}:${ip.includes(":") ? `[${ip}]` : ip}`,
      ...(opts.extra ?? []),
      `${scheme}://${name}:${port}/`,
    ],
    stdin: "null",
  }).output();
  return {
    code: out.code,
    body: new TextDecoder().decode(out.stdout),
    stderr: new TextDecoder().decode(out.stderr),
  };
}

/** A running proxy process, as tests/helpers.ts starts it, with this harness's shorthands. */
export interface ProxyProcess extends HelperProxyProcess {
  /** Listener ports in config order. */
  ports: number[];
  /** Waits until stderr contains `text` (or fails after `ms`). */
  waitFor(text: string | RegExp, ms?: number): Promise<void>;
}

/** Writes `config` (with a test access log and no log file) and starts the proxy on it. */
export async function startProxy(
  config: Record<string, unknown>,
  opts: SpawnOptions = {},
): Promise<ProxyProcess> {
  const p = await spawnProxy(config, opts);
  return {
    ...p,
    ports: p.listeners.map((l) => l.port),
    waitFor: (text, ms = 15_000) => p.waitForLog(text, ms),
  };
}

/** Runs `f` with the proxy, always stopping it; asserts it exits 0 unless told otherwise. */
export async function withProxy(
  config: Record<string, unknown>,
  f: (p: ProxyProcess) => Promise<void>,
): Promise<void> {
  const p = await startProxy(config);
  try {
    await f(p);
  } finally {
    const code = await p.stop();
    assert.equal(code, 0, `proxy exit code; stderr:\n${p.stderr()}`);
  }
}

/** A free TCP port with nothing listening (bound then closed). */
export function closedPort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Deterministic pseudo-random bytes (fast; xorshift). */
export function randomBytes(n: number, seed = 1): Uint8Array {
  const out = new Uint8Array(n);
  const words = new Uint32Array(out.buffer, 0, n >> 2);
  let x = seed || 1;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x;
  }
  for (let i = words.length * 4; i < n; i++) out[i] = i & 0xff;
  return out;
}

/** sha256 hex of bytes. */
export function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Resolves after `ms`. */
export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Asserts that `promtool check metrics` accepts `text` (exposition format and naming rules). */
export async function assertPromtoolClean(text: string): Promise<void> {
  const promtool = new Deno.Command("promtool", {
    args: ["check", "metrics"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const w = promtool.stdin.getWriter();
  await w.write(new TextEncoder().encode(text));
  await w.close();
  const checked = await promtool.output();
  const said = new TextDecoder().decode(checked.stdout) + new TextDecoder().decode(checked.stderr);
  assert.equal(checked.code, 0, `promtool: ${said}`);
}

/** One histogram series read back from Prometheus text. */
export interface HistogramSeries {
  /** `[le, cumulative count]` in the order written. */
  buckets: [string, number][];
  sum: number;
  count: number;
}

/**
 * The series of histogram `name` whose labels (but for `le`) are exactly `labels`, as written
 * in `text`; asserts it is there.
 */
export function histogramSeries(
  text: string,
  name: string,
  labels: Record<string, string>,
): HistogramSeries {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).sort().join(",");
  const series: HistogramSeries = { buckets: [], sum: NaN, count: NaN };
  for (const line of text.split("\n")) {
    const m = /^(\w+)\{([^}]*)\} (\S+)$/.exec(line);
    if (!m || !m[1].startsWith(name + "_")) continue;
    const pairs = m[2].split(",");
    const le = pairs.find((p) => p.startsWith("le="))?.slice(4, -1);
    if (pairs.filter((p) => !p.startsWith("le=")).sort().join(",") !== want) continue;
    const value = Number(m[3]);
    const suffix = m[1].slice(name.length + 1);
    if (suffix === "bucket" && le !== undefined) series.buckets.push([le, value]);
    else if (suffix === "sum") series.sum = value;
    else if (suffix === "count") series.count = value;
  }
  assert.ok(series.buckets.length > 0, `no series ${name}{${want}} in:\n${text}`);
  return series;
}

/** Asserts a histogram series is well formed: cumulative buckets ending in `+Inf` = count. */
export function assertCumulative(s: HistogramSeries): void {
  const counts = s.buckets.map(([, n]) => n);
  assert.deepEqual(counts, [...counts].sort((a, b) => a - b), "buckets are cumulative");
  assert.deepEqual(s.buckets.at(-1), ["+Inf", s.count], "the last bucket is +Inf, = count");
  const bounds = s.buckets.slice(0, -1).map(([le]) => Number(le));
  assert.deepEqual(bounds, [...bounds].sort((a, b) => a - b), "bounds ascend");
}
