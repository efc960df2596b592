/**
 * The socket engine (src/io/) on real loopback sockets: listening and accepting, addresses,
 * partial writes and EAGAIN, half-close, resets, connect failures, the event loop's dispatch;
 * each test on a fresh EventLoop.
 */
import assert from "node:assert/strict";
import { E, EPOLLIN, EPOLLOUT, sys } from "../ffi/socket.ts";
import { libc, tcpState } from "../ffi/libc.ts";
import type { IoHandler } from "../src/io/loop.ts";
import {
  connected,
  connectTcp,
  SocketError,
  TcpListenSocket,
  type TcpSocket,
  writeAll,
} from "../src/io/tcp.ts";
import { describeMismatch, positionStream, readExact, readOutcome } from "./harness/bytes.ts";
import {
  closeConn,
  denoPair,
  engineListen,
  enginePair,
  engineTest,
  openFds,
  queues,
  recvExact,
  recvWait,
  until,
  untilEvent,
} from "./harness/engine.ts";

const text = new TextEncoder();
const untext = new TextDecoder();
/** tcpi_state of a closed socket. */
const TCP_CLOSE = 7;

for (const hostname of ["127.0.0.1", "::1"]) {
  engineTest(
    `a listener on ${hostname} port 0 accepts a client: both ends agree on the addresses, bytes go both ways`,
    async (rig) => {
      const { conn, sock, listener } = await denoPair(rig, hostname);
      assert.notEqual(listener.port, 0, "the real port");
      assert.equal(listener.socket.addr.hostname, hostname);
      assert.deepEqual(
        { hostname: sock.remoteAddr.hostname, port: sock.remoteAddr.port },
        { hostname: conn.localAddr.hostname, port: conn.localAddr.port },
      );
      assert.deepEqual(
        { hostname: sock.localAddr.hostname, port: sock.localAddr.port },
        { hostname: conn.remoteAddr.hostname, port: conn.remoteAddr.port },
      );
      await conn.write(text.encode("ping from the client"));
      assert.equal(untext.decode(await recvExact(sock, 20)), "ping from the client");
      await writeAll(sock, text.encode("pong from the engine"));
      assert.equal(untext.decode(await readExact(conn, 20)), "pong from the engine");
    },
  );
}

engineTest(
  "a dual-stack listener names an IPv4 client as Deno does (::ffff:127.0.0.1), on both ends",
  async (rig) => {
    const listener = engineListen(rig, "::");
    const denoServer = Deno.listen({ hostname: "::", port: 0 });
    rig.defer(() => denoServer.close());
    const accepted = listener.accept();
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: listener.port });
    rig.defer(() => closeConn(conn));
    const sock = await accepted;
    const denoAccepted = denoServer.accept();
    const conn2 = await Deno.connect({ hostname: "127.0.0.1", port: denoServer.addr.port });
    rig.defer(() => closeConn(conn2));
    const theirs = await denoAccepted;
    rig.defer(() => closeConn(theirs));
    assert.equal(sock.remoteAddr.hostname, theirs.remoteAddr.hostname);
    assert.equal(sock.remoteAddr.port, conn.localAddr.port);
    assert.equal(sock.localAddr.hostname, theirs.localAddr.hostname);
    assert.equal(sock.localAddr.port, listener.port);
  },
);

engineTest(
  "send into a peer that does not read: short writes, then -EAGAIN clears writable; the peer's reads bring EPOLLOUT and writeAll finishes, every byte in order",
  async (rig) => {
    const { conn, sock } = await denoPair(rig);
    const CHUNK = 64 * 1024;
    // far more than any socket buffer takes: the stream's bytes say where they belong
    const stream = positionStream(64 * 1024 * 1024, 7);
    let sent = 0;
    let shortWrites = 0;
    for (;;) {
      const w = sock.send(stream.subarray(sent, sent + CHUNK), CHUNK);
      if (w === -E.EAGAIN) break;
      assert.ok(w > 0, `send returned ${w}`);
      if (w < CHUNK) {
        shortWrites++;
        assert.equal(sock.writable, false, "a short write clears writable");
      }
      sent += w;
      assert.ok(sent < stream.length - CHUNK, "the kernel took everything: no back-pressure");
    }
    assert.equal(sock.writable, false, "EAGAIN clears writable");
    assert.ok(sent > 0);
    assert.ok(shortWrites <= 1, `${shortWrites} short writes before EAGAIN`);
    const extra = 1024 * 1024;
    const total = sent + extra;
    // the peer reads everything: the space freed comes back as EPOLLOUT (edge-triggered)
    const event = sock.nextEvent();
    const read = readExact(conn, total);
    const events = await event;
    assert.ok(events & EPOLLOUT, `events 0x${events.toString(16)}`);
    assert.equal(sock.writable, true);
    await writeAll(sock, stream.subarray(sent, total));
    const got = await read;
    assert.equal(got.length, total);
    assert.equal(describeMismatch(stream.subarray(0, total), got, 7), "identical");
    console.log(`${sent} bytes before EAGAIN (${shortWrites} short write), then ${extra} more`);
  },
);

engineTest(
  "shutdownWrite sends a FIN: the peer reads every byte, then EOF, and can still send to us",
  async (rig) => {
    const { conn, sock } = await denoPair(rig);
    await writeAll(sock, text.encode("last words"));
    assert.equal(sock.shutdownWrite(), 0);
    assert.equal(untext.decode(await readExact(conn, 10)), "last words");
    assert.equal(await conn.read(new Uint8Array(16)), null, "EOF after the bytes");
    await conn.write(text.encode("a reply after your FIN"));
    assert.equal(untext.decode(await recvExact(sock, 22)), "a reply after your FIN");
    assert.equal(sock.send(text.encode("x")), -E.EPIPE, "our write side is shut");
  },
);

engineTest(
  "the peer's closeWrite: recv gives its bytes, then 0 with peerClosed set; we can still send",
  async (rig) => {
    const { conn, sock } = await denoPair(rig);
    await conn.write(text.encode("bytes before the FIN"));
    await conn.closeWrite();
    await untilEvent(sock, () => sock.peerClosed);
    const buf = new Uint8Array(64);
    assert.equal(await recvWait(sock, buf), 20);
    assert.equal(untext.decode(buf.subarray(0, 20)), "bytes before the FIN");
    assert.equal(sock.readable, true, "a short read after the FIN leaves the EOF to read");
    assert.equal(sock.recv(buf), 0);
    assert.equal(sock.peerClosed, true);
    await writeAll(sock, text.encode("still talking"));
    assert.equal(untext.decode(await readExact(conn, 13)), "still talking");
  },
);

engineTest(
  "reset() reaches a Deno peer as ConnectionReset, not EOF, even with our bytes unread",
  async (rig) => {
    const { conn, sock } = await denoPair(rig);
    await conn.write(text.encode("unread by the engine"));
    await writeAll(sock, text.encode("queued for the peer"));
    await untilEvent(sock, () => sock.readable);
    sock.reset();
    assert.equal(sock.closed, true);
    const outcome = await readOutcome(conn);
    // the reset drops what was queued: the peer must not take a cut stream for a whole one
    if (outcome.kind === "data") {
      assert.equal(untext.decode(outcome.bytes), "queued for the peer");
      const next = await readOutcome(conn);
      assert.equal(next.kind, "error", JSON.stringify(next));
      assert.match(next.error!, /^ConnectionReset/);
    } else {
      assert.equal(outcome.kind, "error", JSON.stringify(outcome));
      assert.match(outcome.error!, /^ConnectionReset/);
    }
    assert.equal(sock.recv(new Uint8Array(8)), -E.EBADF, "a closed socket refuses calls");
  },
);

engineTest(
  "a peer's reset reaches recv as -ECONNRESET (engine peer with SO_LINGER 0)",
  async (rig) => {
    const { a, b } = await enginePair(rig);
    assert.equal(a.send(text.encode("a few bytes")), 11);
    assert.equal(untext.decode(await recvExact(b, 11)), "a few bytes");
    a.reset();
    await untilEvent(b, () => b.readable && b.peerClosed);
    assert.equal(b.recv(new Uint8Array(64)), -E.ECONNRESET);
  },
);

engineTest(
  "a Deno peer closed with our bytes unread sends its FIN, then a reset: recv gives 0, the socket is closed, send fails with EPIPE",
  async (rig) => {
    const { conn, sock } = await denoPair(rig);
    await writeAll(sock, text.encode("never read"));
    // every byte acknowledged: it sits in the peer's receive queue
    await until("the peer has our bytes", () => queues(sock.fd).outq === 0);
    conn.close();
    await untilEvent(sock, () => sock.peerClosed);
    // Deno shuts its write side down before it closes, so its FIN comes first: a reset after it
    // (Linux resets a close with unread data) finds us in CLOSE_WAIT and leaves the EOF to read
    await until("the reset closed the socket", () => tcpState(sock.fd) === TCP_CLOSE);
    assert.equal(sock.recv(new Uint8Array(64)), 0);
    assert.equal(sock.send(text.encode("anyone?")), -E.EPIPE);
  },
);

engineTest(
  "a refused connect rejects with ECONNREFUSED, and the socket's descriptor is gone once closed",
  async (rig) => {
    const probe = engineListen(rig);
    const port = probe.port;
    probe.socket.close(); // nothing listens there now
    const fdsBefore = openFds();
    const watchedBefore = rig.loop.watched;
    let sock: TcpSocket | null = null;
    let error: unknown = null;
    try {
      sock = connectTcp(rig.loop, "127.0.0.1", port);
      await connected(sock);
    } catch (e) {
      error = e;
    } finally {
      sock?.close();
    }
    assert.ok(error instanceof SocketError, String(error));
    assert.equal(error.code, "ECONNREFUSED");
    assert.equal(error.name, "ConnectionRefused");
    console.log(sock ? "refused after EINPROGRESS (connected() threw)" : "refused at once");
    assert.equal(openFds(), fdsBefore);
    assert.equal(rig.loop.watched, watchedBefore);
  },
);

engineTest(
  "connectTcp to a name that is no IP literal throws EINVAL and leaves no descriptor",
  (rig) => {
    const fdsBefore = openFds();
    assert.throws(() => connectTcp(rig.loop, "backend.test", 443), (e) => {
      assert.ok(e instanceof SocketError);
      return e.code === "EINVAL";
    });
    assert.equal(openFds(), fdsBefore);
    return Promise.resolve();
  },
);

engineTest(
  "a connect whose SYNs are dropped (the listener's accept queue is full) hangs until the caller closes it: ECONNABORTED, no descriptor left",
  async (rig) => {
    // backlog 0 takes one connection, never accepted; the next SYNs are dropped
    const full = new TcpListenSocket(
      rig.loop,
      "127.0.0.1",
      0,
      { reusePort: false, backlog: 0 },
      () => {},
    );
    rig.defer(() => full.close());
    const first = await Deno.connect({ hostname: "127.0.0.1", port: full.addr.port });
    rig.defer(() => closeConn(first));
    const fdsBefore = openFds();
    const sock = connectTcp(rig.loop, "127.0.0.1", full.addr.port);
    const outcome = connected(sock).then(() => "connected", (e) => e as SocketError);
    const timer = new Promise((r) => setTimeout(() => r("still connecting"), 700));
    assert.equal(await Promise.race([outcome, timer]), "still connecting");
    assert.equal(tcpState(sock.fd), 2, "SYN_SENT");
    sock.close(); // the caller's deadline or stop
    const error = await outcome;
    assert.ok(error instanceof SocketError, String(error));
    assert.equal(error.code, "ECONNABORTED");
    assert.equal(openFds(), fdsBefore);
  },
);

/** A non-blocking eventfd (closed at the end of the test). */
function eventFd(rig: { defer(c: () => void): void }): number {
  const fd = sys().eventfd(0, 0o4000 | 0o2000000);
  assert.ok(fd >= 0);
  rig.defer(() => sys().close(fd));
  return fd;
}

const one = new Uint8Array(new BigUint64Array([1n]).buffer);
/** Makes an eventfd readable. */
function bump(fd: number): void {
  assert.equal(Number(sys().write(fd, one, 8n)), 8);
}
/** Reads an eventfd's count (not readable afterwards). */
function drain(fd: number): void {
  sys().read(fd, new Uint8Array(8), 8n);
}

engineTest(
  "a handler that throws does not stop the loop: the next handler of the same round runs, later rounds too",
  async (rig) => {
    const loop = rig.loop;
    const round = () => loop.stats.polls + loop.stats.waits;
    const a = eventFd(rig);
    const b = eventFd(rig);
    let thrownIn = -1;
    let stage = 0;
    const bRounds: number[] = [];
    let bCalled = Promise.withResolvers<void>();
    const onB: IoHandler = {
      onIo() {
        drain(b);
        bRounds.push(round());
        bCalled.resolve();
      },
    };
    const onA: IoHandler = {
      onIo() {
        if (stage++ === 0) {
          // a stays ready (level-triggered, not drained) ahead of b: the next round has a, then b
          bump(b);
          return;
        }
        drain(a);
        thrownIn = round();
        throw new Error("handler a fails");
      },
    };
    assert.equal(loop.add(b, EPOLLIN, onB), 0);
    assert.equal(loop.add(a, EPOLLIN, onA), 0);
    bump(a);
    await bCalled.promise;
    assert.equal(rig.errors.length, 1);
    assert.equal((rig.errors.splice(0)[0] as Error).message, "handler a fails");
    assert.deepEqual(bRounds, [thrownIn], "b ran in the round a threw in");
    bCalled = Promise.withResolvers<void>();
    bump(b);
    await bCalled.promise;
    assert.equal(bRounds.length, 2);
    assert.ok(bRounds[1] > thrownIn);
    loop.forget(a, true);
    loop.forget(b, true);
  },
);

engineTest(
  "an event fetched for an fd closed in the same round is dropped, not delivered to the new file that reuses the number (generation check)",
  async (rig) => {
    const loop = rig.loop;
    const round = () => loop.stats.polls + loop.stats.waits;
    const x = eventFd(rig);
    const y = eventFd(rig);
    let stage = 0;
    let firstRound = -1;
    let eventsThen = 0;
    let reusedIn = -1;
    let fetchedInReuseRound = 0;
    const oldY: number[] = [];
    const newY: number[] = [];
    const newYCalled = Promise.withResolvers<void>();
    const onX: IoHandler = {
      onIo() {
        if (stage === 0) {
          stage = 1;
          firstRound = round();
          eventsThen = loop.stats.events;
          // x stays ready (not drained), y becomes ready after it: the next round fetches x, y
          bump(y);
          return;
        }
        if (stage !== 1) return;
        stage = 2;
        drain(x);
        reusedIn = round();
        fetchedInReuseRound = loop.stats.events - eventsThen;
        // y's event of this round is fetched already; y closes, and a new file takes its number
        loop.forget(y);
        const fresh = sys().eventfd(0, 0o4000 | 0o2000000);
        assert.equal(libc().dup3(fresh, y, 0o2000000), y);
        sys().close(fresh);
        const added = loop.add(y, EPOLLIN, {
          onIo() {
            newY.push(round());
            drain(y);
            newYCalled.resolve();
          },
        });
        assert.equal(added, 0);
      },
    };
    assert.equal(loop.add(y, EPOLLIN, { onIo: () => void oldY.push(round()) }), 0);
    assert.equal(loop.add(x, EPOLLIN, onX), 0);
    bump(x);
    await until("x handled twice", () => stage === 2);
    assert.equal(reusedIn, firstRound + 1, "the very next round");
    assert.equal(fetchedInReuseRound, 2, "that round fetched x and the stale event of y");
    // the new file has no event of its own yet; give it one
    bump(y);
    await newYCalled.promise;
    assert.deepEqual(oldY, [], "the closed file's handler is gone");
    assert.equal(newY.length, 1, "the new file got its own event only");
    assert.ok(newY[0] > reusedIn);
    loop.forget(x, true);
    loop.forget(y, true);
  },
);
