/**
 * The bulk load of the starvation test, in processes of its own (so that moving its bytes does
 * not delay the probes timed in the bench's event loop):
 *
 *   deno run -A --unstable-net bench/duplex.ts server
 *     the backend: prints its port (one JSON line), then per connection reads the ClientHello
 *     record the proxy relays, sends 16–64 MiB (random) and shuts down its sending side while
 *     reading to EOF, as fast as the path takes them.
 *   deno run -A --unstable-net bench/duplex.ts client PORT N NAME
 *     N transfers at a time through 127.0.0.1:PORT, each a real ClientHello for NAME (so the
 *     proxy routes it to the server above) then 16–64 MiB up while reading the server's bytes;
 *     a finished transfer is replaced by a new one. On SIGTERM: closes them all and prints
 *     {@link DuplexTotals} as one JSON line.
 *
 * Plain bytes after the hello, not TLS: a proxy that does not terminate TLS relays them alike,
 * and the load generators spend no CPU on encryption the proxy never sees.
 *
 * @module
 */
import { captureClientHello } from "../tests/harness/hello.ts";

/** The smallest and largest transfer, each way. */
const MIN_BYTES = 16 * 2 ** 20;
const MAX_BYTES = 64 * 2 ** 20;
const CHUNK = new Uint8Array(256 * 1024).fill(0x61);

/** What the client moved, printed when it stops. */
export interface DuplexTotals {
  bytesUp: number;
  bytesDown: number;
  /** transfers finished both ways */
  transfers: number;
  /** transfers that failed before the stop (connect refused, reset) */
  errors: number;
  firstError: string;
}

function randomSize(): number {
  return MIN_BYTES + Math.floor(Math.random() * (MAX_BYTES - MIN_BYTES + 1));
}

/** Writes `n` bytes; calls `moved` with each chunk's count. */
async function send(conn: Deno.Conn, n: number, moved: (k: number) => void): Promise<void> {
  while (n > 0) {
    const k = await conn.write(CHUNK.subarray(0, Math.min(n, CHUNK.length)));
    n -= k;
    moved(k);
  }
}

/** Reads to EOF; calls `moved` with each read's count. */
async function drain(conn: Deno.Conn, moved: (k: number) => void): Promise<void> {
  const buf = new Uint8Array(256 * 1024);
  for (let n; (n = await conn.read(buf)) !== null;) moved(n);
}

/** Reads exactly `n` bytes (the hello); throws at EOF. */
async function readExact(conn: Deno.Conn, n: number): Promise<Uint8Array> {
  const buf = new Uint8Array(n);
  for (let have = 0; have < n;) {
    const k = await conn.read(buf.subarray(have));
    if (k === null) throw new Error("EOF before the whole hello");
    have += k;
  }
  return buf;
}

/** One backend connection: the hello, then bytes out and in at once. */
async function serveOne(conn: Deno.Conn): Promise<void> {
  try {
    const head = await readExact(conn, 5);
    await readExact(conn, (head[3] << 8) | head[4]);
    const out = send(conn, randomSize(), () => {}).then(() => conn.closeWrite());
    await Promise.all([out, drain(conn, () => {})]);
  } catch { /* the client stopped mid-transfer: expected at the end of a test */ }
  try {
    conn.close();
  } catch { /* closed */ }
}

async function server(): Promise<void> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  console.log(JSON.stringify({ port: (listener.addr as Deno.NetAddr).port }));
  for await (const conn of listener) serveOne(conn);
}

async function client(port: number, slots: number, name: string): Promise<void> {
  const hello = await captureClientHello(name);
  const totals: DuplexTotals = {
    bytesUp: 0,
    bytesDown: 0,
    transfers: 0,
    errors: 0,
    firstError: "",
  };
  const open = new Set<Deno.Conn>();
  let stopping = false;
  Deno.addSignalListener("SIGTERM", () => {
    stopping = true;
    for (const c of open) {
      try {
        c.close();
      } catch { /* closed */ }
    }
    console.log(JSON.stringify(totals));
    Deno.exit(0);
  });
  const transfer = async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    open.add(conn);
    try {
      for (let off = 0; off < hello.length;) off += await conn.write(hello.subarray(off));
      const up = send(conn, randomSize(), (k) => totals.bytesUp += k).then(() => conn.closeWrite());
      await Promise.all([up, drain(conn, (k) => totals.bytesDown += k)]);
      totals.transfers++;
    } finally {
      open.delete(conn);
      conn.close();
    }
  };
  await Promise.all(Array.from({ length: slots }, async () => {
    while (!stopping) {
      await transfer().catch(async (e) => {
        if (stopping) return;
        totals.errors++;
        totals.firstError ||= String(e);
        await new Promise((r) => setTimeout(r, 100)); // a refusing proxy: do not spin
      });
    }
  }));
}

if (import.meta.main) {
  const [mode, port, slots, name] = Deno.args;
  if (mode === "server") await server();
  else if (mode === "client") await client(Number(port), Number(slots), name);
  else throw new Error("usage: duplex.ts server | client PORT N NAME");
}
