/**
 * The eBPF splice fast path against the real kernel: load, attach, pin, crash recovery, socket
 * tracking, in-kernel splicing of real TCP connections (byte-exact, userspace reads nothing),
 * half-close draining and verifier errors. Needs root, libbpf.so.1 and clang (to build the
 * object when missing); elsewhere every test is skipped with the reason printed.
 */

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { BpfAttachType, BpfError, BpfObject, libbpf, queryProgIds } from "../ffi/libbpf.ts";
import { closeFd, openDirectory } from "../ffi/libc.ts";
import { ensureBpfObject } from "./harness/mod.ts";
import { writeAll } from "../src/net/bytes.ts";
import { FALLBACK_CGROUP2_MOUNT } from "../src/ebpf/host.ts";
import {
  KernelAccel,
  KernelAccelError,
  type KernelAccelOptions,
  type SocketAddrs,
  type SplicePair,
} from "../src/ebpf/sockmap.ts";

const ROOT = new URL("..", import.meta.url).pathname;
const OBJECT = `${ROOT}bpf/sockmap.bpf.o`;
const PIN_DIR = "/sys/fs/bpf/sni-proxy-test";

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
  const mounts = await Deno.readTextFile("/proc/self/mounts");
  if (!/ cgroup2 /.test(mounts) && !(await Deno.stat("/sys/fs/cgroup").catch(() => null))) {
    return "no cgroup2 mount and no /sys/fs/cgroup";
  }
  return null;
}

const SKIP = await skipReason();
if (SKIP) console.warn(`\n!!! SKIPPING tests/kernel_test.ts (eBPF fast path): ${SKIP}\n`);

async function cgroup2Mount(): Promise<string> {
  const mounts = await Deno.readTextFile("/proc/self/mounts");
  const m = mounts.split("\n").map((l) => l.split(" ")).find((f) => f[2] === "cgroup2");
  return m ? m[1] : FALLBACK_CGROUP2_MOUNT;
}

async function ownCgroup(): Promise<string> {
  const text = await Deno.readTextFile("/proc/self/cgroup");
  return text.split("\n").find((l) => l.startsWith("0::"))?.slice(3) ?? "";
}

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
    pinDir: PIN_DIR,
    cgroupDir: `${await cgroup2Mount()}/sni-proxy-test`,
    log: (level, message) => {
      if (level !== "debug") logs.push(`${level}: ${message}`);
    },
    ...extra,
  });
  return { accel, logs };
}

function addrs(c: Deno.Conn): SocketAddrs {
  return { local: c.localAddr as Deno.NetAddr, remote: c.remoteAddr as Deno.NetAddr };
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
  name: "kernel: open() attaches sock_ops to its cgroup and the verdict to the sockhash, pins " +
    "maps and link; close() detaches, unpins and restores the process cgroup",
  ignore: !!SKIP,
  async fn() {
    const before = await ownCgroup();
    const { accel, logs } = await open();
    let closed = false;
    try {
      assert.equal(await ownCgroup(), "/sni-proxy-test");
      assert.equal(queryProgIds(accel.cgroupFd, BpfAttachType.CGROUP_SOCK_OPS).length, 1);
      assert.equal(queryProgIds(accel.sockhashFd, BpfAttachType.SK_SKB_STREAM_VERDICT).length, 1);
      assert.deepEqual(await listDir(PIN_DIR), [
        "sni_config",
        "sni_pairs",
        "sni_sockhash",
        "sni_stats",
        "sockops_link",
      ]);
      assert.ok(logs.some((l) => l.includes("fast path attached")), logs.join("\n"));
      await accel.close();
      closed = true;
      // the emptied cgroup is removed, which also drops anything still attached to it
      assert.equal(await listDir(accel.cgroupDir), null);
      assert.equal(await listDir(PIN_DIR), null);
      assert.equal(await ownCgroup(), before);
    } finally {
      if (!closed) await accel.close();
    }
  },
});

Deno.test({
  name: "kernel: a restart after a crash replaces the stale pins and attachment, not duplicates",
  ignore: !!SKIP,
  async fn() {
    // A child process opens the fast path with the same pins and dies without cleaning up.
    const script = `
      import { KernelAccel } from ${
      JSON.stringify(new URL("../src/ebpf/sockmap.ts", import.meta.url).href)
    };
      await KernelAccel.open({ maxPairs: 64, maxSockets: 64, pinDir: ${JSON.stringify(PIN_DIR)},
        cgroupDir: ${JSON.stringify(`${await cgroup2Mount()}/sni-proxy-test`)}, log: () => {} });
      Deno.kill(Deno.pid, "SIGKILL");`;
    const child = await new Deno.Command(Deno.execPath(), {
      args: ["eval", script],
      stdout: "null",
      stderr: "piped",
    }).output();
    assert.equal(child.signal, "SIGKILL", new TextDecoder().decode(child.stderr));
    assert.equal((await listDir(PIN_DIR))?.length, 5, "the crashed run left its pins");
    const cgroupDir = `${await cgroup2Mount()}/sni-proxy-test`;
    const cgFd = openDirectory(cgroupDir);
    try {
      const stale = queryProgIds(cgFd, BpfAttachType.CGROUP_SOCK_OPS);
      assert.equal(stale.length, 1, "the pinned link kept the dead run's program attached");

      const { accel, logs } = await open();
      try {
        const now = queryProgIds(cgFd, BpfAttachType.CGROUP_SOCK_OPS);
        assert.equal(now.length, 1, "exactly one sock_ops program after the restart");
        assert.notEqual(now[0], stale[0], "the new program replaced the stale one");
        assert.equal((await listDir(PIN_DIR))?.length, 5);
        assert.ok(logs.some((l) => l.includes("replaced stale eBPF pins")), logs.join("\n"));
      } finally {
        await accel.close();
      }
      assert.equal(await listDir(PIN_DIR), null);
    } finally {
      closeFd(cgFd);
    }
  },
});

Deno.test({
  name: "kernel: sockets established after open() are tracked (passive and active, IPv4, IPv6, " +
    "IPv4 on a dual-stack listener); earlier ones are not and pair() refuses them",
  ignore: !!SKIP,
  async fn() {
    const early = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const earlyClient = await Deno.connect({ hostname: "127.0.0.1", port: port(early) });
    const earlyServer = await early.accept();
    const { accel } = await open();
    const conns: Deno.Conn[] = [earlyClient, earlyServer];
    const listeners: Deno.Listener[] = [early];
    try {
      assert.equal(accel.isTracked(addrs(earlyClient)), false);
      assert.throws(
        () => accel.pair(addrs(earlyServer), addrs(earlyClient)),
        (e) => e instanceof KernelAccelError && e.reason === "socket_not_tracked",
      );
      // A listener created before open() keeps its old cgroup, and so do its new connections.
      const lateOnEarly = await Deno.connect({ hostname: "127.0.0.1", port: port(early) });
      const lateOnEarlyServer = await early.accept();
      conns.push(lateOnEarly, lateOnEarlyServer);
      assert.equal(accel.isTracked(addrs(lateOnEarly)), true, "active socket after open()");
      assert.equal(accel.isTracked(addrs(lateOnEarlyServer)), false, "listener's cgroup wins");

      for (
        const [listenHost, connectHost] of [["127.0.0.1", "127.0.0.1"], ["::1", "::1"], [
          "::",
          "127.0.0.1",
        ]]
      ) {
        const l = Deno.listen({ hostname: listenHost, port: 0 });
        listeners.push(l);
        const client = await Deno.connect({ hostname: connectHost, port: port(l) });
        const server = await l.accept();
        conns.push(client, server);
        assert.equal(accel.isTracked(addrs(client)), true, `active ${connectHost}`);
        assert.equal(
          accel.isTracked(addrs(server)),
          true,
          `passive ${(server.localAddr as Deno.NetAddr).hostname} on [${listenHost}]`,
        );
      }
      const s = accel.stats();
      assert.ok(s.socketsInserted >= 7, `inserted ${s.socketsInserted}`);
      assert.equal(s.insertFailures, 0);
    } finally {
      for (const c of conns) c.close();
      for (const l of listeners) l.close();
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
  const pair = accel.pair(addrs(a), addrs(b));
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
  name: "kernel: sockets tracked by sock_ops get the configured SO_SNDBUF/SO_RCVBUF, and a " +
    "second open() in the same process is refused",
  ignore: !!SKIP,
  async fn() {
    const { accel } = await open({ sndbuf: 256 * 1024, rcvbuf: 128 * 1024 });
    const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const client = await Deno.connect({ hostname: "127.0.0.1", port: port(l) });
    const server = await l.accept();
    try {
      for (const c of [client, server]) {
        const info = accel.tcpInfo(addrs(c));
        assert.ok(info, "sock_diag finds the socket");
        assert.equal(info.sndbuf, 2 * 256 * 1024, "the kernel doubles SO_SNDBUF");
        assert.equal(info.rcvbuf, 2 * 128 * 1024);
      }
      assert.equal(accel.stats().setsockoptFailures, 0);
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
    assert.equal(stats.valueBufferSize, 88 * KernelAccel.possibleCpus()); // sni_stats: 11 x u64
  },
});

Deno.test({
  name: "kernel: open() with an unusable object fails with cause and fix and leaves nothing behind",
  ignore: !!SKIP,
  async fn() {
    const before = await ownCgroup();
    await assert.rejects(
      open({ object: new TextEncoder().encode("not an ELF file") }),
      (e) =>
        e instanceof KernelAccelError && e.reason === "bad_object" &&
        /build\.sh/.test(e.message),
    );
    assert.equal(await ownCgroup(), before);
    assert.equal(await listDir(PIN_DIR), null);
    assert.equal(await listDir(`${await cgroup2Mount()}/sni-proxy-test`), null);
  },
});
