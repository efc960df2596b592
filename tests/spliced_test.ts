/**
 * src/spliced.ts without a kernel: a pair whose sockets do not have the cookies the sockhash
 * gave is refused, and its conns keep working (the session then relays it the usual way).
 */
import assert from "node:assert/strict";
import { detachSockets } from "../src/spliced.ts";

Deno.test("detachSockets refuses sockets that are not the paired ones and leaves them working", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  const backend = await Deno.connect({ hostname: "127.0.0.1", port });
  const client = await listener.accept();
  try {
    const why = detachSockets(client, backend, { a: 1n, b: 2n }, -1);
    assert.equal(typeof why, "string");
    assert.match(why as string, /not the paired socket|no socket fd/);
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
