/**
 * Kernel mode under production-like load: the real proxy with `ebpf.enabled`, the real kernel.
 * A reader that stops holds its sender back (bounded kernel memory, as in userspace mode) and
 * later gets every byte; many concurrent duplex transfers with random write sizes survive a
 * reload and a drain; full maps fall back to userspace without losing or stalling anything; and
 * tens of thousands of short connections leave no descriptor or kernel memory behind.
 *
 * Needs root, libbpf, clang and bpftool; elsewhere every test is skipped with the reason printed.
 * Only one kernel-mode proxy can run per machine: the tests wait for the slot.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { socketTuple } from "../src/kernel.ts";
import { SockDiag } from "../src/tcpinfo.ts";
import { drainHash, e2eTest, type Scope, sleep } from "./helpers.ts";
import {
  kernelEbpf,
  kernelSkipReason,
  randomPool,
  rawBackend,
  rawSpliced,
  startKernelProxy,
} from "./kernel_helpers.ts";

const SKIP = await kernelSkipReason();
if (SKIP) {
  console.warn(`\n!!! SKIPPING tests/kernel_load_test.ts (kernel mode under load): ${SKIP}\n`);
}

const MiB = 1 << 20;
const POOL = SKIP ? new Uint8Array(0) : randomPool(16 * MiB);

function ktest(name: string, fn: (scope: Scope) => Promise<void>, timeoutMs: number): void {
  e2eTest(name, fn, { timeoutMs, ignore: SKIP !== null });
}

/** Numbers worth reporting (observations on a busy 2-core box, not benchmarks). */
function note(text: string): void {
  console.log(`    [measured] ${text}`);
}

/** A socket's TCP queues by its Deno addresses (sock_diag), or null when gone. */
function queues(diag: SockDiag, conn: Deno.Conn): { recvQ: number; sendQ: number } | null {
  const info = diag.query(socketTuple({
    local: conn.localAddr as Deno.NetAddr,
    remote: conn.remoteAddr as Deno.NetAddr,
  }));
  return info ? { recvQ: info.readQueue, sendQ: info.writeQueue } : null;
}

/** MemAvailable of the host, in bytes. */
async function memAvailable(): Promise<number> {
  const text = await Deno.readTextFile("/proc/meminfo");
  return Number(/^MemAvailable:\s+(\d+) kB/m.exec(text)![1]) * 1024;
}

/** Writes `total` bytes of the pool (random sizes) and counts what the socket took so far. */
function countingWriter(conn: Deno.TcpConn, total: number) {
  const state = { written: 0, done: false, sha256: "" };
  const hash = createHash("sha256");
  const finished = (async () => {
    while (state.written < total) {
      const len = Math.min(total - state.written, 1 + Math.floor(Math.random() * 256 * 1024));
      const off = Math.floor(Math.random() * (POOL.length - len + 1));
      const chunk = POOL.subarray(off, off + len);
      hash.update(chunk);
      let sent = 0;
      while (sent < len) {
        const n = await conn.write(chunk.subarray(sent));
        sent += n;
        state.written += n;
      }
    }
    state.sha256 = hash.digest("hex");
    await conn.closeWrite();
    state.done = true;
  })();
  return { state, finished };
}

// ---------------------------------------------------------------------------------------------
// 1. Bounded memory, real backpressure

const STALL_TOTAL = 256 * MiB;
const MAX_BUFFERED = 4 * MiB;

for (const direction of ["backend → client", "client → backend"] as const) {
  ktest(
    `kernel mode: a reader that stops reading (${direction}) holds its sender back within ` +
      `ebpf.max_buffered_bytes, then gets every byte`,
    async (scope) => {
      const backend = rawBackend(scope);
      const proxy = await startKernelProxy(scope, {
        listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
        routes: [{ match: "a.test", backends: [backend.address] }],
        ebpf: kernelEbpf({ max_buffered_bytes: MAX_BUFFERED }),
      });
      const diag = SockDiag.open();
      scope.defer(() => diag.close());
      const { conn: client, helloBytes } = await rawSpliced(proxy.port(), "a.test");
      const server = await backend.next();
      scope.defer(() => {
        client.close();
        server.close();
      });
      const down = direction === "backend → client";
      const [sender, reader] = down ? [server, client] : [client, server];
      const memBefore = await memAvailable();
      const writer = countingWriter(sender, STALL_TOTAL);
      writer.finished.catch(() => {});
      // let the sender run into the stopped reader, then watch that it stays stopped
      let last = -1;
      for (let i = 0; i < 40 && writer.state.written !== last; i++) {
        last = writer.state.written;
        await sleep(250);
      }
      await sleep(1000);
      const stalledAt = writer.state.written;
      const senderQ = queues(diag, sender)!;
      const readerQ = queues(diag, reader)!;
      // what the sender wrote and is neither in its own send queue nor in the reader's
      // receive queue is held by the proxy: its sockets and the kernel's redirect queue
      const held = stalledAt - senderQ.sendQ - readerQ.recvQ;
      const memDrop = memBefore - await memAvailable();
      await sleep(1000);
      const later = writer.state.written;
      note(
        `${direction}: sender wrote ${(stalledAt / MiB).toFixed(1)} MiB then stopped; ` +
          `held by the proxy ${(held / MiB).toFixed(2)} MiB (sender send-q ` +
          `${(senderQ.sendQ / MiB).toFixed(2)}, reader recv-q ${(readerQ.recvQ / MiB).toFixed(2)}` +
          `); MemAvailable dropped ${(memDrop / MiB).toFixed(1)} MiB`,
      );
      assert.ok(!writer.state.done, "the sender was held back");
      assert.ok(later - stalledAt < 256 * 1024, `sender still moving: ${stalledAt} → ${later}`);
      assert.ok(
        held <= MAX_BUFFERED + 4 * MiB,
        `the proxy holds ${held} bytes for a stopped reader (max_buffered ${MAX_BUFFERED})`,
      );
      assert.ok(memDrop < 64 * MiB, `MemAvailable dropped ${memDrop} bytes`);
      // the reader comes back: everything arrives, in order
      const [got] = await Promise.all([drainHash(reader), writer.finished]);
      assert.deepEqual(got, { bytes: STALL_TOTAL, sha256: writer.state.sha256 });
      await reader.closeWrite();
      assert.equal((await drainHash(sender)).bytes, 0, "nothing else came the other way");
      const entry = await proxy.waitAccess((e) => e.backend === backend.address, 10_000);
      assert.equal(entry.mode, "kernel");
      assert.equal(entry.close_reason, "done", JSON.stringify(entry));
      if (down) assert.equal(entry.bytes_down, 1 + STALL_TOTAL, "bytes_down: GO byte + payload");
      else assert.equal(entry.bytes_up, helloBytes + STALL_TOTAL, "bytes_up: hello + payload");
      note(`access log: ${JSON.stringify(entry.throttled ?? "never throttled")}`);
    },
    120_000,
  );
}
