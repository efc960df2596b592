/**
 * Real ClientHellos: captured from Deno's TLS client, read back on a backend, and sent by raw
 * sessions that then speak plain bytes with exact counts (which TLS end points hide).
 *
 * @module
 */
import assert from "node:assert/strict";
import { readExact, writeAll } from "./bytes.ts";

/** The byte a raw backend sends once it has the hello: the session is paired by then. */
export const GO = 0x47;

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
 * Client side of a raw session: sends a real ClientHello for `serverName` and waits for the
 * backend's GO byte, so the proxy has paired the sockets before any payload is sent (as a TLS
 * client waits for the ServerHello). Returns the conn and the hello's length.
 */
export async function rawSpliced(
  port: number,
  serverName: string,
): Promise<{ conn: Deno.TcpConn; helloBytes: number }> {
  const hello = await clientHelloBytes(serverName);
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await writeAll(conn, hello);
    const b = new Uint8Array(1);
    const n = await conn.read(b);
    if (n !== 1 || b[0] !== GO) throw new Error(`expected the GO byte, got ${n ? b[0] : "EOF"}`);
  } catch (e) {
    conn.close();
    throw e;
  }
  return { conn, helloBytes: hello.length };
}
