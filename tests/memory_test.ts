/**
 * The proxy's memory after a burst of short connections: once the burst is over, what it left
 * behind (V8 garbage, freed buffers in malloc's arenas) goes back to the system, so the RSS
 * returns to about where it was before.
 */
import assert from "node:assert/strict";
import {
  clientHelloBytes,
  e2eTest,
  rawServer,
  readClientHello,
  readToEnd,
  type Scope,
  sleep,
  startProxy,
  writeAll,
} from "./harness/mod.ts";
import { MemoryReleaser } from "../src/ops/memory.ts";

const encoder = new TextEncoder();

/** The proxy's resident set size, KiB. */
async function rssKiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]);
}

/** A plain-TCP backend that reads the relayed hello, answers `ok` and waits for the EOF. */
async function okBackend(s: Scope) {
  return await rawServer(s, async (conn) => {
    await readClientHello(conn);
    await writeAll(conn, encoder.encode("ok\n"));
    await readToEnd(conn);
  }, { tls: false });
}

/** `n` sessions, 32 at a time: hello, the backend's answer, close. Throws if one fails. */
async function sessions(port: number, hello: Uint8Array, n: number): Promise<void> {
  let next = 0;
  const worker = async () => {
    const buf = new Uint8Array(16);
    while (next++ < n) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      try {
        await writeAll(conn, hello);
        assert.notEqual(await conn.read(buf), null, "the backend's answer");
      } finally {
        conn.close();
      }
    }
  };
  await Promise.all(Array.from({ length: 32 }, worker));
}

/** Waits until the RSS stops falling (a release is done), up to `ms`; returns it. */
async function settledRss(pid: number, ms: number): Promise<number> {
  const deadline = Date.now() + ms;
  let last = await rssKiB(pid);
  while (Date.now() < deadline) {
    await sleep(500);
    const now = await rssKiB(pid);
    if (now > last - 256 && Date.now() > deadline - ms / 2) return now;
    last = now;
  }
  return last;
}

e2eTest(
  "after a burst of 10,000 short connections the RSS comes back to its baseline",
  async (s) => {
    const backend = await okBackend(s);
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "mem.test", backends: [`127.0.0.1:${backend.port}`] }],
      log: { level: "info", access_log: false },
      limits: { max_connections: 1000 },
      // as `deno task start` runs it
    }, { env: { DENO_V8_FLAGS: "--max-semi-space-size=4" } });
    const hello = await clientHelloBytes("mem.test");
    // warm-up (code compiled on first use), then the quiet time after which the proxy releases
    await sessions(proxy.port(), hello, 300);
    const baseline = await settledRss(proxy.pid, 8000);

    await sessions(proxy.port(), hello, 10_000);
    const peak = await rssKiB(proxy.pid);
    const settled = await settledRss(proxy.pid, 12_000);
    console.log(`RSS ${baseline} KiB → ${peak} KiB after the burst → ${settled} KiB`);
    // given back, not merely not grown further (left alone, V8 and malloc keep it for good)
    assert.ok(settled < peak - 8 * 1024, `RSS ${settled} KiB after the burst, peak ${peak} KiB`);
    assert.ok(
      settled <= baseline * 1.1,
      `RSS ${settled} KiB after the burst, baseline ${baseline} KiB (peak ${peak})`,
    );
  },
  { timeoutMs: 90_000 },
);

Deno.test("memory is released once a burst is quiet, never while events flow", async () => {
  let events = 0;
  const releaser = new MemoryReleaser({ activity: () => events, quietMs: 300, checkMs: 50 });
  try {
    // events every check: busy the whole time
    for (let i = 0; i < 16; i++) {
      events++;
      await sleep(50);
    }
    assert.equal(releaser.releases, 0, "no release while events flow");
    await sleep(700);
    assert.equal(releaser.releases, 1, "one release once quiet (the start's garbage)");
    // a short burst that grew nothing: no second collection
    events++;
    await sleep(700);
    assert.equal(releaser.releases, 1, "no release for a burst that left the RSS where it was");
    // a burst that grew the heap by far more than 5 %
    const garbage: Uint8Array[] = [];
    for (let i = 0; i < 400; i++) garbage.push(new Uint8Array(64 * 1024).fill(1));
    garbage.length = 0;
    events++;
    await sleep(700);
    assert.equal(releaser.releases, 2, "released after a burst that grew the RSS");
  } finally {
    releaser.close();
  }
});
