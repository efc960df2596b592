/**
 * Backends the proxy routes to: servers that say who they are (line protocol and HTTP), raw TCP
 * or TLS servers running a handler per connection, an echo handler, HTTP(S) servers answering
 * their name, and plain-TCP backends for raw sessions.
 *
 * @module
 */
import { testCerts } from "./certs.ts";
import { hostPort, writeAll } from "./bytes.ts";
import { GO, readClientHello } from "./hello.ts";
import type { Scope } from "./scope.ts";
import { TcpListenSocket } from "../../src/io/tcp.ts";
import { EventLoop } from "../../src/io/loop.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

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
  const c = await testCerts();
  const hostname = opts.hostname ?? "127.0.0.1";
  const seen: string[] = [];
  const ready = Promise.withResolvers<number>();
  const server = Deno.serve({
    hostname,
    port: 0,
    ...(opts.tls === false ? {} : { cert: c.certPem, key: c.keyPem }),
    onListen: (a) => ready.resolve(a.port),
  }, (req) => {
    seen.push(new URL(req.url).hostname);
    return new Response(name, { headers: { "x-backend": name } });
  });
  const port = await ready.promise;
  return {
    name,
    port,
    address: hostPort(hostname, port),
    seen,
    close: () => server.shutdown(),
  };
}

// ---------------------------------------------------------------------------------------------
// Raw spliced sessions: a real ClientHello, then plain bytes, with exact counts

/**
 * A plain-TCP backend for raw sessions: it reads the relayed ClientHello, answers one
 * {@linkcode GO} byte and hands the connection to the test (or to `handle`).
 */
export interface RawBackend {
  port: number;
  address: string;
  /** The next accepted connection (hello read, GO sent). */
  next(): Promise<Deno.TcpConn>;
  close(): void;
}

/** Starts a {@linkcode RawBackend}; with `handle`, every connection goes to it instead. */
export function rawBackend(
  scope: Scope,
  handle?: (conn: Deno.TcpConn) => Promise<void>,
): RawBackend {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const ready: Deno.TcpConn[] = [];
  const waiting: ((c: Deno.TcpConn) => void)[] = [];
  const conns = new Set<Deno.TcpConn>();
  const close = () => {
    try {
      listener.close();
    } catch { /* closed */ }
    for (const c of conns) {
      try {
        c.close();
      } catch { /* closed */ }
    }
  };
  scope.defer(close);
  (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      (async () => {
        await readClientHello(conn);
        await writeAll(conn, new Uint8Array([GO]));
        if (handle) {
          await handle(conn).finally(() => {
            conns.delete(conn);
            try {
              conn.close();
            } catch { /* closed */ }
          });
          return;
        }
        const w = waiting.shift();
        if (w) w(conn);
        else ready.push(conn);
      })().catch(() => {
        try {
          conn.close();
        } catch { /* closed */ }
      });
    }
  })().catch(() => {});
  return {
    port,
    address: `127.0.0.1:${port}`,
    next: () => {
      const c = ready.shift();
      if (c) return Promise.resolve(c);
      return new Promise((resolve) => waiting.push(resolve));
    },
    close,
  };
}

/** A listening socket whose accept queue is full: connects to it stay in progress (a backend that drops SYNs). */
export async function blackHole(scope: Scope): Promise<string> {
  const loop = new EventLoop();
  // never resumed: nothing accepts, the one connection the queue holds fills it
  const sock = new TcpListenSocket(
    loop,
    "127.0.0.1",
    0,
    { reusePort: false, backlog: 0 },
    () => {},
  );
  const filler = await Deno.connect({ hostname: "127.0.0.1", port: sock.addr.port });
  scope.defer(() => {
    filler.close();
    sock.close();
    loop.close();
  });
  return `127.0.0.1:${sock.addr.port}`;
}
