/**
 * The eBPF splice fast path against the real kernel: load, attach, pin, crash recovery, sockets
 * inserted by fd and taken out again, a full sockhash, in-kernel splicing of real TCP
 * connections (byte-exact, userspace reads nothing), half-close draining and verifier errors.
 * Needs root, libbpf.so.1 and clang (to build the object when missing); elsewhere every test is
 * skipped with the reason printed.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { BpfAttachType, BpfError, BpfObject, libbpf, queryProgIds } from "../ffi/libbpf.ts";
import { socketEnds } from "../ffi/libc.ts";
import { ensureBpfObject } from "./harness/mod.ts";
import { writeAll } from "../src/net/bytes.ts";
import { instancePinDir, PIN_ROOT } from "../src/ebpf/layout.ts";
import {
  KernelAccel,
  KernelAccelError,
  type KernelAccelOptions,
  type SplicePair,
  type SpliceSocket,
} from "../src/ebpf/sockmap.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const OBJECT = `${ROOT}bpf/sockmap.bpf.o`;
/** Where open() pins by default: a dir of this process's own. */
const PIN_DIR = instancePinDir();

async function skipReason(): Promise<string | null> {
  if (Deno.build.os !== "linux") return "not Linux";
  if (Deno.uid() !== 0) return "not root (the eBPF tests need root: sudo deno task test)";
  try {
    libbpf();
  } catch (e) {
    return `${(e as Error).message}`;
  }
  const build = await ensureBpfObject("sockmap");
  if (build) return build;
  return null;
}

const SKIP = await skipReason();
if (SKIP) console.warn(`\n!!! SKIPPING tests/kernel_test.ts (eBPF fast path): ${SKIP}\n`);

async function listDir(path: string): Promise<string[] | null> {
  try {
    const names: string[] = [];
    for await (const e of Deno.readDir(path)) names.push(e.name);
    return names.sort();
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw e;
  }
}

interface Opened {
  accel: KernelAccel;
  logs: string[];
}

async function open(extra: Partial<KernelAccelOptions> = {}): Promise<Opened> {
  const logs: string[] = [];
  const accel = await KernelAccel.open({
    maxPairs: 1024,
    maxSockets: 4096,
    log: (level, message) => {
      if (level !== "debug") logs.push(`${level}: ${message}`);
    },
    ...extra,
  });
  return { accel, logs };
}

/** The conn's socket as pair() takes it: its fd (found in /proc/self/fd) and addresses. */
function sock(c: Deno.Conn): SpliceSocket {
  const local = c.localAddr as Deno.NetAddr;
  const remote = c.remoteAddr as Deno.NetAddr;
  for (const e of Deno.readDirSync("/proc/self/fd")) {
    const ends = socketEnds(Number(e.name));
    if (ends?.local.port === local.port && ends.remote.port === remote.port) {
      return { fd: Number(e.name), local, remote };
    }
  }
  throw new Error(`no fd for ${local.port} -> ${remote.port}`);
}

function port(l: Deno.Listener): number {
  return (l.addr as Deno.NetAddr).port;
}

/** A deterministic pseudo-random 1 MiB block, varied per index so reordering changes the hash. */
function block(seed: number): Uint8Array<ArrayBuffer> {
  const b = new Uint8Array(1 << 20);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < b.length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x;
    b[i + 1] = x >>> 8;
    b[i + 2] = x >>> 16;
    b[i + 3] = x >>> 24;
  }
  return b;
}

/** Write `mib` MiB (distinct blocks cycling through 8) and return their sha256. */
async function sendBlocks(conn: Deno.Conn, mib: number): Promise<string> {
  const blocks = Array.from({ length: 8 }, (_, i) => block(i + 1));
  const hash = createHash("sha256");
  for (let i = 0; i < mib; i++) {
    const b = blocks[i % blocks.length];
    hash.update(b);
    await writeAll(conn, b);
  }
  return hash.digest("hex");
}

/** Read to EOF; returns byte count and sha256. */
async function readAll(conn: Deno.Conn): Promise<{ bytes: number; sha256: string }> {
  const hash = createHash("sha256");
  const buf = new Uint8Array(1 << 20);
  let bytes = 0;
  for (;;) {
    const n = await conn.read(buf);
    if (n === null) break;
    bytes += n;
    hash.update(buf.subarray(0, n));
  }
  return { bytes, sha256: hash.digest("hex") };
}

interface SessionResult {
  /** Bytes userspace read from a (client side) and wrote to b. */
  userspaceUp: number;
  /** Bytes userspace read from b and wrote to a. */
  userspaceDown: number;
  counters: { aToB: number; bToA: number };
  drainedUp: boolean;
  drainedDown: boolean;
}

/**
 * What the proxy session does with a spliced pair: keep a read loop on each socket (it sees
 * only bytes that arrived before pairing, or that the kernel could not redirect, then EOF),
 * forward what it reads, and on EOF wait until the peer took every byte before closing it.
 */
async function splicedSession(
  accel: KernelAccel,
  a: Deno.Conn,
  b: Deno.Conn,
  pair: SplicePair,
): Promise<SessionResult> {
  const written = { a: 0, b: 0 };
  const drained = { a: false, b: false };
  const pump = async (from: Deno.Conn, to: Deno.Conn, toSide: "a" | "b") => {
    const buf = new Uint8Array(64 * 1024);
    let read = 0;
    for (;;) {
      const n = await from.read(buf).catch(() => null);
      if (n === null) break;
      read += n;
      await writeAll(to, buf.subarray(0, n));
      written[toSide] += n;
    }
    const d = await accel.waitDrained(pair, toSide, written[toSide], { timeoutMs: 10_000 });
    drained[toSide] = d.drained;
    await to.closeWrite().catch(() => {});
    return read;
  };
  const [up, down] = await Promise.all([pump(a, b, "b"), pump(b, a, "a")]);
  const counters = accel.unpair(pair);
  a.close();
  b.close();
  return {
    userspaceUp: up,
    userspaceDown: down,
    counters,
    drainedUp: drained.b,
    drainedDown: drained.a,
  };
}

Deno.test({
  name: "kernel: open() attaches the verdict to the sockhash and pins the maps under a dir of " +
    "this instance's own, with no cgroup program and no cgroup move; close() detaches and " +
    "removes the dir",
  ignore: !!SKIP,
  async fn() {
    const cgroupBefore = await Deno.readTextFile("/proc/self/cgroup");
    const { accel, logs } = await open();
    let closed = false;
    try {
      assert.equal(accel.pinDir, `${PIN_ROOT}/${Deno.pid}`);
      assert.equal(await Deno.readTextFile("/proc/self/cgroup"), cgroupBefore, "no cgroup move");
      assert.equal(queryProgIds(accel.sockhashFd, BpfAttachType.SK_SKB_STREAM_VERDICT).length, 1);
      assert.deepEqual(await listDir(PIN_DIR), ["sni_pairs", "sni_sockhash", "sni_stats"]);
      assert.ok(logs.some((l) => l.includes("fast path attached")), logs.join("\n"));
      await accel.close();
      closed = true;
      assert.equal(await listDir(PIN_DIR), null);
    } finally {
      if (!closed) await accel.close();
    }
  },
});

Deno.test({
  name: "kernel: open() removes the pins of an instance that died (pid gone), logged, and " +
    "leaves a live instance's pins alone",
  ignore: !!SKIP,
  async fn() {
    // A child process opens the fast path (pins under its own pid) and dies without cleaning up.
    const script = `
      import { KernelAccel } from ${
      JSON.stringify(new URL("../src/ebpf/sockmap.ts", import.meta.url).href)
    };
      await KernelAccel.open({ maxPairs: 64, maxSockets: 64, log: () => {} });
      console.log(Deno.pid);
      Deno.kill(Deno.pid, "SIGKILL");`;
    const child = await new Deno.Command(Deno.execPath(), {
      args: ["eval", script],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(child.signal, "SIGKILL", new TextDecoder().decode(child.stderr));
    const deadPid = Number(new TextDecoder().decode(child.stdout).trim());
    const deadDir = instancePinDir(deadPid);
    assert.equal((await listDir(deadDir))?.length, 3, "the killed run left its pins");
    // a live process's dir (this test's parent, say) must survive
    const liveDir = instancePinDir(Deno.ppid);
    const liveExisted = (await listDir(liveDir)) !== null;
    if (!liveExisted) await Deno.mkdir(liveDir);
    try {
      const { accel, logs } = await open();
      try {
        assert.equal(await listDir(deadDir), null, "the dead instance's pins are gone");
        assert.notEqual(await listDir(liveDir), null, "a live instance's dir is kept");
        assert.ok(
          logs.some((l) => l.includes(`removed the eBPF pins of a dead instance (pid ${deadPid})`)),
          logs.join("\n"),
        );
        assert.equal((await listDir(PIN_DIR))?.length, 3);
      } finally {
        await accel.close();
      }
      assert.equal(await listDir(PIN_DIR), null);
    } finally {
      if (!liveExisted) await Deno.remove(liveDir);
    }
  },
});

/** A connected pair of TCP conns: [client, server] over a fresh listener on `listenHost`. */
async function connPair(listenHost: string, connectHost: string): Promise<Deno.Conn[]> {
  const l = Deno.listen({ hostname: listenHost, port: 0 });
  try {
    const client = await Deno.connect({ hostname: connectHost, port: port(l) });
    return [client, await l.accept()];
  } finally {
    l.close();
  }
}

Deno.test({
  name: "kernel: pair() inserts both sockets into the sockhash by fd (passive and active, IPv4, " +
    "IPv6, IPv4 on a dual-stack listener, sockets older than open() too); unpair() and a " +
    "socket's close take them out; a socket its peer closed is refused",
  ignore: !!SKIP,
  async fn() {
    const [early, earlyPeer] = await connPair("127.0.0.1", "127.0.0.1");
    const { accel } = await open();
    const conns: Deno.Conn[] = [early, earlyPeer];
    try {
      for (
        const [listenHost, connectHost] of [
          ["127.0.0.1", "127.0.0.1"],
          ["::1", "::1"],
          ["::", "127.0.0.1"],
        ]
      ) {
        // server: a passive socket (as the proxy's client side); client: an active one
        const [client, server] = await connPair(listenHost, connectHost);
        const [client2, server2] = await connPair(listenHost, connectHost);
        conns.push(client, server, client2, server2);
        assert.equal(accel.isTracked(sock(server)), false, "nothing is tracked before pair()");
        const p = accel.pair(sock(server), sock(client2));
        assert.equal(accel.isTracked(sock(server)), true, `passive on [${listenHost}]`);
        assert.equal(accel.isTracked(sock(client2)), true, `active to ${connectHost}`);
        assert.equal(accel.pairCount(), 2);
        accel.unpair(p);
        assert.equal(accel.isTracked(sock(server)), false, "unpair() takes both out");
        assert.equal(accel.isTracked(sock(client2)), false);
        assert.equal(accel.pairCount(), 0);
      }
      // a socket established before open() is paired all the same
      const p = accel.pair(sock(early), sock(conns[3]));
      assert.equal(accel.isTracked(sock(early)), true, "a socket older than open()");
      assert.equal(accel.stats().socketsLive, 2);
      const key = sock(early);
      early.close();
      assert.equal(accel.isTracked(key), false, "a closed socket leaves the sockhash by itself");
      accel.unpair(p);
      // the peer closed its end (CLOSE_WAIT): no longer established, refused, nothing stays
      const [gone, goneServer] = await connPair("127.0.0.1", "127.0.0.1");
      const [other, otherServer] = await connPair("127.0.0.1", "127.0.0.1");
      conns.push(goneServer, other, otherServer);
      const goneSock = sock(goneServer);
      gone.close();
      await goneServer.read(new Uint8Array(1));
      assert.throws(
        () => accel.pair(goneSock, sock(other)),
        (e) => e instanceof KernelAccelError && e.reason === "socket_gone",
      );
      assert.equal(accel.isTracked(sock(other)), false, "a refused pair leaves nothing behind");
      assert.equal(accel.pairCount(), 0);
      const s = accel.stats();
      assert.equal(s.socketsInserted, 8);
      assert.equal(s.insertFailures, 1);
      assert.equal(s.socketsLive, 0);
    } finally {
      for (const c of conns) {
        try {
          c.close();
        } catch { /* closed */ }
      }
      await accel.close();
    }
  },
});

Deno.test({
  name: "kernel: a full sockhash (64 sockets: 32 pairs) refuses the 33rd pair with map_full " +
    "and leaves nothing of it behind; an unpair makes room again",
  ignore: !!SKIP,
  async fn() {
    const { accel } = await open({ maxSockets: 64 });
    const conns: Deno.Conn[] = [];
    const pairs: SplicePair[] = [];
    try {
      const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      const next = async () => {
        const c = await Deno.connect({ hostname: "127.0.0.1", port: port(l) });
        const s = await l.accept();
        conns.push(c, s);
        return s;
      };
      for (let i = 0; i < 32; i++) pairs.push(accel.pair(sock(await next()), sock(await next())));
      const [a, b] = [await next(), await next()];
      assert.throws(
        () => accel.pair(sock(a), sock(b)),
        (e) => e instanceof KernelAccelError && e.reason === "map_full",
      );
      assert.equal(accel.isTracked(sock(a)) || accel.isTracked(sock(b)), false);
      assert.equal(accel.pairCount(), 64, "the refused pair's entries were taken out");
      assert.equal(accel.stats().socketsLive, 64);
      accel.unpair(pairs.pop()!);
      pairs.push(accel.pair(sock(a), sock(b)));
      assert.equal(accel.stats().socketsLive, 64);
      l.close();
    } finally {
      for (const p of pairs) accel.unpair(p);
      for (const c of conns) c.close();
      await accel.close();
    }
  },
});

/** Client → proxy listener (a) and proxy → sink (b); b is paired with a. */
async function topology(accel: KernelAccel, host = "127.0.0.1") {
  const sinkListener = Deno.listen({ hostname: host, port: 0 });
  const proxyListener = Deno.listen({ hostname: host === "127.0.0.1" ? "::" : host, port: 0 });
  const client = await Deno.connect({ hostname: host, port: port(proxyListener) });
  const a = await proxyListener.accept();
  const b = await Deno.connect({ hostname: host, port: port(sinkListener) });
  const sink = await sinkListener.accept();
  proxyListener.close();
  sinkListener.close();
  const pair = accel.pair(sock(a), sock(b));
  return { client, a, b, sink, pair };
}

for (
  const [attach, mib] of [["stream_verdict", 128], ["verdict", 64]] as const
) {
  Deno.test({
    name: `kernel: ${mib} MiB client→backend are spliced in the kernel byte-exact, userspace ` +
      `reads none of it, and the pair counters account for every byte (${attach})`,
    ignore: !!SKIP,
    async fn() {
      const { accel } = await open({ verdictAttach: attach });
      try {
        const t = await topology(accel);
        const received = readAll(t.sink).then((r) => {
          t.sink.close();
          return r;
        });
        const session = splicedSession(accel, t.a, t.b, t.pair);
        const sent = await sendBlocks(t.client, mib);
        await t.client.closeWrite();
        const got = await received;
        const result = await session;
        const down = await readAll(t.client);
        t.client.close();

        const total = mib << 20;
        assert.equal(got.bytes, total);
        assert.equal(got.sha256, sent, "bytes arrive in order, none lost");
        assert.equal(down.bytes, 0);
        assert.equal(result.userspaceUp, 0, "userspace read no payload");
        assert.equal(result.counters.aToB, total);
        assert.equal(result.counters.bToA, 0);
        assert.ok(result.drainedUp);
        // a is an IPv4-mapped socket of a dual-stack listener: sock_diag must still find it
        assert.ok(result.drainedDown, "sock_diag found the IPv4-mapped client socket");
        const stats = accel.stats();
        assert.equal(stats.bytesSpliced, total);
        assert.equal(stats.redirectFailures, 0);
        assert.equal(accel.pairCount(), 0, "unpair removed both entries");
      } finally {
        await accel.close();
      }
    },
  });
}

Deno.test({
  name: "kernel: a backend's large final write followed by its close reaches the client " +
    "completely when the proxy waits for the drain before closing (IPv6)",
  ignore: !!SKIP,
  async fn() {
    const { accel } = await open({ verdictAttach: "verdict" });
    try {
      const t = await topology(accel, "::1");
      const session = splicedSession(accel, t.a, t.b, t.pair);
      // request up, then half-close; the backend answers with 48 MiB and closes at once
      const request = new TextEncoder().encode("GET /big HTTP/1.0\r\n\r\n");
      await t.client.write(request);
      await t.client.closeWrite();
      const req = await readAll(t.sink);
      assert.equal(req.bytes, request.length);
      const clientGot = readAll(t.client);
      const sent = await sendBlocks(t.sink, 48);
      t.sink.close();
      const got = await clientGot;
      t.client.close();
      const result = await session;
      assert.equal(got.bytes, 48 << 20);
      assert.equal(got.sha256, sent);
      assert.ok(result.drainedDown, "waitDrained saw the client socket take every byte");
      assert.equal(result.counters.bToA + result.userspaceDown, 48 << 20);
      assert.equal(result.counters.aToB + result.userspaceUp, request.length);
    } finally {
      await accel.close();
    }
  },
});

Deno.test({
  name: "kernel: paired sockets get the configured SO_SNDBUF/SO_RCVBUF, and a second open() in " +
    "the same process is refused",
  ignore: !!SKIP,
  async fn() {
    const { accel } = await open({ sndbuf: 256 * 1024, rcvbuf: 128 * 1024 });
    const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const client = await Deno.connect({ hostname: "127.0.0.1", port: port(l) });
    const server = await l.accept();
    try {
      const p = accel.pair(sock(server), sock(client));
      for (const c of [client, server]) {
        const info = accel.tcpInfo(sock(c));
        assert.ok(info, "sock_diag finds the socket");
        assert.equal(info.sndbuf, 2 * 256 * 1024, "the kernel doubles SO_SNDBUF");
        assert.equal(info.rcvbuf, 2 * 128 * 1024);
      }
      assert.equal(accel.stats().setsockoptFailures, 0);
      accel.unpair(p);
      await assert.rejects(
        open(),
        (e) => e instanceof KernelAccelError && e.reason === "already_open",
      );
    } finally {
      client.close();
      server.close();
      l.close();
      await accel.close();
    }
  },
});

Deno.test({
  name: "kernel: a program the verifier rejects fails with a BpfError carrying the verifier log",
  ignore: !!SKIP,
  async fn() {
    const dir = await Deno.makeTempDir();
    try {
      await Deno.writeTextFile(
        `${dir}/bad.bpf.c`,
        `#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1);
         __type(key, __u32); __type(value, __u64); } counts SEC(".maps");
SEC("sockops") int no_null_check(struct bpf_sock_ops *skops) {
  __u32 k = 0; __u64 *v = bpf_map_lookup_elem(&counts, &k);
  return *v & 1; /* the verifier insists on a NULL check */
}
char _license[] SEC("license") = "GPL";
`,
      );
      const cc = await new Deno.Command("clang", {
        args: [
          "-O2",
          "-g",
          "-target",
          "bpf",
          `-I/usr/include/${Deno.build.arch}-linux-gnu`,
          "-c",
          `${dir}/bad.bpf.c`,
          "-o",
          `${dir}/bad.bpf.o`,
        ],
        stderr: "piped",
      }).output();
      assert.ok(cc.success, new TextDecoder().decode(cc.stderr));
      using obj = BpfObject.openMem(await Deno.readFile(`${dir}/bad.bpf.o`), "bad");
      const err = (() => {
        try {
          obj.load();
        } catch (e) {
          return e;
        }
        assert.fail("load of a rejected program succeeded");
      })();
      assert.ok(err instanceof BpfError, String(err));
      assert.equal(err.op, "bpf_object__load(bad)");
      assert.equal(err.errnoName, "EACCES");
      assert.match(err.verifierLog ?? "", /invalid mem access 'map_value_or_null'/);
      assert.match(err.message, /EACCES.*\n.*verifier log/s);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "kernel: map helpers refuse wrong key and value sizes with a typed error",
  ignore: !!SKIP,
  fn() {
    using obj = BpfObject.openMem(Deno.readFileSync(OBJECT), "sizes");
    obj.map("sni_pairs").setMaxEntries(8);
    obj.map("sni_sockhash").setMaxEntries(8);
    obj.load();
    const pairs = obj.map("sni_pairs");
    assert.equal(pairs.keySize, 44);
    assert.equal(pairs.valueSize, 64);
    assert.throws(
      () => pairs.update(new Uint8Array(43), new Uint8Array(64)),
      (e) => e instanceof BpfError && e.errno === 22 && /key is 43 bytes.*44/.test(e.message),
    );
    assert.throws(
      () => pairs.lookup(new Uint8Array(44), new Uint8Array(8)),
      (e) => e instanceof BpfError && /value buffer is 8 bytes, the map needs 64/.test(e.message),
    );
    assert.equal(pairs.lookup(new Uint8Array(44), new Uint8Array(64)), false);
    pairs.update(new Uint8Array(44), new Uint8Array(64));
    assert.equal(pairs.lookup(new Uint8Array(44), new Uint8Array(64)), true);
    assert.equal(pairs.delete(new Uint8Array(44)), true);
    assert.equal(pairs.delete(new Uint8Array(44)), false);
    const stats = obj.map("sni_stats");
    assert.equal(stats.valueBufferSize, 56 * KernelAccel.possibleCpus()); // sni_stats: 7 x u64
  },
});

Deno.test({
  name: "kernel: open() with an unusable object fails with cause and fix and leaves nothing behind",
  ignore: !!SKIP,
  async fn() {
    await assert.rejects(
      open({ object: new TextEncoder().encode("not an ELF file") }),
      (e) =>
        e instanceof KernelAccelError && e.reason === "bad_object" &&
        /build\.sh/.test(e.message),
    );
    assert.equal(await listDir(PIN_DIR), null);
  },
});
