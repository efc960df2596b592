/**
 * src/conn/detach.ts: a pair whose sockets fail the caller's check is refused, and its conns keep
 * working (the session then relays it the usual way); a pair that passes leaves Deno's loop and
 * its fds are the conns' sockets.
 */
import assert from "node:assert/strict";
import { detachSockets } from "../src/conn/detach.ts";
import { recvFd, sendFd, socketPorts } from "../ffi/libc.ts";

Deno.test("detachSockets refuses sockets that are not the paired ones and leaves them working", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const backend = await Deno.connect({ hostname: "127.0.0.1", port });
  const client = await listener.accept();
  try {
    const why = detachSockets(client, backend, { client: () => false, backend: () => false }, -1);
    assert.equal(typeof why, "string");
    assert.match(why as string, /not the client's socket|no socket fd/);
    // still in Deno's hands: bytes flow both ways
    await backend.write(new Uint8Array([1, 2, 3]));
    const buf = new Uint8Array(3);
    assert.equal(await client.read(buf), 3);
    await client.write(buf);
    assert.equal(await backend.read(buf), 3);
    assert.deepEqual([...buf], [1, 2, 3]);
  } finally {
    client.close();
    backend.close();
    listener.close();
  }
});

Deno.test("detachSockets finds both fds by their ports and takes them out of Deno's loop", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const backend = await Deno.connect({ hostname: "127.0.0.1", port });
  const client = await listener.accept();
  const ports = (conn: Deno.Conn) => {
    const l = (conn.localAddr as Deno.NetAddr).port;
    const r = (conn.remoteAddr as Deno.NetAddr).port;
    return (fd: number) => {
      const p = socketPorts(fd);
      return p !== null && p.local === l && p.remote === r;
    };
  };
  try {
    const pair = detachSockets(
      client as Deno.TcpConn,
      backend,
      { client: ports(client), backend: ports(backend) },
      -1,
    );
    assert.notEqual(typeof pair, "string", String(pair));
    const { clientFd, backendFd } = pair as { clientFd: number; backendFd: number };
    assert.notEqual(clientFd, backendFd);
    // the fds are the conns' sockets: a byte sent on one arrives on the other
    assert.equal(sendFd(backendFd, new Uint8Array([7])), 1);
    const buf = new Uint8Array(1);
    for (let i = 0; i < 100 && recvFd(clientFd, buf) !== 1; i++) {
      await new Promise((r) => setTimeout(r, 5));
    }
    assert.equal(buf[0], 7);
  } finally {
    client.close();
    backend.close();
    listener.close();
  }
});
