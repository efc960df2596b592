/**
 * Clients of the proxy: Deno's TLS client, identity questions (`who`) over TLS and plain HTTP,
 * curl, openssl s_client and node:net (for source addresses).
 *
 * @module
 */
import net from "node:net";
import { testCerts } from "./certs.ts";
import { LineReader, writeAll } from "./bytes.ts";
import { within } from "./scope.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

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

/** What {@linkcode curl} got. */
export interface CurlResult extends CommandResult {
  /** The response body: stdout without the `status=` line curl is asked to add. */
  body: string;
}

/**
 * `curl` to `https://NAME:PORT/` (or `http://` with `http`), NAME resolved to `ip` with
 * --resolve, verified against the test CA. `iface` binds the client's source address. stdout
 * ends in `\nstatus=CODE` (the HTTP status; 000 without one) unless `extra` has a `-w` of its
 * own.
 */
export async function curl(
  port: number,
  name: string,
  opts: { http?: boolean; ip?: string; iface?: string; extra?: string[] } = {},
): Promise<CurlResult> {
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
  const stdout = decoder.decode(out.stdout);
  return {
    code: out.code,
    stdout,
    body: stdout.replace(/\nstatus=\d{3}$/, ""),
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
