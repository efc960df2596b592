/**
 * UDP sockets of the socket engine (src/io/udp.ts) and datagram batches (src/io/dgram_batch.ts)
 * against real sockets: a batch receives several datagrams with their sources and the address
 * they were sent to, sends them on unchanged, and cuts a datagram longer than its slot.
 */
import assert from "node:assert/strict";
import { EventLoop } from "../src/io/loop.ts";
import { bindUdp, connectUdp } from "../src/io/udp.ts";
import { DatagramBatch } from "../src/io/dgram_batch.ts";
import { decodeSockaddr, sockaddrKey } from "../src/io/sockaddr.ts";
import { E } from "../ffi/socket.ts";

const sizes = [1, 1200, 1350, 9000, 40];

function peer(): Deno.DatagramConn {
  return Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
}

async function waitReadable(b: DatagramBatch, fd: number, want: number): Promise<number> {
  for (let i = 0; i < 200; i++) {
    const n = b.receive(fd, want);
    if (n !== -E.EAGAIN) return n;
    await new Promise((r) => setTimeout(r, 5));
  }
  return -E.EAGAIN;
}

Deno.test("a batch takes several datagrams with their sources and destination, and sends them unchanged", async () => {
  const loop = new EventLoop();
  const sock = bindUdp(loop, "0.0.0.0", 0, { rcvbuf: 1 << 20 }, () => {});
  sock.wantDestination();
  const from = peer();
  const sent = sizes.map((n, i) => crypto.getRandomValues(new Uint8Array(n)).fill(i, 0, 1));
  for (const d of sent) {
    await from.send(d, { transport: "udp", hostname: "127.0.0.1", port: sock.addr.port });
  }
  const b = new DatagramBatch(8);
  let got = 0;
  const seen: Uint8Array[] = [];
  while (got < sent.length) {
    const n = await waitReadable(b, sock.fd, 8);
    assert.ok(n > 0, `receive: ${n}`);
    for (let i = 0; i < n; i++) {
      seen.push(b.datagram(i).slice());
      const src = decodeSockaddr(b.source(i), "udp")!;
      assert.equal(src.port, (from.addr as Deno.NetAddr).port);
      assert.equal(b.destination(i), "127.0.0.1", "IP_PKTINFO of a wildcard socket");
      assert.equal(typeof sockaddrKey(b.source(i)), "number");
    }
    got += n;
    // send this receive's datagrams on to another peer, as they are
    const to = peer();
    const dest = new Uint8Array(16);
    dest.set([2, 0, (to.addr as Deno.NetAddr).port >> 8, (to.addr as Deno.NetAddr).port & 0xff]);
    dest.set([127, 0, 0, 1], 4);
    assert.equal(b.send(sock.fd, 0, n, dest), n);
    for (let i = 0; i < n; i++) {
      const [d] = await to.receive();
      assert.deepEqual(d, seen[seen.length - n + i]);
    }
    to.close();
  }
  assert.deepEqual(seen, sent);
  from.close();
  sock.close();
  loop.close();
});

Deno.test("a datagram longer than a batch slot is cut at the slot", async () => {
  const loop = new EventLoop();
  const sock = bindUdp(loop, "127.0.0.1", 0, {}, () => {});
  const from = peer();
  await from.send(new Uint8Array(3000).fill(7), {
    transport: "udp",
    hostname: "127.0.0.1",
    port: sock.addr.port,
  });
  const b = new DatagramBatch(2, 1024);
  assert.equal(await waitReadable(b, sock.fd, 2), 1);
  assert.equal(b.length(0), 1024);
  assert.equal(b.datagram(0).length, 1024);
  assert.equal(b.destination(0), null, "not asked for");
  from.close();
  sock.close();
  loop.close();
});

Deno.test("a connected UDP socket reports ECONNREFUSED once its peer's port is closed", async () => {
  const loop = new EventLoop();
  const gone = peer();
  const port = (gone.addr as Deno.NetAddr).port;
  gone.close();
  const sock = connectUdp(loop, "127.0.0.1", port, {}, () => {});
  assert.equal(sock.send(new Uint8Array(10)), 10);
  const b = new DatagramBatch(1, 2048);
  let rc = -E.EAGAIN;
  for (let i = 0; i < 100 && rc === -E.EAGAIN; i++) {
    rc = b.receive(sock.fd);
    if (rc === -E.EAGAIN) await new Promise((r) => setTimeout(r, 5));
  }
  assert.equal(rc, -E.ECONNREFUSED);
  sock.close();
  loop.close();
});
