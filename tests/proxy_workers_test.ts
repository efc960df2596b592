/**
 * End to end: `workers` > 1. A supervisor process starts worker processes that share the
 * listeners (SO_REUSEPORT); signals reach all of them; a dead worker is restarted; counters and
 * logs come out of the supervisor as one proxy's.
 */
import assert from "node:assert/strict";
import {
  assertCumulative,
  assertPromtoolClean,
  echoHandler,
  histogramSeries,
  namedBackend,
  type ProxyProcess,
  rawServer,
  readToEnd,
  Scope,
  sleep,
  startProxy,
  tlsConnect,
  writeAll,
} from "./harness/mod.ts";

/** The worker pids from the supervisor's `ready:` line. */
function workerPids(stderr: string): number[] {
  const m = /ready: \d+ workers \(pids ([\d, ]+)\)/.exec(stderr);
  assert.ok(m, `no ready line with worker pids in:\n${stderr}`);
  return m[1].split(", ").map(Number);
}

function alive(pid: number): boolean {
  try {
    Deno.kill(pid, "SIGCONT");
    return true;
  } catch {
    return false;
  }
}

async function waitGone(pids: number[], ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (pids.some(alive)) {
    if (Date.now() > deadline) throw new Error(`still running: ${pids.filter(alive)}`);
    await sleep(50);
  }
}

/** An echo backend behind a proxy with two workers routing `a.test` to it. */
async function echoProxy(scope: Scope, extra: Record<string, unknown> = {}) {
  const backend = await rawServer(scope, echoHandler);
  const p = await startProxy(scope, {
    workers: 2,
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [backend.address] }],
    log: { level: "info" },
    ...extra,
  });
  return { backend, p };
}

/** Waits until the access log has `n` entries (the file sink flushes every 500 ms). */
async function accessEntries(p: ProxyProcess, n: number): Promise<Record<string, unknown>[]> {
  for (let t = 0;; t++) {
    const entries = await p.access();
    if (entries.length >= n || t === 50) {
      assert.equal(entries.length, n, "one access line per connection, in one file");
      return entries;
    }
    await sleep(100);
  }
}

/** One short echo through the proxy; returns the bytes that came back. */
async function echoOnce(port: number, bytes = 1000): Promise<number> {
  const conn = await tlsConnect(port, "a.test");
  try {
    const [, got] = await Promise.all([
      writeAll(conn, new Uint8Array(bytes).fill(1)).then(() => conn.closeWrite()),
      readToEnd(conn),
    ]);
    return got.length;
  } finally {
    conn.close();
  }
}

Deno.test("workers: 2 share the listener; access log and /metrics add up to one proxy", async () => {
  await using scope = new Scope();
  const { backend, p } = await echoProxy(scope, { metrics: { address: "127.0.0.1:0" } });
  try {
    const pids = workerPids(p.stderr());
    assert.equal(pids.length, 2);
    assert.ok(!pids.includes(p.pid), "workers are processes of their own");
    assert.equal(p.listeners.length, 1, "one listening line, from the supervisor");
    const N = 40;
    for (let i = 0; i < N; i++) assert.equal(await echoOnce(p.port()), 1000);
    const entries = await accessEntries(p, N);
    const byWorker = new Map<unknown, number>();
    for (const e of entries) byWorker.set(e.worker, (byWorker.get(e.worker) ?? 0) + 1);
    // the kernel hashes each new connection's 4-tuple onto one of the listening sockets
    assert.deepEqual([...byWorker.keys()].sort(), [1, 2], JSON.stringify([...byWorker]));
    const metricsAddr = /metrics on http:\/\/([\d.:]+)\/metrics/.exec(p.stderr())![1];
    const text = await (await fetch(`http://${metricsAddr}/metrics`)).text();
    assert.match(text, new RegExp(`^sni_proxy_connections_accepted_total ${N}$`, "m"));
    // TLS bytes as relayed: the sum of what each worker logged
    const down = entries.reduce((sum, e) => sum + (e.bytes_down as number), 0);
    assert.match(text, new RegExp(`^sni_proxy_bytes_total\\{direction="down"\\} ${down}$`, "m"));
    const stats = await (await fetch(`http://${metricsAddr}/stats`)).json();
    assert.equal(stats.connections.closed.done, N);
    // histograms are summed bucket by bucket: the sum is one proxy's, and still well formed
    await assertPromtoolClean(text);
    const route = { route: "a.test" };
    const duration = histogramSeries(text, "sni_proxy_connection_duration_seconds", route);
    assertCumulative(duration);
    assert.equal(duration.count, N);
    const perWorker = [1, 2].map((w) => entries.filter((e) => e.worker === w).length);
    assert.ok(perWorker.every((n) => n > 0 && n < N), `both workers served: ${perWorker}`);
    const bytes = histogramSeries(text, "sni_proxy_connection_bytes", {
      ...route,
      direction: "down",
    });
    assertCumulative(bytes);
    assert.equal(bytes.sum, down);
    // 1000 bytes each way plus TLS: every connection in the 4096 bucket, none in the 256 one
    assert.deepEqual(bytes.buckets.slice(0, 3), [["256", 0], ["1024", 0], ["4096", N]]);
  } finally {
    assert.equal(await p.stop(), 0, p.stderr());
    backend.close();
  }
});

Deno.test("workers: SIGHUP reaches every worker; SIGTERM stops them all and exits 0", async () => {
  await using scope = new Scope();
  const one = await namedBackend("one");
  const two = await namedBackend("two");
  const p = await startProxy(scope, {
    workers: 2,
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [one.address] }],
    log: { level: "info" },
  });
  const pids = workerPids(p.stderr());
  try {
    const cfg = JSON.parse(await Deno.readTextFile(p.configPath));
    cfg.routes[0].backends = [two.address];
    await Deno.writeTextFile(p.configPath, JSON.stringify(cfg));
    p.signal("SIGHUP");
    await p.waitForLog("sni-proxy·worker1·proxy: reloaded");
    await p.waitForLog("sni-proxy·worker2·proxy: reloaded");
    // enough connections to reach both workers: every one goes to the new backend
    for (let i = 0; i < 20; i++) {
      const conn = await tlsConnect(p.port(), "a.test");
      await writeAll(conn, new TextEncoder().encode("GET / HTTP/1.1\r\nhost: a.test\r\n\r\n"));
      const buf = new Uint8Array(4096);
      const n = await conn.read(buf);
      conn.close();
      assert.match(new TextDecoder().decode(buf.subarray(0, n ?? 0)), /\r\n\r\ntwo$/);
    }
    assert.deepEqual(one.seen, []);
  } finally {
    assert.equal(await p.stop(), 0, p.stderr());
    await one.close();
    await two.close();
  }
  await waitGone(pids);
  assert.match(p.stderr(), /sni-proxy·worker1·proxy: stopped/);
  assert.match(p.stderr(), /sni-proxy·worker2·proxy: stopped/);
  assert.doesNotMatch(p.stderr(), /exited unexpectedly/);
});

Deno.test("workers: a killed worker is logged and restarted; a killed supervisor takes its workers along", async () => {
  await using scope = new Scope();
  const { backend, p } = await echoProxy(scope);
  try {
    const [first, second] = workerPids(p.stderr());
    Deno.kill(first, "SIGKILL");
    await p.waitForLog(
      new RegExp(`worker 1 \\(pid ${first}\\) exited unexpectedly \\(signal SIGKILL\\)`),
    );
    await p.waitForLog(/worker 1 restarted \(pid (\d+)\)/);
    const restarted = Number(/worker 1 restarted \(pid (\d+)\)/.exec(p.stderr())![1]);
    assert.ok(alive(restarted) && alive(second));
    // served all along by the other worker, and by the new one now
    for (let i = 0; i < 20; i++) assert.equal(await echoOnce(p.port()), 1000);
    const workers = new Set((await accessEntries(p, 20)).map((e) => e.worker));
    assert.ok(workers.has(1) && workers.has(2), JSON.stringify([...workers]));

    p.signal("SIGKILL");
    await p.status;
    // each worker sees its supervisor's pipe close, drains and exits
    await waitGone([restarted, second]);
  } finally {
    await p.stop();
    backend.close();
  }
});

Deno.test("workers: when a worker cannot bind, the start fails and says why", async () => {
  // a plain listener without SO_REUSEPORT holds the port: no worker can share it
  await using scope = new Scope();
  const blocker = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (blocker.addr as Deno.NetAddr).port;
  try {
    const err = await startProxy(scope, {
      workers: 2,
      listeners: [{ address: `127.0.0.1:${port}` }],
      routes: [{ match: "a.test", backends: ["127.0.0.1:9"] }],
      log: { level: "info" },
    }).then(() => null, (e: Error) => e.message);
    assert.ok(err, "the proxy must not start");
    assert.match(err, /proxy exited [1-9][0-9]* before logging/, "a failed start exits non-zero");
    assert.match(err, /cannot start: worker \d \(pid \d+\) did not start/);
    assert.match(err, new RegExp(`cannot listen on 127\\.0\\.0\\.1:${port}`));
  } finally {
    blocker.close();
  }
});
