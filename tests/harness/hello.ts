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

/**
 * The cipher specs OpenSSL 0.9.8's SSLv23 client offered in its v2-format hello: TLS suites as
 * 0x00XXYY, and SSL 2.0 kinds (0x010080 RC4_128_WITH_MD5, 0x0700c0 DES_192_EDE3_CBC_WITH_MD5...).
 */
export const OPENSSL_098_V2_SPECS: readonly (readonly number[])[] = [
  [0, 0, 0x39],
  [0, 0, 0x38],
  [0, 0, 0x35],
  [0, 0, 0x16],
  [0, 0, 0x13],
  [0, 0, 0x0a],
  [7, 0, 0xc0],
  [0, 0, 0x33],
  [0, 0, 0x32],
  [0, 0, 0x2f],
  [3, 0, 0x80],
  [0, 0, 0x05],
  [0, 0, 0x04],
  [1, 0, 0x80],
  [0, 0, 0x15],
  [0, 0, 0x12],
  [0, 0, 0x09],
  [6, 0, 0x40],
  [0, 0, 0x14],
  [0, 0, 0x11],
  [0, 0, 0x08],
  [0, 0, 0x06],
  [4, 0, 0x80],
  [0, 0, 0x03],
  [2, 0, 0x80],
  [0, 0, 0xff],
];

/**
 * An SSLv2-compatible CLIENT-HELLO (RFC 6101 Appendix E.1, RFC 5246 Appendix E.2): a 2-byte
 * length with the high bit set, msg_type 1, `version`, the lengths of the cipher specs, session
 * id and challenge, then those. Built byte by byte (no client here sends one any more); the
 * defaults are what OpenSSL 0.9.8 sent: TLS 1.0, its cipher specs, no session id, a 32-byte
 * challenge.
 */
export function sslv2ClientHello(
  o: {
    version?: number;
    specs?: readonly (readonly number[])[];
    sessionId?: number;
    challenge?: number;
  } = {},
): Uint8Array {
  const specs = (o.specs ?? OPENSSL_098_V2_SPECS).flat();
  const sid = new Array(o.sessionId ?? 0).fill(7);
  const challenge = Array.from({ length: o.challenge ?? 32 }, (_, i) => (i * 37 + 11) & 255);
  const version = o.version ?? 0x0301;
  const u16 = (n: number) => [n >> 8, n & 255];
  const msg = [
    1,
    ...u16(version),
    ...u16(specs.length),
    ...u16(sid.length),
    ...u16(challenge.length),
    ...specs,
    ...sid,
    ...challenge,
  ];
  return new Uint8Array([0x80 | (msg.length >> 8), msg.length & 255, ...msg]);
}

/**
 * `hello` (one record, as {@linkcode clientHelloBytes} gives it) grown by `cipherSuites` more
 * (GREASE) cipher suites and a padding extension of `padding` bytes, in records of 16 KiB: a
 * hello of up to ~130 KB that is still valid (for a large `limits.max_client_hello_bytes`).
 */
export function grownClientHello(
  hello: Uint8Array,
  cipherSuites: number,
  padding: number,
): Uint8Array {
  const body = hello.subarray(9);
  const u16 = (at: number) => (body[at] << 8) | body[at + 1];
  const csAt = 34 + 1 + body[34];
  const csLen = u16(csAt);
  const compAt = csAt + 2 + csLen;
  const extAt = compAt + 1 + body[compAt];
  const extLen = u16(extAt);
  const newExt = extLen + 4 + padding;
  if (newExt > 0xffff || csLen + 2 * cipherSuites > 0xffff) throw new Error("a field past 64 KiB");
  const out: number[] = [];
  const put = (bytes: ArrayLike<number>) => {
    for (let i = 0; i < bytes.length; i++) out.push(bytes[i]);
  };
  put(body.subarray(0, csAt));
  put([(csLen + 2 * cipherSuites) >> 8, (csLen + 2 * cipherSuites) & 255]);
  put(body.subarray(csAt + 2, compAt));
  for (let i = 0; i < cipherSuites; i++) put([0x0a, 0x0a]);
  put(body.subarray(compAt, extAt));
  put([newExt >> 8, newExt & 255]);
  put(body.subarray(extAt + 2, extAt + 2 + extLen));
  put([0, 21, padding >> 8, padding & 255]);
  put(new Uint8Array(padding));
  const hs = [1, out.length >> 16, (out.length >> 8) & 255, out.length & 255];
  const handshake = new Uint8Array(4 + out.length);
  handshake.set(hs);
  handshake.set(out, 4);
  const records: number[] = [];
  for (let at = 0; at < handshake.length; at += 16384) {
    const part = handshake.subarray(at, at + 16384);
    records.push(22, 3, 1, part.length >> 8, part.length & 255);
    for (const b of part) records.push(b);
  }
  return new Uint8Array(records);
}
