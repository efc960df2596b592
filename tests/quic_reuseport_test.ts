/**
 * QUIC worker steering (bpf/quic_reuseport.bpf.c, src/ebpf/quic_reuseport.ts) against the real
 * kernel: this process plays two workers, each with its UDP socket of one SO_REUSEPORT group
 * joined to the program, and sends QUIC-shaped datagrams from many source ports (so the
 * kernel's hash alone would spread them over both sockets). What is checked is which socket
 * each datagram reached. Needs root, libbpf.so.1 and clang (to build the object); elsewhere
 * every test is skipped with the reason printed. Run under the kernel lock:
 * `flock /tmp/sni-kernel-tests.lock ./run test tests/quic_reuseport_test.ts`.
 */

import assert from "node:assert/strict";
import { EventLoop } from "../src/io/loop.ts";
import { bindUdp, type UdpSocket } from "../src/io/udp.ts";
import { DatagramBatch } from "../src/io/dgram_batch.ts";
import { cidKey } from "../src/conn/quic_flow.ts";
import {
  QuicSteerError,
  QuicSteering,
  QuicSteeringWorker,
  type SteeredIds,
} from "../src/ebpf/quic_reuseport.ts";
import { E } from "../ffi/socket.ts";
import { ensureBpfObject } from "./harness/mod.ts";

async function skipReason(): Promise<string | null> {
  if (Deno.build.os !== "linux") return "not Linux";
  if (Deno.uid() !== 0) return "not root (the QUIC steering tests need root: sudo ./run test)";
  try {
    Deno.dlopen("libbpf.so.1", {}).close();
  } catch (e) {
    return `libbpf.so.1: ${(e as Error).message} (apt-get install -y libbpf1)`;
  }
  return await ensureBpfObject("quic_reuseport");
}

const SKIP = await skipReason();
if (SKIP) console.warn(`\n!!! SKIPPING tests/quic_reuseport_test.ts (QUIC steering): ${SKIP}\n`);

const PIN_DIR = `/sys/fs/bpf/sni-proxy-steer-test-${Deno.pid}`;
const SOURCES = 40;
const logs: string[] = [];
const log = (level: string, message: string) => logs.push(`${level}: ${message}`);

/** A short-header datagram (1-RTT) to the connection ID `dcid`, 60 bytes. */
function short(dcid: Uint8Array): Uint8Array {
  const d = crypto.getRandomValues(new Uint8Array(60));
  d[0] = 0x40 | (d[0] & 0x3f);
  d.set(dcid, 1);
  return d;
}

/** A long-header Handshake datagram of QUIC v1 to `dcid`, 80 bytes. */
function handshake(dcid: Uint8Array): Uint8Array {
  const d = crypto.getRandomValues(new Uint8Array(80));
  d.set([0xe0, 0, 0, 0, 1, dcid.length], 0);
  d.set(dcid, 6);
  return d;
}

/** Two "workers" with their socket of one group on 127.0.0.1, joined to the steering. */
class Group {
  readonly loop = new EventLoop();
  readonly socks: UdpSocket[] = [];
  readonly members: QuicSteeringWorker[] = [];
  readonly ids: SteeredIds[] = [];
  readonly senders: Deno.DatagramConn[] = [];
  readonly batch = new DatagramBatch(64);

  constructor(readonly steer: QuicSteering) {
    for (let w = 1; w <= 2; w++) {
      const port = this.socks[0]?.addr.port ?? 0;
      const sock = bindUdp(this.loop, "127.0.0.1", port, { reusePort: true }, () => {});
      this.socks.push(sock);
      const member = QuicSteeringWorker.open(steer.pinDir, w, 2);
      this.members.push(member);
      this.ids.push(member.join(0, sock.fd));
    }
    for (let i = 0; i < SOURCES; i++) {
      this.senders.push(Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 }));
    }
  }

  /** Sends `d` from every source port; how many datagrams each socket got. */
  async spread(d: Uint8Array): Promise<number[]> {
    const to: Deno.NetAddr = { transport: "udp", hostname: "127.0.0.1", port: this.port };
    for (const s of this.senders) await s.send(d, to);
    const got = this.socks.map(() => 0);
    for (let round = 0; round < 200 && got.reduce((a, b) => a + b) < SOURCES; round++) {
      this.socks.forEach((s, i) => {
        if (s.closed) return;
        for (;;) {
          const n = this.batch.receive(s.fd);
          if (n === -E.EAGAIN || n <= 0) break;
          got[i] += n;
        }
      });
      await new Promise((r) => setTimeout(r, 5));
    }
    assert.equal(got.reduce((a, b) => a + b), SOURCES, `every datagram arrived: ${got}`);
    return got;
  }

  get port(): number {
    return this.socks[0].addr.port;
  }

  close(): void {
    for (const s of this.senders) s.close();
    for (const s of this.socks) s.close();
    for (const m of this.members) m.close();
    this.loop.close();
  }
}

function test(name: string, fn: (g: Group) => Promise<void>, maxCids = 64): void {
  Deno.test({
    name,
    ignore: !!SKIP,
    sanitizeOps: false,
    sanitizeResources: false,
    async fn() {
      const steer = await QuicSteering.open({
        workers: 2,
        listeners: 1,
        maxCids,
        pinDir: PIN_DIR,
        log,
      });
      const g = new Group(steer);
      try {
        await fn(g);
      } finally {
        g.close();
        await steer.close();
      }
      assert.equal(await Deno.stat(PIN_DIR).then(() => true, () => false), false, "pins gone");
    },
  });
}

const cid = (n: number) => crypto.getRandomValues(new Uint8Array(n));
const key = (b: Uint8Array) => cidKey(b);

test("a datagram whose DCID a worker published goes to that worker's socket, from any port", async (g) => {
  const a = cid(8), b = cid(18);
  g.ids[0].add(key(a));
  g.ids[1].add(key(b));
  assert.deepEqual(await g.spread(short(a)), [SOURCES, 0]);
  assert.deepEqual(await g.spread(short(b)), [0, SOURCES]);
  assert.deepEqual(await g.spread(handshake(b)), [0, SOURCES]);
  assert.deepEqual(await g.spread(handshake(a)), [SOURCES, 0]);
  // unknown IDs, and what is no QUIC header at all, are hashed: both sockets get some
  const unknown = await g.spread(short(cid(8)));
  assert.ok(unknown[0] > 0 && unknown[1] > 0, `hashed: ${unknown}`);
  const junk = await g.spread(new Uint8Array([0x40]));
  assert.ok(junk[0] > 0 && junk[1] > 0, `hashed: ${junk}`);
  const vn = handshake(a);
  vn.fill(0, 1, 5); // a Version Negotiation is never steered
  const vnGot = await g.spread(vn);
  assert.ok(vnGot[0] > 0 && vnGot[1] > 0, `hashed: ${vnGot}`);
  const s = g.steer.stats();
  assert.equal(s.steered, 4 * SOURCES, JSON.stringify(s));
  assert.equal(s.unknownCid, SOURCES, JSON.stringify(s));
  assert.equal(s.unparsable, 2 * SOURCES, JSON.stringify(s));
});

test("a removed ID is hashed again; a worker's IDs are forgotten when it dies", async (g) => {
  const a = cid(8), b = cid(8), c = cid(20);
  g.ids[0].add(key(a));
  g.ids[1].add(key(b));
  g.ids[1].add(key(c));
  assert.deepEqual(await g.spread(short(a)), [SOURCES, 0]);
  // worker 2 cannot remove worker 1's entry (the same ID on two flows: the newer keeps it)
  g.ids[1].remove(key(a));
  assert.deepEqual(await g.spread(short(a)), [SOURCES, 0]);
  g.ids[0].remove(key(a));
  const hashed = await g.spread(short(a));
  assert.ok(hashed[0] > 0 && hashed[1] > 0, `hashed: ${hashed}`);
  // worker 2's socket closes (it died): its IDs are hashed over what is left, never dropped
  g.socks[1].close();
  assert.deepEqual(await g.spread(short(b)), [SOURCES, 0]);
  assert.equal(g.steer.stats().noSocket, SOURCES);
  assert.equal(g.steer.forgetWorker(2), 2, "b and c removed");
  assert.equal(g.steer.forgetWorker(1), 0);
  assert.deepEqual(await g.spread(handshake(c)), [SOURCES, 0]);
  assert.equal(g.steer.stats().unknownCid, 2 * SOURCES, "a after its removal, then c");
});

test("a full ID map refuses the insert, counted; that flow is hashed", async (g) => {
  const ids = Array.from({ length: 20 }, () => cid(8));
  for (const id of ids) g.ids[1].add(key(id));
  assert.equal(g.members[1].mapFull, 4, "16 held, 4 refused");
  assert.equal(g.members[1].failed, 0, g.members[1].lastError ?? "");
  assert.deepEqual(await g.spread(short(ids[0])), [0, SOURCES]);
  const refused = await g.spread(short(ids[19]));
  assert.ok(refused[0] > 0 && refused[1] > 0, `hashed: ${refused}`);
}, 16);

Deno.test({
  name: "bad options are refused by name; a worker without the pins is told so",
  ignore: !!SKIP,
  async fn() {
    await assert.rejects(
      QuicSteering.open({ workers: 1, listeners: 1, maxCids: 64, pinDir: PIN_DIR, log }),
      (e: unknown) => e instanceof QuicSteerError && e.reason === "bad_option",
    );
    await assert.rejects(
      QuicSteering.open({ workers: 2, listeners: 1, maxCids: 8, pinDir: PIN_DIR, log }),
      (e: unknown) => e instanceof QuicSteerError && e.reason === "bad_option",
    );
    assert.throws(
      () => QuicSteeringWorker.open(`${PIN_DIR}-absent`, 1, 2),
      (e: unknown) => e instanceof QuicSteerError && e.reason === "no_pins",
    );
  },
});
