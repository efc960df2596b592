/**
 * The socket engine (src/io/) on real loopback sockets: listening and accepting, addresses,
 * partial writes and EAGAIN, half-close, resets, connect failures, the event loop's dispatch
 * (each on a fresh EventLoop); the userspace Relay over engine sockets (on the process's loop,
 * which it hands work to); EMFILE on accept in a child process under prlimit; and what a
 * relayed connection costs in syscalls (strace -c on a child process that only relays).
 */
import assert from "node:assert/strict";
import { E, EPOLLIN, EPOLLOUT, sys } from "../ffi/socket.ts";
import { libc, setSocketBuffer, tcpState } from "../ffi/libc.ts";
import { EventLoop, type IoHandler } from "../src/io/loop.ts";
import {
  connected,
  connectTcp,
  SocketError,
  TcpListenSocket,
  type TcpSocket,
  writeAll,
} from "../src/io/tcp.ts";
import {
  describeMismatch,
  positionStream,
  readExact,
  readOutcome,
  readToEnd,
  sha256,
  writeAll as writeConn,
  writeRandomSizes,
} from "./harness/bytes.ts";
import { Relay, type RelayEnd } from "../src/conn/relay.ts";
import { e2eTest, type Scope, sleep, within } from "./harness/scope.ts";
import { straceDuring } from "./harness/syscalls.ts";
import {
  closeConn,
  cpuSeconds,
  denoPair,
  engineListen,
  enginePair,
  type EngineRig,
  engineTest,
  engineToDeno,
  openFds,
  queues,
  recvExact,
  recvWait,
  spawnFixture,
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
  "connectTcp to ::1 connects over IPv6: the connected socket names both ends as the accepting one does",
  async (rig) => {
    const listener = engineListen(rig, "::1");
    const accepted = listener.accept();
    const sock = connectTcp(rig.loop, "::1", listener.port);
    rig.defer(() => sock.close());
    await connected(sock);
    const peer = await accepted;
    assert.deepEqual(sock.remoteAddr, { transport: "tcp", hostname: "::1", port: listener.port });
    assert.deepEqual(sock.localAddr, peer.remoteAddr);
    assert.deepEqual(peer.localAddr, sock.remoteAddr);
    await writeAll(sock, text.encode("over v6"));
    assert.equal(untext.decode(await recvExact(peer, 7)), "over v6");
  },
);

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
    console.log(`${sent} bytes before EAGAIN (${shortWrites} short writes), then ${extra} more`);
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
    // bytes delivered before the reset may be read first; then the reset, never an EOF a peer
    // could take for the stream's end
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

engineTest(
  "a paused listener is not reported (clients wait in the backlog); resumed, it is reported every round while connections wait, so taking one per report takes them all",
  async (rig) => {
    let reports = 0;
    const accepted: TcpSocket[] = [];
    let allIn = Promise.withResolvers<void>();
    const listener: TcpListenSocket = new TcpListenSocket(
      rig.loop,
      "127.0.0.1",
      0,
      { reusePort: false, backlog: 16 },
      () => {
        reports++;
        const got = listener.accept(); // one per report: level-triggered reports the rest
        if (typeof got === "number") return;
        rig.defer(() => got.close());
        accepted.push(got);
        if (accepted.length === 3) allIn.resolve();
      },
    );
    rig.defer(() => listener.close());
    const conns = await Promise.all(
      [1, 2, 3].map(() => Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port })),
    );
    for (const c of conns) rig.defer(() => closeConn(c));
    // another socket's event proves the loop ran rounds while the listener was paused
    const { conn, sock } = await denoPair(rig);
    await conn.write(text.encode("x"));
    assert.equal(await recvWait(sock, new Uint8Array(4)), 1);
    assert.equal(reports, 0, "a paused listener was reported");
    listener.resume();
    await allIn.promise;
    assert.equal(accepted.length, 3);
    assert.deepEqual(
      accepted.map((s) => s.remoteAddr.port).sort(),
      conns.map((c) => c.localAddr.port).sort(),
    );
    listener.pause();
    allIn = Promise.withResolvers<void>();
    const later = await Deno.connect({ hostname: "127.0.0.1", port: listener.addr.port });
    rig.defer(() => closeConn(later));
    await conn.write(text.encode("y"));
    assert.equal(await recvWait(sock, new Uint8Array(4)), 1);
    assert.equal(accepted.length, 3, "paused again: the fourth waits");
    listener.resume();
    await until("the fourth accepted", () => accepted.length === 4);
  },
);

engineTest(
  "writeAll rejects when the peer resets mid-write (ECONNRESET or EPIPE), and with ECONNABORTED when the socket is closed while it waits",
  async (rig) => {
    const { a, b } = await enginePair(rig);
    const big = positionStream(32 * 1024 * 1024, 1);
    // the peer never reads: writeAll waits for room
    const writing = writeAll(a, big).then(() => null, (e) => e);
    await untilEvent(b, () => b.readable);
    b.reset();
    const error = await writing;
    assert.ok(error instanceof SocketError, String(error));
    assert.ok(["ECONNRESET", "EPIPE"].includes(error.code), error.code);

    const pair = await enginePair(rig);
    const waiting = writeAll(pair.a, big).then(() => null, (e) => e);
    await untilEvent(pair.b, () => pair.b.readable);
    await until("writeAll waits for room", () => !pair.a.writable);
    pair.a.close();
    const aborted = await waiting;
    assert.ok(aborted instanceof SocketError, String(aborted));
    assert.equal(aborted.code, "ECONNABORTED");
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

// ---- the userspace relay over two engine sockets ----

type Peer = "deno" | "engine";

/** Options of {@link relayed}. */
interface RelayedOptions {
  /** The backend peer's receive buffer (an engine peer only; 0: the kernel's default). */
  backendReceiveBuffer?: number;
  idleMs?: number;
  /** Start the relay at once (run()); else `end` is null and the test calls run(). */
  start?: boolean;
}

/**
 * A client and a backend relayed by a Relay on the process's loop (the Relay hands work to
 * it); each peer Deno's or the engine's.
 */
async function relayed<C extends Peer, B extends Peer>(
  rig: EngineRig,
  clientPeer: C,
  backendPeer: B,
  o: RelayedOptions = {},
): Promise<{
  client: C extends "deno" ? Deno.TcpConn : TcpSocket;
  backend: B extends "deno" ? Deno.TcpConn : TcpSocket;
  relay: Relay;
  cs: TcpSocket;
  bs: TcpSocket;
  end: Promise<RelayEnd>;
}> {
  const front = engineListen(rig);
  const acceptedClient = front.accept();
  let client: Deno.TcpConn | TcpSocket;
  if (clientPeer === "deno") {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: front.port });
    rig.defer(() => closeConn(conn));
    client = conn;
  } else {
    const sock = connectTcp(rig.loop, "127.0.0.1", front.port);
    rig.defer(() => sock.close());
    await connected(sock);
    client = sock;
  }
  const cs = await acceptedClient;
  let backend: Deno.TcpConn | TcpSocket;
  let bs: TcpSocket;
  if (backendPeer === "deno") {
    ({ sock: bs, conn: backend } = await engineToDeno(rig));
  } else {
    ({ a: bs, b: backend } = await enginePair(rig, o.backendReceiveBuffer ?? 0));
  }
  const relay = new Relay(cs, bs, o.idleMs ?? 60_000);
  const end = o.start === false ? null : relayEnd(relay);
  // deno-lint-ignore no-explicit-any -- the conditional types of the peers
  return { client: client as any, backend: backend as any, relay, cs, bs, end: end! };
}

/** Runs `relay`; resolves with how it ended. */
function relayEnd(relay: Relay): Promise<RelayEnd> {
  return new Promise((resolve) => relay.run(resolve));
}

/** Reads a Deno conn to its end: the bytes, and how it ended (`eof`, or the error's name). */
async function readToOutcome(conn: Deno.Conn): Promise<{ bytes: number; end: string }> {
  const buf = new Uint8Array(256 * 1024);
  let bytes = 0;
  for (;;) {
    try {
      const n = await conn.read(buf);
      if (n === null) return { bytes, end: "eof" };
      bytes += n;
    } catch (e) {
      return { bytes, end: (e as Error).name };
    }
  }
}

engineTest(
  "four relays on one loop (one shared read buffer): random write sizes both ways arrive intact, each FIN after its bytes, run() ends done with exact counts",
  async (rig) => {
    const SIZE = 3 * 1024 * 1024;
    const one = async (k: number) => {
      const { client, backend, relay, end } = await relayed(rig, "deno", "deno");
      const up = positionStream(SIZE + k, 100 * k + 1);
      const down = positionStream(SIZE - k, 100 * k + 2);
      const [, , gotUp, gotDown] = await Promise.all([
        writeRandomSizes(client, up, { maxWrite: 200_000, closeWrite: true }),
        writeRandomSizes(backend, down, { maxWrite: 200_000, closeWrite: true }),
        readToEnd(backend),
        readToEnd(client),
      ]);
      assert.equal(describeMismatch(up, gotUp, 100 * k + 1), "identical", `relay ${k} up`);
      assert.equal(describeMismatch(down, gotDown, 100 * k + 2), "identical", `relay ${k} down`);
      assert.equal(sha256(gotUp), sha256(up));
      assert.equal(sha256(gotDown), sha256(down));
      assert.equal(await end, "done");
      assert.equal(relay.bytesUp, up.length);
      assert.equal(relay.bytesDown, down.length);
    };
    await Promise.all([0, 1, 2, 3].map(one));
  },
  { processLoop: true },
);

engineTest(
  "a client that stops reading holds the backend back: the relay stops reading it, keeps at most one 64 KiB chunk, and delivers everything once the client reads",
  async (rig) => {
    const { client, backend, relay, cs, bs, end } = await relayed(rig, "deno", "engine");
    const seed = 9;
    const stream = positionStream(64 * 1024 * 1024, seed);
    let written = 0;
    // the backend writes until the kernel refuses, and again whenever room comes, until none comes
    // for 300 ms: every buffer on the way is full, and the relay holds
    for (;;) {
      const w = backend.send(stream.subarray(written, written + 256 * 1024));
      if (w > 0) {
        written += w;
        assert.ok(written < stream.length / 2, "the backend was never held back");
        continue;
      }
      assert.equal(w, -E.EAGAIN);
      assert.equal(backend.writable, false);
      const room = await Promise.race([backend.nextEvent(), sleep(300).then(() => -1)]);
      if (room === -1) break;
    }
    // what left the backend's send queue and is not in the relay's receive queue is what the
    // relay read; what it read but did not write is what it holds
    const read = written - queues(backend.fd).unsent - queues(bs.fd).inq;
    const held = read - relay.bytesDown;
    console.log(
      `backend held back after ${written} bytes; relay read ${read}, wrote ${relay.bytesDown}, ` +
        `holds ${held}; client socket queue ${queues(cs.fd).outq}`,
    );
    assert.ok(held >= 0 && held <= 64 * 1024, `the relay holds ${held} bytes`);
    assert.equal(cs.writable, false, "the relay's write to the client was refused");
    // the client reads again: everything arrives, in order, then the backend's FIN
    const reading = readToEnd(client);
    const more = 1024 * 1024;
    await writeAll(backend, stream.subarray(written, written + more));
    assert.equal(backend.shutdownWrite(), 0);
    const got = await reading;
    assert.equal(describeMismatch(stream.subarray(0, written + more), got, seed), "identical");
    await client.closeWrite();
    assert.equal(await recvWait(backend, new Uint8Array(16)), 0, "the client's FIN");
    assert.equal(await end, "done");
  },
  { processLoop: true },
);

engineTest(
  "a client's reset mid-stream reaches the backend as a reset, not EOF; run() ends client_reset",
  async (rig) => {
    const { client, backend, relay, end } = await relayed(rig, "engine", "deno");
    await writeAll(client, positionStream(100_000, 1));
    await readExact(backend, 100_000);
    await writeConn(backend, positionStream(50_000, 2)); // on its way to a client that does not read
    client.reset();
    assert.equal(await end, "client_reset");
    assert.ok(relay.error instanceof SocketError);
    assert.equal(relay.error.code, "ECONNRESET");
    const outcome = await readToOutcome(backend);
    assert.deepEqual(outcome, { bytes: 0, end: "ConnectionReset" });
  },
  { processLoop: true },
);

engineTest(
  "a backend's reset mid-stream reaches the client as a reset, not EOF; run() ends backend_reset",
  async (rig) => {
    const { client, backend, relay, end } = await relayed(rig, "deno", "engine");
    await writeAll(backend, positionStream(100_000, 3));
    await readExact(client, 100_000);
    await client.write(positionStream(50_000, 4)); // on its way to a backend that does not read
    backend.reset();
    assert.equal(await end, "backend_reset");
    assert.ok(relay.error instanceof SocketError);
    assert.equal(relay.error.code, "ECONNRESET");
    const outcome = await readToOutcome(client);
    assert.deepEqual(outcome, { bytes: 0, end: "ConnectionReset" });
  },
  { processLoop: true },
);

engineTest(
  "a FIN that arrives while the relay still holds bytes is passed on after every one of them",
  async (rig) => {
    // a small window at the backend and a small send buffer of the relay's backend socket, a large
    // receive buffer of its client socket: the relay holds bytes, the client's path takes all
    const { client, backend, relay, cs, bs, end } = await relayed(rig, "deno", "engine", {
      backendReceiveBuffer: 16384,
    });
    assert.equal(setSocketBuffer(bs.fd, "send", 16 * 1024), 0);
    assert.equal(setSocketBuffer(cs.fd, "receive", 4 * 1024 * 1024), 0);
    const seed = 5;
    const SIZE = 1024 * 1024;
    const stream = positionStream(SIZE, seed);
    // the backend does not read yet: the bytes pile up on the way, the FIN behind them
    await writeConn(client, stream);
    await client.closeWrite();
    await until("the FIN reached the relay's socket", () => cs.peerClosed);
    assert.ok(relay.bytesUp < SIZE, `${relay.bytesUp} of ${SIZE} passed on: nothing was held`);
    const got = new Uint8Array(SIZE + 1);
    let have = 0;
    for (;;) {
      const n = await recvWait(backend, got.subarray(have));
      assert.ok(n >= 0, `recv ${n}`);
      if (n === 0) break;
      have += n;
    }
    assert.equal(describeMismatch(stream, got.subarray(0, have), seed), "identical");
    assert.equal(backend.shutdownWrite(), 0);
    assert.equal(await client.read(new Uint8Array(8)), null);
    assert.equal(await end, "done");
  },
  { processLoop: true },
);

engineTest(
  "a relay idle past its timeout cuts the stream with a reset on both sides (never a FIN a peer could take for the end); run() ends idle_timeout",
  async (rig) => {
    const { client, backend, relay, end } = await relayed(rig, "deno", "deno", { idleMs: 300 });
    await writeConn(client, positionStream(1000, 1));
    await readExact(backend, 1000);
    const t0 = performance.now();
    assert.equal(await end, "idle_timeout");
    const idle = performance.now() - t0;
    assert.ok(idle >= 250 && idle < 2000, `cut after ${idle.toFixed(0)} ms idle`);
    assert.equal(relay.bytesUp, 1000);
    assert.deepEqual(await readToOutcome(client), { bytes: 0, end: "ConnectionReset" });
    assert.deepEqual(await readToOutcome(backend), { bytes: 0, end: "ConnectionReset" });
  },
  { processLoop: true },
);

engineTest(
  "more than a round's share already waiting when the relay starts (an eager upload) all moves on at once, without waiting for an event or the loop's idle timeout",
  async (rig) => {
    const { client, backend, relay, cs, bs } = await relayed(rig, "deno", "deno", { start: false });
    // room everywhere: the relay reads 1 MiB in its first round, and no event follows it
    assert.equal(setSocketBuffer(cs.fd, "receive", 8 * 1024 * 1024), 0);
    assert.equal(setSocketBuffer(bs.fd, "send", 8 * 1024 * 1024), 0);
    const SIZE = 3 * 1024 * 1024;
    const stream = positionStream(SIZE, 11);
    await writeConn(client, stream);
    await client.closeWrite();
    await until("every byte and the FIN at the relay's socket", () => {
      return cs.peerClosed && queues(cs.fd).inq === SIZE;
    });
    const reading = readToEnd(backend);
    const t0 = performance.now();
    const end = relayEnd(relay);
    const got = await reading;
    const ms = performance.now() - t0;
    assert.equal(describeMismatch(stream, got, 11), "identical");
    assert.ok(ms < 300, `${SIZE} bytes waiting took ${ms.toFixed(0)} ms to pass`);
    await backend.closeWrite();
    assert.equal(await end, "done");
  },
  { processLoop: true },
);

// ---- out of descriptors ----

/** What the fixture's listener counted. */
interface EmfileStats {
  accepted: number;
  closed: Record<string, number>;
  localErrors: Record<string, number>;
}

/**
 * Clients wait in the backlog of a listener whose process has no descriptor left; returns the
 * share of a core the process used meanwhile (over `ms`), and what the listener counted.
 */
async function cpuWhileOutOfDescriptors(
  scope: Scope,
  naive: boolean,
  ms: number,
): Promise<{ busy: number; failures: number; serve: () => Promise<EmfileStats> }> {
  const child = spawnFixture(
    scope,
    "emfile_listener.ts",
    naive ? ["--naive"] : [],
    ["prlimit", "--nofile=64:64"],
  );
  const [, port] = (await child.line()).split(" ").map(Number);
  const stats = async () => JSON.parse((await child.ask("stats")).slice(6)) as EmfileStats;
  const clients = await Promise.all(
    Array.from({ length: 5 }, () => Deno.connect({ hostname: "127.0.0.1", port })),
  );
  for (const c of clients) scope.defer(() => closeConn(c));
  let settled = 0;
  const outcomes = clients.map((c) => readOutcome(c).finally(() => settled++));
  if (!naive) {
    // the listener was told about them and found no descriptor
    for (let s = await stats(); !s.localErrors["accept:EMFILE"]; s = await stats()) {
      await sleep(20); // polled: the child has no event to await
    }
  }
  const failuresBefore = (await stats()).localErrors["accept:EMFILE"] ?? 0;
  const cpu0 = cpuSeconds(child.pid);
  const t0 = performance.now();
  await sleep(ms); // the span CPU time is measured over
  const busy = (cpuSeconds(child.pid) - cpu0) / ((performance.now() - t0) / 1000);
  const s = await stats();
  assert.equal(settled, 0, "a client was served with no descriptor to serve it with");
  assert.equal(s.accepted, 0);
  return {
    busy,
    failures: (s.localErrors["accept:EMFILE"] ?? 0) - failuresBefore,
    serve: async () => {
      assert.equal(await child.ask("free 16"), "freed");
      const ends = await within(
        3000,
        "clients served once descriptors are free",
        Promise.all(outcomes),
      );
      assert.deepEqual(ends.map((e) => e.kind), ["eof", "eof", "eof", "eof", "eof"]);
      return await stats();
    },
  };
}

e2eTest(
  "out of descriptors (EMFILE on accept), the Listener does not spin: under 10% of a core, a retry every 100 ms, and it serves the waiting clients once descriptors free up",
  async (scope) => {
    const { busy, failures, serve } = await cpuWhileOutOfDescriptors(scope, false, 1500);
    console.log(
      `Listener out of descriptors: ${
        (busy * 100).toFixed(1)
      }% of a core, ${failures} accept retries in 1.5 s`,
    );
    assert.ok(busy < 0.1, `${(busy * 100).toFixed(1)}% of a core: it spins`);
    assert.ok(failures >= 5 && failures <= 30, `${failures} failed accepts in 1.5 s`);
    const stats = await serve();
    assert.equal(stats.accepted, 5);
    assert.equal(stats.closed.acl_denied, 5);
  },
  { timeoutMs: 30_000 },
);

e2eTest(
  "the meters of that test see a spin: an accept handler that ignores EMFILE on a level-triggered listener retries thousands of times a second, on most of a core",
  async (scope) => {
    const { busy, failures, serve } = await cpuWhileOutOfDescriptors(scope, true, 1000);
    console.log(
      `naive accept handler out of descriptors: ${(busy * 100).toFixed(1)}% of a core, ` +
        `${failures} accept retries in 1 s`,
    );
    assert.ok(failures > 1000, `${failures} failed accepts in 1 s`);
    // the share of a core it gets depends on what else runs on the machine
    assert.ok(busy > 0.1, `${(busy * 100).toFixed(1)}% of a core`);
    assert.equal((await serve()).accepted, 5);
  },
  { timeoutMs: 30_000 },
);

// ---- what a relayed connection costs ----

/** Syscall counts of `strace -c` output: by name, and the total. */
function straceCounts(summary: string): { total: number; by: Record<string, number> } {
  const by: Record<string, number> = {};
  let total = 0;
  for (const line of summary.split("\n")) {
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$/.exec(line);
    if (!m) continue;
    if (m[2] === "total") total = Number(m[1]);
    else by[m[2]] = Number(m[1]);
  }
  return { total, by };
}

/** An echo backend: each connection's bytes come back once it half-closes. */
function echoBackend(scope: Scope): number {
  const server = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  scope.defer(() => server.close());
  (async () => {
    for await (const conn of server) {
      (async () => {
        try {
          await writeConn(conn, await readToEnd(conn));
        } finally {
          closeConn(conn);
        }
      })().catch(() => {});
    }
  })().catch(() => {});
  return server.addr.port;
}

/** Counts what the relaying process does (strace -c, all threads) while `work` runs. */
async function straceWhile(
  scope: Scope,
  pid: number,
  work: () => Promise<void>,
): Promise<{ total: number; by: Record<string, number> }> {
  return straceCounts(await straceDuring(scope, pid, ["-c"], work));
}

for (const parallel of [1, 16]) {
  e2eTest(
    `2,000 short connections relayed ${
      parallel === 1 ? "one after another" : `${parallel} at a time`
    }: under 40 syscalls per connection in the relaying process (strace -c, all threads)`,
    async (scope) => {
      const CONNS = 2000;
      const child = spawnFixture(scope, "relay_host.ts", ["--backend", String(echoBackend(scope))]);
      const port = Number((await child.line()).split(" ")[1]);
      const payload = positionStream(100, 3);
      const session = async () => {
        const c = await Deno.connect({ hostname: "127.0.0.1", port });
        try {
          await writeConn(c, payload);
          await c.closeWrite();
          assert.equal(describeMismatch(payload, await readToEnd(c), 3), "identical");
        } finally {
          c.close();
        }
      };
      const sessions = async (n: number) => {
        let next = 0;
        await Promise.all(Array.from({ length: parallel }, async () => {
          while (next++ < n) await session();
        }));
      };
      await sessions(200); // warm (JIT)
      const stats = async () => JSON.parse((await child.ask("stats")).slice(6));
      const before = await stats();
      const t0 = performance.now();
      const { total, by } = await straceWhile(scope, child.pid, () => sessions(CONNS));
      const seconds = (performance.now() - t0) / 1000;
      const after = await stats();
      assert.equal(after.ended.done - before.ended.done, CONNS);
      const per = (n: number) => (n / CONNS).toFixed(1);
      const top = Object.entries(by).sort((a, b) => b[1] - a[1]).slice(0, 14)
        .map(([name, n]) => `${name} ${per(n)}`).join(", ");
      console.log(
        `${CONNS} connections (${parallel} at a time) in ${seconds.toFixed(1)} s under strace: ` +
          `${per(total)} syscalls per connection (${top}); loop per connection: ` +
          `${per(after.polls - before.polls)} polls, ${per(after.waits - before.waits)} ` +
          `off-thread waits, ${per(after.events - before.events)} events`,
      );
      assert.ok(total / CONNS < 40, `${per(total)} syscalls per connection`);
    },
    { timeoutMs: 120_000 },
  );
}

engineTest(
  "a closed loop releases its epoll and eventfd: one that never ran, and one that stopped with nothing left to watch",
  async () => {
    const before = openFds();
    const never = new EventLoop();
    assert.equal(openFds(), before + 2);
    never.close();
    assert.equal(openFds(), before, "a loop that never ran");
    const ran = new EventLoop();
    const fd = sys().eventfd(0, 0o4000 | 0o2000000);
    const called = Promise.withResolvers<void>();
    assert.equal(ran.add(fd, EPOLLIN, { onIo: () => called.resolve() }), 0);
    bump(fd);
    await called.promise;
    ran.forget(fd, true);
    sys().close(fd);
    // with nothing watched its run ends after the wait under way (at most a second)
    ran.close();
    await until("the loop's descriptors closed", () => openFds() === before, 3000);
  },
);

engineTest(
  "work handed to the next round while the loop is idle in its wait (a relay started from a session) runs at once, not after the idle wait",
  async (rig) => {
    const loop = rig.loop;
    const fd = eventFd(rig);
    assert.equal(loop.add(fd, EPOLLIN, { onIo() {} }), 0); // watched: the loop runs, idle
    await until("the loop waits off-thread", () => loop.stats.waits > 0);
    for (let i = 0; i < 3; i++) {
      const t0 = performance.now();
      const ran = Promise.withResolvers<number>();
      loop.later(() => ran.resolve(performance.now() - t0));
      const delay = await ran.promise;
      assert.ok(delay < 200, `ran after ${delay.toFixed(0)} ms`);
    }
    loop.forget(fd, true);
  },
);
