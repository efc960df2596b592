/**
 * End-to-end test harness: certificates made at test time, real TLS and HTTP backends that say
 * who they are, the real proxy as a child process (`deno run main.ts`), and real clients (Deno
 * TLS, node:net, openssl s_client, curl). Everything a test starts is registered in its
 * {@linkcode Scope} and torn down when the test ends, fails or runs out of time.
 *
 * @module
 */
import type { AccessEntry as LoggedAccessEntry } from "../src/ops/log.ts";
import { concat, lines, LineSplitter, writeAll } from "../src/net/bytes.ts";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import net from "node:net";

/** The repository root (where main.ts lives), with a trailing slash. */
export const ROOT: string = new URL("..", import.meta.url).pathname;

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// ---------------------------------------------------------------------------------------------
// Test scope: bounded time, guaranteed cleanup

/** Collects cleanups of one test; they run in reverse order when the test ends. */
export class Scope {
  readonly #cleanups: (() => void | Promise<void>)[] = [];

  /** Registers `cleanup` to run when the test ends (last registered runs first). */
  defer(cleanup: () => void | Promise<void>): void {
    this.#cleanups.push(cleanup);
  }

  /** Runs every cleanup once, never throwing. */
  async close(): Promise<void> {
    while (this.#cleanups.length > 0) {
      const cleanup = this.#cleanups.pop()!;
      try {
        await cleanup();
      } catch { /* best effort: the test result is decided elsewhere */ }
    }
  }
}

/**
 * Declares an end-to-end test bounded by `timeoutMs`: on timeout the scope is torn down (which
 * kills the proxy and closes the backends, so pending I/O settles) and the test fails.
 */
export function e2eTest(
  name: string,
  fn: (scope: Scope) => Promise<void>,
  opts: { timeoutMs?: number; ignore?: boolean } = {},
): void {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  Deno.test({
    name,
    ignore: opts.ignore,
    // child processes and sockets are torn down by the scope; the timer race can leave an op
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      const scope = new Scope();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timedOut = new Promise<"timeout">((resolve) => {
        timer = setTimeout(() => resolve("timeout"), timeoutMs);
      });
      const run = fn(scope);
      try {
        const first = await Promise.race([run.then(() => "done" as const), timedOut]);
        if (first === "timeout") {
          await scope.close();
          await Promise.race([run.catch(() => {}), sleep(2000)]);
          throw new Error(`test did not finish within ${timeoutMs} ms`);
        }
      } finally {
        clearTimeout(timer);
        await scope.close();
      }
    },
  });
}

/** Races `p` against a timer; rejects with `what` in the message when the timer wins. */
export async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

// ---------------------------------------------------------------------------------------------
// Certificates

/** Names the test leaf certificate is valid for. */
export const CERT_NAMES: readonly string[] = [
  "a.test",
  "b.test",
  "*.b.test",
  "x.y.b.test",
  "api7.c.test",
  "api42.c.test",
  "apix.c.test",
  "other.test",
  "nomatch.test",
  "localhost",
  "allowed.localhost",
];

/** A test CA and one leaf certificate signed by it for every {@linkcode CERT_NAMES} entry. */
export interface TestCerts {
  dir: string;
  caPem: string;
  caFile: string;
  certPem: string;
  keyPem: string;
}

let certsOnce: Promise<TestCerts> | null = null;

async function runChecked(cmd: string, args: string[], cwd?: string): Promise<void> {
  const out = await new Deno.Command(cmd, { args, cwd, stdin: "null" }).output();
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${out.code}:\n${decoder.decode(out.stderr)}`,
    );
  }
}

/** Makes (once per test file) a CA and a leaf certificate with openssl, in a temp dir. */
export function testCerts(): Promise<TestCerts> {
  certsOnce ??= makeCerts(CERT_NAMES);
  return certsOnce;
}

/** A new CA, and a leaf signed by it for `names` (and 127.0.0.1, ::1), made with openssl. */
export async function makeCerts(names: readonly string[]): Promise<TestCerts> {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-certs-" });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await runChecked("openssl", [
    "req",
    "-x509",
    ...ec,
    "-days",
    "1",
    "-subj",
    "/CN=sni-proxy e2e CA",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
    "-keyout",
    "ca.key",
    "-out",
    "ca.pem",
  ], dir);
  await runChecked("openssl", [
    "req",
    ...ec,
    "-subj",
    "/CN=a.test",
    "-keyout",
    "leaf.key",
    "-out",
    "leaf.csr",
  ], dir);
  const san = [...names.map((n) => `DNS:${n}`), "IP:127.0.0.1", "IP:::1"].join(",");
  await Deno.writeTextFile(
    `${dir}/leaf.ext`,
    `subjectAltName=${san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n`,
  );
  await runChecked("openssl", [
    "x509",
    "-req",
    "-in",
    "leaf.csr",
    "-CA",
    "ca.pem",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-days",
    "1",
    "-extfile",
    "leaf.ext",
    "-out",
    "leaf.pem",
  ], dir);
  return {
    dir,
    caPem: await Deno.readTextFile(`${dir}/ca.pem`),
    caFile: `${dir}/ca.pem`,
    certPem: await Deno.readTextFile(`${dir}/leaf.pem`),
    keyPem: await Deno.readTextFile(`${dir}/leaf.key`),
  };
}

// ---------------------------------------------------------------------------------------------
// Byte helpers

/** Writes all of `data` to `conn`. */
export { writeAll };

/** Reads until EOF; returns the byte count and sha256 (hex). Read errors propagate. */
export async function drainHash(conn: Deno.Conn): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash("sha256");
  const buf = new Uint8Array(256 * 1024);
  let bytes = 0;
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    hash.update(buf.subarray(0, n));
    bytes += n;
  }
  return { bytes, sha256: hash.digest("hex") };
}

/** Reads until EOF and returns everything. Read errors propagate. */
export async function readToEnd(conn: Deno.Conn): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  const buf = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    parts.push(buf.slice(0, n));
  }
  return concat(...parts);
}

/**
 * What a read on a connection ends with: `"eof"`, `"reset"`/`"error"` (with the error name), or
 * `"data"` when bytes arrive first. Used to assert how the proxy closed a connection.
 */
export async function readOutcome(
  conn: Deno.Conn,
): Promise<{ kind: "eof" | "data" | "error"; error?: string; bytes?: Uint8Array }> {
  const buf = new Uint8Array(16 * 1024);
  try {
    const n = await conn.read(buf);
    if (n === null) return { kind: "eof" };
    return { kind: "data", bytes: buf.slice(0, n) };
  } catch (e) {
    return { kind: "error", error: `${(e as Error).name}: ${(e as Error).message}` };
  }
}

/** sha256 (hex) of `data`. */
export function sha256(data: Uint8Array): string {
  return createHash("sha256").update(data).digest("hex");
}

/** Fast deterministic pseudo-random bytes (xorshift32) from `seed`. */
export function pseudoRandomBytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  const words = new Uint32Array(out.buffer, 0, n >>> 2);
  let x = (seed >>> 0) || 0x9e3779b9;
  for (let i = 0; i < words.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    words[i] = x >>> 0;
  }
  for (let i = words.length * 4; i < n; i++) out[i] = (x >>> (8 * (i & 3))) & 0xff;
  return out;
}

/** Buffered line reader over a connection (for the line protocol of the identity backends). */
export class LineReader {
  readonly #lines = new LineSplitter();
  readonly #chunk = new Uint8Array(4096);
  constructor(readonly conn: Deno.Conn) {}

  /** The next `\n`-terminated line (without `\n`), or null at EOF. */
  async line(): Promise<string | null> {
    for (;;) {
      const line = this.#lines.shift();
      if (line !== null) return line;
      const n = await this.conn.read(this.#chunk);
      if (n === null) return null;
      this.#lines.push(this.#chunk.subarray(0, n));
    }
  }
}

/** Formats host and port as the proxy does: `127.0.0.1:80`, `[::1]:80`. */
export function hostPort(hostname: string, port: number): string {
  return hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`;
}

// ---------------------------------------------------------------------------------------------
// Backends

/** A backend that tells who it is; see {@linkcode identityBackend}. */
export interface IdentityBackend {
  name: string;
  port: number;
  /** `host:port` as written in a config. */
  address: string;
  /** Connections accepted so far. */
  accepted: number;
  /** `Host` headers of HTTP requests seen, in order. */
  hosts: string[];
  close(): void;
}

const HTTP_METHOD = /^(GET|HEAD|POST|PUT|DELETE|OPTIONS) /;

/**
 * Starts a backend that says its name: to every line `L` it answers `backend=NAME L`; when the
 * first bytes are an HTTP request it answers `200` with body `NAME` (and header `x-backend`) and
 * closes. TLS (with the test certificate) unless `tls` is false. EOF from the client becomes
 * closeWrite.
 */
export async function identityBackend(
  scope: Scope,
  name: string,
  opts: { hostname?: string; tls?: boolean; port?: number } = {},
): Promise<IdentityBackend> {
  const hostname = opts.hostname ?? "127.0.0.1";
  const serve = async (conn: Deno.Conn) => {
    let text = "";
    const chunk = new Uint8Array(4096);
    for (;;) {
      const n = await conn.read(chunk);
      if (n === null) break;
      text += decoder.decode(chunk.subarray(0, n));
      if (HTTP_METHOD.test(text)) {
        const end = text.indexOf("\r\n\r\n");
        if (end < 0) continue;
        const host = /\r\nhost:\s*([^\r\n]*)/i.exec(text.slice(0, end))?.[1] ?? "";
        backend.hosts.push(host.trim());
        await writeAll(
          conn,
          encoder.encode(
            `HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-backend: ${name}\r\n` +
              `content-length: ${name.length}\r\nconnection: close\r\n\r\n${name}`,
          ),
        );
        return;
      }
      let nl;
      while ((nl = text.indexOf("\n")) >= 0) {
        const line = text.slice(0, nl).replace(/\r$/, "");
        text = text.slice(nl + 1);
        await writeAll(conn, encoder.encode(`backend=${name} ${line}\n`));
      }
    }
    await conn.closeWrite();
  };
  const server = await rawServer(scope, serve, {
    hostname,
    tls: opts.tls ?? true,
    port: opts.port,
  });
  const backend: IdentityBackend = {
    name,
    port: server.port,
    address: server.address,
    get accepted() {
      return server.accepted;
    },
    hosts: [],
    close: server.close,
  };
  return backend;
}

/** A TCP or TLS server running a handler per connection. */
export interface RawServer {
  port: number;
  address: string;
  accepted: number;
  /** Handler failures (error name: message), for assertions about what a backend saw. */
  errors: string[];
  /** Completes when every handler started so far has finished. */
  settled(): Promise<void>;
  close(): void;
}

/**
 * Starts a server on `hostname:port` (port 0: a free one; TLS with the test certificate unless
 * `tls` is false) that runs `handle` for each connection and closes the connection afterwards.
 */
export async function rawServer(
  scope: Scope,
  handle: (conn: Deno.Conn) => Promise<void>,
  opts: { hostname?: string; tls?: boolean; port?: number } = {},
): Promise<RawServer> {
  const hostname = opts.hostname ?? "127.0.0.1";
  const port0 = opts.port ?? 0;
  let listener: Deno.Listener;
  if (opts.tls ?? true) {
    const c = await testCerts();
    listener = Deno.listenTls({ hostname, port: port0, cert: c.certPem, key: c.keyPem });
  } else {
    listener = Deno.listen({ hostname, port: port0 });
  }
  const port = (listener.addr as Deno.NetAddr).port;
  const running = new Set<Promise<void>>();
  const conns = new Set<Deno.Conn>();
  const server: RawServer = {
    port,
    address: hostPort(hostname, port),
    accepted: 0,
    errors: [],
    settled: async () => {
      while (running.size > 0) await Promise.allSettled([...running]);
    },
    close: () => {
      try {
        listener.close();
      } catch { /* already closed */ }
      for (const c of conns) {
        try {
          c.close();
        } catch { /* already closed */ }
      }
    },
  };
  (async () => {
    for await (const conn of listener) {
      server.accepted++;
      conns.add(conn);
      const p: Promise<void> = handle(conn)
        .catch((e) => {
          server.errors.push(`${(e as Error).name}: ${(e as Error).message}`);
        })
        .finally(() => {
          running.delete(p);
          conns.delete(conn);
          try {
            conn.close();
          } catch { /* already closed */ }
        });
      running.add(p);
    }
  })().catch(() => {});
  scope.defer(server.close);
  return server;
}

/** Handler: echoes every byte back; EOF from the peer becomes closeWrite. */
export async function echoHandler(conn: Deno.Conn): Promise<void> {
  const buf = new Uint8Array(64 * 1024);
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    await writeAll(conn, buf.subarray(0, n));
  }
  await conn.closeWrite();
}

// ---------------------------------------------------------------------------------------------
// Clients

/**
 * A TLS connection to `host:port` sending SNI `serverName` (verified against the test CA).
 * Deno.connectTls has no server-name override, so this is connect + startTls.
 */
export async function tlsConnect(
  port: number,
  serverName: string,
  host = "127.0.0.1",
): Promise<Deno.TlsConn> {
  const c = await testCerts();
  const tcp = await Deno.connect({ hostname: host, port });
  try {
    const tls = await Deno.startTls(tcp, { hostname: serverName, caCerts: [c.caPem] });
    await tls.handshake();
    return tls;
  } catch (e) {
    try {
      tcp.close();
    } catch { /* startTls consumed it */ }
    throw e;
  }
}

/**
 * Asks over TLS with SNI `serverName` which backend answers; returns its name. Throws when the
 * handshake fails or the connection closes without an answer.
 */
export async function whoAnswers(
  port: number,
  serverName: string,
  host = "127.0.0.1",
): Promise<string> {
  const conn = await within(10_000, `TLS to ${serverName}`, tlsConnect(port, serverName, host));
  try {
    await writeAll(conn, encoder.encode("who\n"));
    const line = await within(10_000, `answer for ${serverName}`, new LineReader(conn).line());
    const m = line === null ? null : /^backend=(\S+) who$/.exec(line);
    if (!m) throw new Error(`unexpected answer for ${serverName}: ${JSON.stringify(line)}`);
    return m[1];
  } finally {
    conn.close();
  }
}

/**
 * The outcome of a TLS attempt that is expected to fail: the error message, or `null` when the
 * handshake and a round trip worked.
 */
export async function tlsFailure(
  port: number,
  serverName: string,
  host = "127.0.0.1",
): Promise<string | null> {
  try {
    await whoAnswers(port, serverName, host);
    return null;
  } catch (e) {
    return `${(e as Error).name}: ${(e as Error).message}`;
  }
}

/** Result of a command-line client. */
export interface CommandResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * `curl` to `https://NAME:PORT/` (or `http://` with `http`), NAME resolved to `ip` with
 * --resolve, verified against the test CA. `iface` binds the client's source address.
 */
export async function curl(
  port: number,
  name: string,
  opts: { http?: boolean; ip?: string; iface?: string; extra?: string[] } = {},
): Promise<CommandResult> {
  const c = await testCerts();
  const ip = opts.ip ?? "127.0.0.1";
  const args = [
    "-sS",
    "--max-time",
    "10",
    "--cacert",
    c.caFile,
    "--resolve",
    `${name}:${port}:${ip.includes(":") ? `[${ip}]` : ip}`,
    "-w",
    "\nstatus=%{http_code}",
    ...(opts.iface ? ["--interface", opts.iface] : []),
    ...(opts.extra ?? []),
    `${opts.http ? "http" : "https"}://${name}:${port}/`,
  ];
  const out = await new Deno.Command("curl", { args, stdin: "null" }).output();
  return {
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
}

/**
 * `openssl s_client` to 127.0.0.1:PORT with `-servername NAME` (or `-noservername` when `name`
 * is null) and `extra` arguments; sends `who`, waits until a backend answers, the process
 * exits, or `ms` pass.
 */
export async function opensslClient(
  port: number,
  name: string | null,
  ms = 5000,
  extra: string[] = [],
): Promise<CommandResult & { answer: string | null }> {
  const c = await testCerts();
  const child = new Deno.Command("openssl", {
    args: [
      "s_client",
      "-connect",
      `127.0.0.1:${port}`,
      ...(name === null ? ["-noservername"] : ["-servername", name]),
      "-CAfile",
      c.caFile,
      "-verify_return_error",
      "-ign_eof",
      ...extra,
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let stdout = "";
  let stderr = "";
  const answered = Promise.withResolvers<void>();
  const pump = async (stream: ReadableStream<Uint8Array>, add: (s: string) => void) => {
    const d = new TextDecoder();
    for await (const chunk of stream) {
      add(d.decode(chunk, { stream: true }));
      if (/backend=\S+ who/.test(stdout)) answered.resolve();
    }
  };
  const pumps = Promise.all([
    pump(child.stdout, (s) => (stdout += s)),
    pump(child.stderr, (s) => (stderr += s)),
  ]);
  const writer = child.stdin.getWriter();
  await writer.write(encoder.encode("who\n")).catch(() => {});
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    answered.promise,
    child.status,
    new Promise((r) => (timer = setTimeout(r, ms))),
  ]);
  clearTimeout(timer);
  try {
    child.kill("SIGKILL");
  } catch { /* exited */ }
  await writer.close().catch(() => {});
  const status = await child.status;
  await pumps;
  const answer = /backend=(\S+) who/.exec(stdout)?.[1] ?? null;
  return { code: status.code, stdout, stderr, answer };
}

/** A node:net TCP connection from `localAddress` (to test source-address rules). */
export function nodeConnect(
  port: number,
  localAddress: string,
  host = "127.0.0.1",
): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host, port, localAddress });
    socket.once("connect", () => resolve(socket));
    socket.once("error", reject);
  });
}

/**
 * The bytes of a real ClientHello with SNI `serverName` (as sent by Deno's TLS client),
 * captured on a local listener.
 */
export async function captureClientHello(serverName: string): Promise<Uint8Array> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const port = (listener.addr as Deno.NetAddr).port;
    const client = (async () => {
      const tcp = await Deno.connect({ hostname: "127.0.0.1", port });
      const tls = await Deno.startTls(tcp, { hostname: serverName });
      await tls.handshake().catch(() => {});
      tls.close();
    })().catch(() => {});
    const conn = await listener.accept();
    const buf = new Uint8Array(16 * 1024);
    let have = 0;
    // the record header says how long the hello is; read until all of it is here
    for (;;) {
      const n = await conn.read(buf.subarray(have));
      if (n === null) break;
      have += n;
      if (have >= 5 && have >= 5 + ((buf[3] << 8) | buf[4])) break;
    }
    conn.close();
    await client;
    assert.equal(buf[0], 0x16, "captured bytes are a TLS handshake record");
    return buf.slice(0, 5 + ((buf[3] << 8) | buf[4]));
  } finally {
    listener.close();
  }
}

/** Reads exactly `n` bytes (throws at an early EOF). */
export async function readExact(conn: Deno.Conn, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let have = 0;
  while (have < n) {
    const got = await conn.read(out.subarray(have));
    if (got === null) throw new Error(`EOF after ${have} of ${n} bytes`);
    have += got;
  }
  return out;
}

/**
 * Backend side of a raw session: reads the relayed TLS ClientHello record (header, then the
 * length it announces) and returns it, leaving the stream at the first payload byte.
 */
export async function readClientHello(conn: Deno.Conn): Promise<Uint8Array> {
  const header = await readExact(conn, 5);
  assert.equal(header[0], 0x16, "first relayed byte starts a handshake record");
  const body = await readExact(conn, (header[3] << 8) | header[4]);
  const hello = new Uint8Array(5 + body.length);
  hello.set(header);
  hello.set(body, 5);
  return hello;
}

const helloCache = new Map<string, Promise<Uint8Array>>();

/** A real ClientHello for `serverName` ({@linkcode captureClientHello}), captured once. */
export function clientHelloBytes(serverName: string): Promise<Uint8Array> {
  let hello = helloCache.get(serverName);
  if (!hello) {
    hello = captureClientHello(serverName);
    helloCache.set(serverName, hello);
  }
  return hello;
}

/**
 * Opens a raw TCP connection to the proxy and sends a real ClientHello for `serverName`, so the
 * proxy routes it; after that the test speaks raw bytes with a plain-TCP backend (which reads the
 * hello with {@linkcode readClientHello}). Gives exact byte counts and full control of
 * half-close and reset, which TLS end points hide.
 */
export async function rawSession(
  port: number,
  serverName: string,
  host = "127.0.0.1",
): Promise<{ conn: Deno.TcpConn; hello: Uint8Array }> {
  const bytes = await clientHelloBytes(serverName);
  const conn = await Deno.connect({ hostname: host, port });
  await writeAll(conn, bytes);
  return { conn, hello: bytes };
}

/**
 * A route with a dynamic backend: names matching `match` are connected to themselves on `port`
 * (`$sni:PORT`), allowed by `match` itself unless `extra` says otherwise. Test names resolve to
 * loopback, which a `$sni` route dials only with an opt-in in `extra` (`allow_private: true`).
 */
export function sniRoute(
  match: string,
  port: number,
  extra: Record<string, unknown> = {},
): Record<string, unknown> {
  return { match, backends: [`$sni:${port}`], allow: [match], ...extra };
}

/** A TCP port on 127.0.0.1 with nothing listening (bound, then released). */
export function unusedPort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** The bundled config.json, moved to free ports, and the backends it routes to. */
export interface BundledConfig {
  /** The file's content as shipped, but for its loopback addresses. */
  config: Record<string, unknown>;
  /** The free ports its TLS and its HTTP listener got. */
  ports: { tls: number; http: number };
}

/**
 * The repository's config.json as shipped, with every loopback address moved to a free port,
 * and an identity backend at each backend address: TLS for the tables of its TLS listener,
 * plain for those of its HTTP listener. Each backend is named after the address in the file,
 * e.g. `tls-127.0.0.1:9443` and `http-127.0.0.1:9080`.
 */
export async function bundledConfig(scope: Scope): Promise<BundledConfig> {
  type Listener = { address: string; protocol: string; table?: string };
  type Routes = { backends: string[] }[];
  const bundled = JSON.parse(await Deno.readTextFile(`${ROOT}config.json`));
  const tables: Record<string, Routes> = { default: bundled.routes };
  for (const [name, t] of Object.entries(bundled.tables ?? {})) {
    tables[name] = (t as { routes: Routes }).routes;
  }
  const moved = new Map<string, string>();
  const ports = { tls: 0, http: 0 };
  for (const l of bundled.listeners as Listener[]) {
    const port = unusedPort();
    if (l.protocol === "tls" || l.protocol === "http") ports[l.protocol] = port;
    moved.set(l.address, l.address.replace(/:\d+$/, `:${port}`));
    const tls = l.protocol !== "http";
    for (const address of tables[l.table ?? "default"].flatMap((r) => r.backends)) {
      if (moved.has(address)) continue;
      const hostname = address.slice(0, address.lastIndexOf(":")).replace(/^\[|\]$/g, "");
      const b = await identityBackend(scope, `${tls ? "tls" : "http"}-${address}`, {
        hostname,
        tls,
      });
      moved.set(address, b.address);
    }
  }
  const config = JSON.parse(
    JSON.stringify(bundled).replace(
      /"((?:127\.0\.0\.1|\[::1\]):\d+)"/g,
      (text, address) => moved.has(address) ? JSON.stringify(moved.get(address)) : text,
    ),
  );
  return { config, ports };
}

/**
 * Asserts that a proxy on {@linkcode bundledConfig} serves as the file says: `localhost` over
 * TLS (Deno's client and curl) to the TLS backend, and over plain HTTP (curl) to the HTTP one.
 */
export async function assertServesBundled(bundled: BundledConfig): Promise<void> {
  const { tls, http } = bundled.ports;
  assert.equal(await whoAnswers(tls, "localhost"), "tls-127.0.0.1:9443");
  const viaTls = await curl(tls, "localhost");
  assert.equal(viaTls.stdout, "tls-127.0.0.1:9443\nstatus=200", viaTls.stderr);
  const viaHttp = await curl(http, "localhost", { http: true });
  assert.equal(viaHttp.stdout, "http-127.0.0.1:9080\nstatus=200", viaHttp.stderr);
  const wildcard = await curl(http, "www.example.test", { http: true });
  assert.match(wildcard.stdout, /^http-127\.0\.0\.1:908[01]\nstatus=200$/, wildcard.stderr);
}

// ---------------------------------------------------------------------------------------------
// The proxy process

/** One access-log entry as read back from the file (src/ops/log.ts writes it). */
export type AccessEntry = LoggedAccessEntry & Record<string, unknown>;

/** A listener as the proxy logged it. */
export interface ListenerInfo {
  host: string;
  port: number;
  protocol: string;
}

/** A running proxy child process. */
export interface ProxyProcess {
  pid: number;
  /** Listeners from the `listening on` lines, in config order. */
  listeners: ListenerInfo[];
  /** Port of listener `i` (default the first). */
  port(i?: number): number;
  configPath: string;
  accessLogPath: string;
  /** stderr so far. */
  stderr(): string;
  /** Waits until stderr (from `from` chars on) matches `what`. */
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

/** How to start the proxy process. */
export interface SpawnOptions {
  /** How long to wait for its `ready:` line. */
  readyMs?: number;
  /** A command to run it under, e.g. `["ip", "netns", "exec", "ns1"]`. */
  wrapper?: string[];
  /** Its environment (default: this process's). */
  env?: Record<string, string>;
  /**
   * A command line to run instead of `deno run main.ts --config PATH`, for a proxy that reads
   * its config elsewhere (the harness's config file is written all the same, and unused).
   */
  command?: string[];
}

/**
 * Starts the proxy on `config` (plus the test log section) and waits for `ready`. The process
 * is stopped (SIGTERM, then SIGKILL) when the scope closes.
 */
export async function startProxy(
  scope: Scope,
  config: Record<string, unknown>,
  opts: SpawnOptions = {},
): Promise<ProxyProcess> {
  return await spawnProxy(config, opts, (stop) =>
    scope.defer(async () => {
      await stop(5000);
    }));
}

/**
 * Starts the proxy on `config` (plus the test log section) and waits for `ready`; on failure
 * it is killed. The caller stops it (startProxy ties that to a scope). `onSpawned` gets its
 * stop function as soon as it runs.
 */
export async function spawnProxy(
  config: Record<string, unknown>,
  opts: SpawnOptions = {},
  onSpawned?: (stop: (ms?: number) => Promise<number>) => void,
): Promise<ProxyProcess> {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-proxy-" });
  const accessLogPath = `${dir}/access.log`;
  const configPath = `${dir}/config.json`;
  const writeConfig = (c: Record<string, unknown>) =>
    Deno.writeTextFile(configPath, JSON.stringify(withTestDefaults(c, accessLogPath), null, 2));
  await writeConfig(config);
  const args = ["run", "-A", "--unstable-net", `${ROOT}main.ts`, "--config", configPath];
  const wrapper = opts.wrapper ?? [];
  const argv = opts.command ?? [...wrapper, Deno.execPath(), ...args];
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    env: opts.env,
  }).spawn();
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  let text = "";
  const listeners = new Set<() => void>();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    const d = new TextDecoder();
    for await (const chunk of stream) {
      text += d.decode(chunk, { stream: true });
      for (const l of listeners) l();
    }
  };
  const pumps = Promise.all([pump(child.stdout), pump(child.stderr)]).catch(() => {});

  const waitForLog = async (what: string | RegExp, ms = 10_000, from = 0) => {
    const has = () => {
      const t = text.slice(from);
      return typeof what === "string" ? t.includes(what) : what.test(t);
    };
    if (has()) return;
    const found = Promise.withResolvers<void>();
    const check = () => {
      if (has()) found.resolve();
    };
    listeners.add(check);
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      await Promise.race([
        found.promise,
        status.then(async (st) => {
          await pumps;
          if (!has()) {
            const how = st.signal ? `killed by ${st.signal}` : `exited ${st.code}`;
            throw new Error(`proxy ${how} before logging ${what}; output:\n${text}`);
          }
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
      listeners.delete(check);
    }
  };

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
    await pumps;
    return s.code;
  };
  onSpawned?.(stop);
  try {
    await waitForLog(/sni-proxy·proxy: ready: /, opts.readyMs ?? 20_000);
  } catch (e) {
    if (!onSpawned) await stop(0);
    throw e;
  }
  const listening = [
    ...text.matchAll(/sni-proxy·proxy: listening on (\[[^\]]+\]|[0-9.]+):(\d+) \((\w+)\)/g),
  ];
  const infos = listening.map((m) => ({
    host: m[1].replace(/^\[|\]$/g, ""),
    port: Number(m[2]),
    protocol: m[3],
  }));
  const access = async (): Promise<AccessEntry[]> => {
    let t: string;
    try {
      t = await Deno.readTextFile(accessLogPath);
    } catch {
      return [];
    }
    // a line may be half-written while we read: only complete lines count
    return t.split("\n").slice(0, -1).filter(Boolean).map((l) => JSON.parse(l));
  };
  return {
    pid: child.pid,
    listeners: infos,
    port: (i = 0) => {
      assert.ok(infos[i], `listener ${i} not logged; output:\n${text}`);
      return infos[i].port;
    },
    configPath,
    accessLogPath,
    stderr: () => text,
    waitForLog,
    access,
    waitAccess: async (pred, ms = 8000) => {
      const deadline = Date.now() + ms;
      for (;;) {
        const entries = await access();
        const hit = entries.find(pred);
        if (hit) return hit;
        if (Date.now() > deadline) {
          throw new Error(
            `no matching access-log entry within ${ms} ms; entries:\n` +
              entries.map((e) => JSON.stringify(e)).join("\n"),
          );
        }
        await sleep(50);
      }
    },
    writeConfig,
    signal: (sig) => child.kill(sig),
    status,
    stop,
  };
}

/** The proxy's Prometheus text, from the metrics address it logged (`metrics.address` port 0). */
export async function scrapeMetrics(proxy: ProxyProcess): Promise<string> {
  const addr = /metrics on http:\/\/([^/\s]+)\/metrics/.exec(proxy.stderr())?.[1];
  assert.ok(addr, `no metrics address logged:\n${proxy.stderr()}`);
  return await fetch(`http://${addr}/metrics`).then((r) => r.text());
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

const httpRequest = new TextEncoder().encode("GET / HTTP/1.1\r\nhost: a.test\r\n\r\n");

/**
 * One plain-HTTP request through the proxy; returns the answering backend's name. `from`: a
 * loopback source address to connect from (node:net), for source_hash.
 */
export async function httpWho(port: number, from?: string): Promise<string> {
  if (from) {
    const socket = await nodeConnect(port, from);
    const text = await new Promise<string>((resolve, reject) => {
      let got = "";
      socket.on("data", (d: Uint8Array) => (got += new TextDecoder().decode(d)));
      socket.once("end", () => resolve(got));
      socket.once("error", reject);
      socket.end(httpRequest);
    });
    socket.destroy();
    return backendOf(text);
  }
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await writeAll(conn, httpRequest);
    let text = "";
    const buf = new Uint8Array(1024);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    return backendOf(text);
  } finally {
    conn.close();
  }
}

/** The name in an identity backend's HTTP answer. */
function backendOf(text: string): string {
  const name = /\r\nx-backend: (\S+)/.exec(text)?.[1];
  if (!name) throw new Error(`no backend answered: ${JSON.stringify(text)}`);
  return name;
}

/**
 * `total` requests, `parallel` at a time; counts by backend name. `sources`: spread them over
 * that many loopback source addresses (127.1.x.y).
 */
export async function spread(
  port: number,
  total: number,
  parallel = 32,
  sources = 0,
): Promise<Map<string, number>> {
  const counts = new Map<string, number>();
  let next = 0;
  await Promise.all(Array.from({ length: parallel }, async () => {
    while (next < total) {
      const i = next++ % (sources || 1);
      const who = await httpWho(port, sources ? `127.1.${i >> 7}.${(i & 127) + 1}` : undefined);
      counts.set(who, (counts.get(who) ?? 0) + 1);
    }
  }));
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Network namespaces and traffic in them (root)

/** Runs `ip ARGS`; throws with its stderr when it fails. */
export async function ip(...args: string[]): Promise<void> {
  const out = await new Deno.Command("ip", { args, stderr: "piped" }).output();
  if (!out.success) {
    throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/**
 * tests/fixtures/restart_traffic.ts run by `wrapper` (`ip netns exec NS`) with `args`: its echo
 * backend (its port, or null) and client loops (`start` them against a proxy, `stop` them for
 * their result). Killed when the scope closes.
 */
export async function traffic(s: Scope, wrapper: string[], args: string[] = []) {
  const child = new Deno.Command(wrapper[0], {
    args: [
      ...wrapper.slice(1),
      Deno.execPath(),
      "run",
      "-A",
      `${ROOT}tests/fixtures/restart_traffic.ts`,
      ...args,
    ],
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  s.defer(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  });
  const output = lines(child.stdout);
  const line = async () => {
    const { value, done } = await output.next();
    if (done) throw new Error("the traffic fixture ended early");
    return JSON.parse(value);
  };
  const stdin = child.stdin.getWriter();
  const send = (v: unknown) => stdin.write(new TextEncoder().encode(JSON.stringify(v) + "\n"));
  const { backend } = await within(20_000, "the traffic fixture's backend", line());
  return {
    backend: backend as number | null,
    start: (proxy: number, host?: string) => send({ proxy, host }),
    stop: async () => {
      await send("stop");
      return await within(30_000, "the traffic fixture's result", line()) as {
        connections: number;
        bytes: number;
        errors: string[];
      };
    },
  };
}

/** Waits (up to `ms`) until `p`'s access log holds `n` entries. */
export async function served(p: ProxyProcess, n: number, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while ((await p.access()).length < n) {
    if (Date.now() > deadline) throw new Error(`fewer than ${n} connections served`);
    await sleep(50);
  }
}
