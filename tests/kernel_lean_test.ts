/**
 * What kernel mode costs a connection that never carries bulk, against the real proxy and
 * kernel: in pipe mode (splice(2)) a short connection makes no pipe and no splice call, as in
 * userspace mode; in sockmap mode a closed pair leaves nothing in the sockhash or the pairing
 * map, its sockets are not deleted from the sockhash one by one (closing them takes them out:
 * the kernel's sock_map_close), and its two pairing entries are written in one call and deleted
 * in one.
 *
 * @module
 */
import assert from "node:assert/strict";
import { SockDiag } from "../src/conn/tcpinfo.ts";
import { instancePinDir, SOCKMAP_MAPS } from "../src/ebpf/layout.ts";
import { socketTuple } from "../src/ebpf/sockmap.ts";
import {
  drainHash,
  e2eTest,
  kernelEbpf,
  kernelSkipReason,
  pairEntries,
  randomPool,
  rawBackend,
  rawSpliced,
  readExact,
  type Scope,
  sendRandom,
  startKernelProxy,
  straceDuring,
  untilStopped,
  writeAll,
} from "./harness/mod.ts";

const SKIP = await kernelSkipReason();
if (SKIP) console.warn(`\n!!! SKIPPING tests/kernel_lean_test.ts (kernel mode): ${SKIP}\n`);

const MiB = 1 << 20;
const POOL = SKIP ? new Uint8Array(0) : randomPool(4 * MiB);
const SHORT = 20;

/** Pipes the process `pid` holds open now (both ends counted). */
async function pipeFds(pid: number): Promise<number> {
  let n = 0;
  for await (const e of Deno.readDir(`/proc/${pid}/fd`)) {
    try {
      if ((await Deno.readLink(`/proc/${pid}/fd/${e.name}`)).startsWith("pipe:")) n++;
    } catch { /* closed meanwhile */ }
  }
  return n;
}

/** The fd of the proxy `pid` holding a BPF map of `mapType` (18: sockhash), or -1. */
async function mapFd(pid: number, mapType: number): Promise<number> {
  for await (const e of Deno.readDir(`/proc/${pid}/fdinfo`)) {
    try {
      const info = await Deno.readTextFile(`/proc/${pid}/fdinfo/${e.name}`);
      if (new RegExp(`^map_type:\\s+${mapType}$`, "m").test(info)) return Number(e.name);
    } catch { /* closed meanwhile */ }
  }
  return -1;
}

/** Entries in the sockhash the proxy `pid` pinned (bpftool map dump). */
async function sockhashEntries(pid: number): Promise<number> {
  const out = await new Deno.Command("bpftool", {
    args: ["-j", "map", "dump", "pinned", `${instancePinDir(pid)}/${SOCKMAP_MAPS.sockhash}`],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  if (!out.success) throw new Error(`bpftool: ${new TextDecoder().decode(out.stderr)}`);
  return (JSON.parse(text) as unknown[]).length;
}

/**
 * Runs `work` with strace (`-e trace=LIST`) on every thread of `pid`; returns the traced lines.
 */
async function traced(
  scope: Scope,
  pid: number,
  list: string,
  work: () => Promise<void>,
): Promise<string[]> {
  const text = await straceDuring(scope, pid, ["-e", `trace=${list}`, "-e", "signal=none"], work);
  return text.split("\n").filter((l) => /^\d+\s+\w+\(/.test(l));
}

/** A kernel-mode proxy in `mode` routing `a.test` to a raw backend the test drives. */
async function leanProxy(scope: Scope, mode: "pipe" | "sockmap") {
  const backend = rawBackend(scope);
  const proxy = await startKernelProxy(scope, {
    listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
    routes: [{ match: "a.test", backends: [backend.address] }],
    ebpf: kernelEbpf({ splice_mode: mode }),
  });
  return { proxy, backend };
}

/**
 * `count` short sessions one after another: a few hundred bytes each way (a request and its
 * answer), then both sides close.
 */
async function shortSessions(
  port: number,
  backend: { next(): Promise<Deno.TcpConn> },
  count: number,
): Promise<void> {
  for (let i = 0; i < count; i++) {
    const { conn: client } = await rawSpliced(port, "a.test");
    const server = await backend.next();
    await writeAll(client, POOL.subarray(0, 300));
    assert.deepEqual(await readExact(server, 300), POOL.subarray(0, 300));
    await writeAll(server, POOL.subarray(300, 1000));
    assert.deepEqual(await readExact(client, 700), POOL.subarray(300, 1000));
    await client.closeWrite();
    await server.closeWrite();
    assert.equal(await server.read(new Uint8Array(1)), null);
    assert.equal(await client.read(new Uint8Array(1)), null);
    client.close();
    server.close();
  }
}

/** Until the peer of `conn` has taken every byte `conn` sent (its send queue is empty). */
async function delivered(diag: SockDiag, conn: Deno.TcpConn): Promise<void> {
  if (!(await deliveredWithin(diag, conn, 2000))) {
    throw new Error("the proxy's socket did not take the bytes in 2 s");
  }
}

/** Whether the peer of `conn` took every byte `conn` sent within `ms`. */
async function deliveredWithin(diag: SockDiag, conn: Deno.TcpConn, ms: number): Promise<boolean> {
  const tuple = socketTuple({
    local: conn.localAddr as Deno.NetAddr,
    remote: conn.remoteAddr as Deno.NetAddr,
  });
  for (let i = 0; i < ms / 5; i++) {
    const info = diag.query(tuple);
    if (!info || info.writeQueue === 0) return true;
    await new Promise((r) => setTimeout(r, 5));
  }
  return false;
}

/**
 * `count` sessions whose bytes each way come with their FIN: the proxy is stopped while a side
 * writes and half-closes, so it sees both in one event (a short read with EPOLLRDHUP).
 */
async function finWithLastBytes(
  pid: number,
  port: number,
  backend: { next(): Promise<Deno.TcpConn> },
  count: number,
): Promise<void> {
  using diag = SockDiag.open();
  const burst = async (from: Deno.TcpConn, to: Deno.TcpConn, bytes: Uint8Array) => {
    Deno.kill(pid, "SIGSTOP");
    await untilStopped(pid);
    await writeAll(from, bytes);
    await from.closeWrite();
    // on a busy host loopback delivery can lag the write: the proxy resumes once its socket
    // has every byte (the writer's send queue is empty), or it could read them in two parts
    await delivered(diag, from);
    Deno.kill(pid, "SIGCONT");
    assert.deepEqual(await readExact(to, bytes.length), bytes);
    assert.equal(await to.read(new Uint8Array(1)), null);
  };
  for (let i = 0; i < count; i++) {
    const { conn: client } = await rawSpliced(port, "a.test");
    const server = await backend.next();
    await burst(client, server, POOL.subarray(0, 300));
    await burst(server, client, POOL.subarray(300, 1000));
    client.close();
    server.close();
  }
}

e2eTest(
  "pipe mode: bytes that come with their FIN are relayed with the FIN and no read of 0 bytes " +
    "(the short read after EPOLLRDHUP is the EOF, as in userspace mode)",
  async (scope) => {
    const { proxy, backend } = await leanProxy(scope, "pipe");
    await shortSessions(proxy.port(), backend, 2); // warm
    const reads = await traced(
      scope,
      proxy.pid,
      "recvfrom",
      () => finWithLastBytes(proxy.pid, proxy.port(), backend, 10),
    );
    const zero = reads.filter((l) => /\)\s+=\s+0$/.test(l));
    const data = reads.filter((l) => /\)\s+=\s+(300|700)$/.test(l));
    assert.equal(data.length, 20, `each burst in one read:\n${reads.join("\n")}`);
    assert.deepEqual(zero, [], "no read of 0 bytes for an EOF epoll already reported");
  },
  { timeoutMs: 60_000, ignore: SKIP !== null },
);

e2eTest(
  `pipe mode: ${SHORT} short connections make no pipe and no splice(2) call; a 4 MiB ` +
    "download through the same proxy does (the pipes come when a direction carries bulk)",
  async (scope) => {
    const { proxy, backend } = await leanProxy(scope, "pipe");
    await shortSessions(proxy.port(), backend, 2); // warm
    const before = await pipeFds(proxy.pid);
    const calls = await traced(
      scope,
      proxy.pid,
      "pipe,pipe2,splice",
      () => shortSessions(proxy.port(), backend, SHORT),
    );
    assert.deepEqual(calls, [], "no pipe made and nothing spliced for short connections");
    assert.equal(await pipeFds(proxy.pid), before, "no pipe held after short connections");
    // the same count sees the pipes of a bulk download: it could have failed above
    const { conn: client } = await rawSpliced(proxy.port(), "a.test");
    const server = await backend.next();
    const bulk = await traced(scope, proxy.pid, "pipe2,splice", async () => {
      await Promise.all([
        sendRandom(server, POOL, 4 * MiB, { closeWrite: true }),
        (async () => {
          let got = 0;
          const buf = new Uint8Array(256 * 1024);
          for (let n; (n = await client.read(buf)) !== null;) got += n;
          assert.equal(got, 4 * MiB);
        })(),
      ]);
    });
    client.close();
    server.close();
    assert.ok(bulk.some((l) => /splice\(/.test(l)), "a bulk download is spliced");
    assert.ok(await pipeFds(proxy.pid) > before, "its pipe stays in the pool for reuse");
  },
  { timeoutMs: 60_000, ignore: SKIP !== null },
);

e2eTest(
  "pipe mode: a pair that turns bulk one way while the other way holds bytes its reader has no " +
    "room for moves to splice(2) with nothing lost: both ways arrive whole, in order, with EOFs",
  async (scope) => {
    const backend = rawBackend(scope);
    const proxy = await startKernelProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [backend.address] }],
      // a small send buffer toward the client: its bytes soon wait in the relay
      ebpf: kernelEbpf({ splice_mode: "pipe", sndbuf: 4096 }),
    });
    using diag = SockDiag.open();
    const { conn: client } = await rawSpliced(proxy.port(), "a.test");
    const server = await backend.next();
    // the backend's bytes come 32 KiB at a time, each read whole by the proxy (never a full
    // buffer: not bulk), while the client reads nothing: past its window they wait in the relay,
    // which stops reading the backend (its socket then takes no more)
    const step = 32 * 1024;
    let sent = 0;
    for (let taken = true; taken && sent < 16 * step; sent += step) {
      Deno.kill(proxy.pid, "SIGSTOP");
      await untilStopped(proxy.pid);
      await writeAll(server, POOL.subarray(sent, sent + step));
      taken = await deliveredWithin(diag, server, 300);
      Deno.kill(proxy.pid, "SIGCONT");
      await new Promise((r) => setTimeout(r, 30));
    }
    const down = POOL.subarray(0, sent);
    // now the client's bulk: a read fills the relay's buffer and the pair moves to splice(2)
    const up = sendRandom(client, POOL, 4 * MiB, { closeWrite: true });
    const gotUp = drainHash(server);
    await new Promise((r) => setTimeout(r, 100));
    const rest = sendRandom(server, POOL, 2 * MiB, { maxWrite: 16 * 1024, closeWrite: true });
    const head = await readExact(client, down.length);
    assert.ok(head.every((v, i) => v === down[i]), "the bytes that waited come first, whole");
    const [sentUp, upEnd, sentRest, restEnd] = await Promise.all([
      up,
      gotUp,
      rest,
      drainHash(client),
    ]);
    assert.equal(upEnd.bytes, 4 * MiB, "upload length");
    assert.equal(upEnd.sha256, sentUp, "upload bytes");
    assert.equal(restEnd.bytes, 2 * MiB, "download length");
    assert.equal(restEnd.sha256, sentRest, "download bytes");
    client.close();
    server.close();
  },
  { timeoutMs: 60_000, ignore: SKIP !== null },
);

e2eTest(
  `sockmap mode: ${SHORT} short connections leave no sockhash or pairing entry once closed, ` +
    "and no socket is deleted from the sockhash by hand (closing it takes it out)",
  async (scope) => {
    const { proxy, backend } = await leanProxy(scope, "sockmap");
    await shortSessions(proxy.port(), backend, 2); // warm
    // a live pair is in both maps: the counts below could fail
    const { conn: client } = await rawSpliced(proxy.port(), "a.test");
    const server = await backend.next();
    assert.equal(await sockhashEntries(proxy.pid), 2, "a live pair's sockets are in the sockhash");
    assert.equal(await pairEntries(proxy.pid), 2);
    client.close();
    server.close();
    const sockhash = await mapFd(proxy.pid, 18);
    assert.ok(sockhash >= 0, "the proxy holds its sockhash");
    const calls = await traced(
      scope,
      proxy.pid,
      "bpf",
      () => shortSessions(proxy.port(), backend, SHORT),
    );
    const deletes = calls.filter((l) => l.includes(`BPF_MAP_DELETE_ELEM, {map_fd=${sockhash},`));
    assert.deepEqual(deletes, [], "no sockhash delete: a socket's close removes its entry");
    const inserts = calls.filter((l) => l.includes(`BPF_MAP_UPDATE_ELEM, {map_fd=${sockhash},`));
    assert.equal(inserts.length, 2 * SHORT, "both sockets of every connection went in");
    for (let i = 0;; i++) {
      const [socks, pairs] = [await sockhashEntries(proxy.pid), await pairEntries(proxy.pid)];
      if (socks === 0 && pairs === 0) break;
      if (i === 50) assert.fail(`${socks} sockhash and ${pairs} pairing entries left`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const perConnection = calls.length / SHORT;
    console.log(`    [measured] ${perConnection.toFixed(1)} bpf(2) calls per short connection`);
    assert.ok(perConnection <= 6, `${perConnection} bpf(2) calls per connection`);
  },
  { timeoutMs: 60_000, ignore: SKIP !== null },
);

e2eTest(
  "sockmap pairing knows a socket's acked count without asking: an accepted socket starts at " +
    "0, a connected one at 1 (its SYN), IPv4 and IPv6 (what pair() assumes for `opened`)",
  async () => {
    using diag = SockDiag.open();
    for (const host of ["127.0.0.1", "::1"]) {
      const listener = Deno.listen({ hostname: host, port: 0 });
      const client = await Deno.connect({ hostname: host, port: listener.addr.port });
      const accepted = await listener.accept();
      listener.close();
      try {
        const taken = (c: Deno.Conn) => {
          const local = c.localAddr as Deno.NetAddr;
          const remote = c.remoteAddr as Deno.NetAddr;
          const info = diag.query(socketTuple({ local, remote }));
          assert.ok(info, `sock_diag finds ${local.port}`);
          return info.bytesAcked + info.writeQueue;
        };
        assert.equal(taken(accepted), 0, `accepted on ${host}`);
        assert.equal(taken(client), 1, `connected to ${host}`);
      } finally {
        client.close();
        accepted.close();
      }
    }
  },
  { timeoutMs: 10_000, ignore: SKIP !== null },
);
