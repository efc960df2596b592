/**
 * A refused client gets its refusal (a TLS alert, an HTTP 421/503/504) whole, even when it sent
 * bytes the proxy never read (a hello with more behind it, a pipelined request): the proxy sends
 * the refusal and a FIN, reads and drops what the client still sends, and closes once the client
 * is done (a lingering close), bounded in time, bytes and count. Real clients (raw sockets,
 * openssl s_client, curl), in userspace and kernel modes. With `timeouts.linger_ms` 0 (closed at
 * once, as before) the same client gets a reset: the test can fail.
 *
 * @module
 */
import assert from "node:assert/strict";
import { resetSocket } from "../ffi/libc.ts";
import {
  clientHelloBytes,
  curl,
  e2eTest,
  fdCount,
  fdOf,
  fixtureClients,
  identityBackend,
  kernelEbpf,
  kernelSkipReason,
  opensslClient,
  type ProxyProcess,
  runChecked,
  type Scope,
  scrapeMetrics,
  sleep,
  startKernelProxy,
  startProxy,
  testNamespace,
  whoAnswers,
  writeAll,
} from "./harness/mod.ts";

const KERNEL_SKIP = await kernelSkipReason();
if (KERNEL_SKIP) {
  console.warn(`\n!!! SKIPPING the kernel mode of tests/refusal_test.ts: ${KERNEL_SKIP}\n`);
}

/** The fatal alert unrecognized_name, as the proxy sends it for a name without a route. */
const UNRECOGNIZED_NAME = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112];

type Mode = "userspace" | "pipe";

/** A proxy in `mode` with TLS and HTTP listeners and one route (to a port nothing listens on). */
function refusingProxy(
  scope: Scope,
  mode: Mode,
  extra: { timeouts?: Record<string, unknown>; limits?: Record<string, unknown> } = {},
): Promise<ProxyProcess> {
  const config = {
    listeners: [
      { address: "127.0.0.1:0", protocol: "tls" },
      { address: "127.0.0.1:0", protocol: "http" },
    ],
    routes: [{ match: "a.test", backends: ["127.0.0.1:1"] }],
    metrics: { address: "127.0.0.1:0" },
    ...extra,
  };
  if (mode === "userspace") return startProxy(scope, { ...config, ebpf: { enabled: false } });
  return startKernelProxy(scope, { ...config, ebpf: kernelEbpf({ splice_mode: "pipe" }) });
}

/**
 * What a client that sends `bytes` in one go, waits `waitMs` and then reads gets: every byte
 * until the end, and how it ended (`eof`, or the error's name).
 */
async function sendThenRead(
  port: number,
  bytes: Uint8Array,
  waitMs = 300,
): Promise<{ got: number[]; end: string }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await writeAll(conn, bytes);
    // the proxy has refused and closed meanwhile; a reset it sent is here by now
    await sleep(waitMs);
    const got: number[] = [];
    const buf = new Uint8Array(4096);
    for (;;) {
      let n: number | null;
      try {
        n = await conn.read(buf);
      } catch (e) {
        return { got, end: (e as Error).name };
      }
      if (n === null) return { got, end: "eof" };
      got.push(...buf.subarray(0, n));
    }
  } finally {
    conn.close();
  }
}

/** A hello for `name` with `extra` bytes behind it in the same write. */
async function helloAndMore(name: string, extra: number): Promise<Uint8Array> {
  const hello = await clientHelloBytes(name);
  const out = new Uint8Array(hello.length + extra);
  out.set(hello);
  out.fill(0x17, hello.length);
  return out;
}

/** Two pipelined HTTP requests for a name without a route. */
const PIPELINED = new TextEncoder().encode(
  "GET / HTTP/1.1\r\nhost: nope.test\r\n\r\nGET /again HTTP/1.1\r\nhost: nope.test\r\n\r\n",
);

/** Waits until the lingering closes counted satisfy `ok`; returns them. */
async function untilCounts(
  p: ProxyProcess,
  what: string,
  ok: (c: Record<string, number>) => boolean,
  ms = 5000,
): Promise<Record<string, number>> {
  const end = Date.now() + ms;
  for (;;) {
    const c = await lingerCounts(p);
    if (ok(c)) return c;
    assert.ok(Date.now() < end, `${what}: not within ${ms} ms: ${JSON.stringify(c)}`);
    await sleep(50);
  }
}

/** The lingering closes the proxy counted, by result, and those under way (`gauge`). */
async function lingerCounts(p: ProxyProcess): Promise<Record<string, number>> {
  const text = await scrapeMetrics(p);
  const out: Record<string, number> = {};
  for (const m of text.matchAll(/^sni_proxy_lingering_closes_total\{result="(\w+)"\} (\d+)$/gm)) {
    out[m[1]] = Number(m[2]);
  }
  out.gauge = Number(/^sni_proxy_lingering_connections (\d+)$/m.exec(text)?.[1] ?? -1);
  return out;
}

/**
 * Attaches tests/fixtures/drop_first_alert.bpf.c (compiled now) to the loopback of the
 * namespace `wrapper` enters: the first TLS alert segment of each connection is lost.
 */
async function loseFirstAlerts(scope: Scope, wrapper: string[]): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "sni-refusal-bpf-" });
  scope.defer(() => Deno.remove(dir, { recursive: true }));
  const src = new URL("./fixtures/drop_first_alert.bpf.c", import.meta.url).pathname;
  const multiarch = `/usr/include/${Deno.build.arch}-linux-gnu`;
  await runChecked([
    "clang",
    "-O2",
    "-g",
    "-target",
    "bpf",
    `-I${multiarch}`,
    "-c",
    src,
    "-o",
    `${dir}/f.o`,
  ]);
  const ns = wrapper[3];
  await runChecked(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "clsact"]);
  await runChecked([
    "tc",
    "-n",
    ns,
    "filter",
    "add",
    "dev",
    "lo",
    "ingress",
    "bpf",
    "da",
    "obj",
    `${dir}/f.o`,
    "sec",
    "tc",
  ]);
}

/**
 * 40 clients in a namespace of their own, whose loopback loses the first TLS alert segment of
 * each connection (as a real network may lose any segment), send a hello for a name without a
 * route and 64 KiB behind it, to a proxy in `mode` there with `linger_ms`: how many read the
 * unrecognized_name alert, and every client's outcome.
 */
async function refusedOverLossyLink(
  scope: Scope,
  mode: Mode,
  lingerMs: number,
): Promise<{ alerted: number; outcomes: string[] }> {
  const wrapper = await testNamespace(scope, `refusal-${mode}-${lingerMs}`);
  const config = {
    listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
    routes: [{ match: "a.test", backends: ["127.0.0.1:1"] }],
    timeouts: { linger_ms: lingerMs },
    ebpf: mode === "userspace" ? { enabled: false } : kernelEbpf({ splice_mode: "pipe" }),
  };
  const p = await startProxy(scope, config, { wrapper });
  assert.equal(p.ready.mode, mode === "userspace" ? "userspace" : "kernel");
  await loseFirstAlerts(scope, wrapper);
  const results = await fixtureClients(wrapper, p.port(), {
    count: 40,
    name: "nope.test",
    extra: 64 * 1024,
  });
  const alert = UNRECOGNIZED_NAME.map((b) => b.toString(16).padStart(2, "0")).join("");
  return {
    alerted: results.filter((r) => r.got === alert).length,
    outcomes: results.map((r) => `${r.got || "-"} ${r.end}`),
  };
}

for (const mode of ["userspace", "pipe"] as const) {
  const ignore = mode !== "userspace" && KERNEL_SKIP !== null;

  e2eTest(
    `${mode} mode: when the alert's first segment is lost, 40 refused clients with 64 KiB past ` +
      `their hello all read it, sent again; closed at once (linger_ms 0), the reset cuts it off`,
    async (scope) => {
      const lingering = await refusedOverLossyLink(scope, mode, 5000);
      assert.equal(lingering.alerted, 40, lingering.outcomes.join("\n"));
      // the control: a lost alert is never sent again once the socket was reset
      const cut = await refusedOverLossyLink(scope, mode, 0);
      assert.equal(cut.alerted, 0, cut.outcomes.join("\n"));
    },
    { ignore: KERNEL_SKIP !== null, timeoutMs: 90_000 },
  );

  e2eTest(
    `${mode} mode: a client refused for its name that sent 64 KiB past its hello reads the ` +
      `alert whole, then the end; pipelined HTTP requests get the 421; both lingered until the ` +
      `client closed`,
    async (scope) => {
      const p = await refusingProxy(scope, mode);
      const r = await sendThenRead(p.port(0), await helloAndMore("nope.test", 64 * 1024));
      assert.deepEqual(r, { got: UNRECOGNIZED_NAME, end: "eof" });
      const http = await sendThenRead(p.port(1), PIPELINED);
      const text = new TextDecoder().decode(new Uint8Array(http.got));
      assert.match(text, /^HTTP\/1\.1 421 Misdirected Request\r\n/);
      assert.equal(http.end, "eof");
      await untilCounts(p, "two lingering closes", (c) => c.eof === 2);
      const e = await p.waitAccess((e) => e.sni === "nope.test");
      assert.equal(e.close_reason, "no_route");
    },
    { ignore },
  );

  e2eTest(
    `${mode} mode: openssl s_client and curl refused for their name see the alert and the 421`,
    async (scope) => {
      const p = await refusingProxy(scope, mode);
      // s_client sends its hello and, with -ign_eof and stdin, a line it cannot send yet
      const o = await opensslClient(p.port(0), "nope.test");
      assert.match(o.stderr, /unrecognized name|alert number 112/i, o.stderr);
      const c = await curl(p.port(1), "nope.test", { http: true });
      assert.equal(c.code, 0, c.stderr);
      assert.match(c.stdout, /status=421$/);
    },
    { ignore },
  );
}

e2eTest(
  "a refused client that never reads nor closes is closed at linger_ms; one that keeps " +
    "sending is closed after 256 KiB; one that resets is let go at once; each counted",
  async (scope) => {
    const p = await refusingProxy(scope, "userspace", { timeouts: { linger_ms: 1500 } });
    await scrapeMetrics(p); // its connection is counted too
    const before = fdCount(p.pid);
    // silent: sends its hello and waits
    const silent = await Deno.connect({ hostname: "127.0.0.1", port: p.port(0) });
    await writeAll(silent, await clientHelloBytes("nope.test"));
    // keeps sending: reads nothing, writes on
    const flood = await Deno.connect({ hostname: "127.0.0.1", port: p.port(0) });
    await writeAll(flood, await clientHelloBytes("nope.test"));
    const flooding = (async () => {
      const chunk = new Uint8Array(16 * 1024);
      try {
        for (let i = 0; i < 64; i++) await writeAll(flood, chunk);
      } catch { /* reset once the proxy gave up on it */ }
    })();
    // resets right after its hello
    const resetter = await Deno.connect({ hostname: "127.0.0.1", port: p.port(0) });
    await writeAll(resetter, await helloAndMore("nope.test", 1000));
    await sleep(200);
    resetSocket(fdOf(resetter));
    resetter.close();
    await untilCounts(p, "a reset and a flood", (c) => c.reset === 1 && c.bytes === 1);
    await flooding;
    flood.close();
    const t0 = Date.now();
    assert.equal((await lingerCounts(p)).timeout, undefined, "not yet");
    await untilCounts(p, "the silent one timed out", (c) => c.timeout === 1);
    assert.ok(Date.now() - t0 < 2000, "within linger_ms of its refusal");
    // it got its alert, then the end
    const buf = new Uint8Array(64);
    const n = await silent.read(buf);
    assert.deepEqual([...buf.subarray(0, n ?? 0)], UNRECOGNIZED_NAME);
    assert.equal(await silent.read(buf), null);
    silent.close();
    assert.ok(fdCount(p.pid) <= before, `descriptors: ${fdCount(p.pid)} now, ${before} before`);
    assert.match(await scrapeMetrics(p), /^sni_proxy_lingering_connections 0$/m);
  },
);

e2eTest(
  "at limits.max_lingering, a further refused client is closed at once and counted as " +
    "over_limit; the lingering ones are not disturbed",
  async (scope) => {
    const p = await refusingProxy(scope, "userspace", { limits: { max_lingering: 3 } });
    const hello = await clientHelloBytes("nope.test");
    const held: Deno.TcpConn[] = [];
    scope.defer(() => held.forEach((c) => c.close()));
    for (let i = 0; i < 5; i++) {
      const c = await Deno.connect({ hostname: "127.0.0.1", port: p.port(0) });
      held.push(c);
      await writeAll(c, hello);
    }
    await untilCounts(p, "two over the limit", (c) => c.over_limit === 2);
    assert.match(await scrapeMetrics(p), /^sni_proxy_lingering_connections 3$/m);
    // the lingering ones end when their clients close
    for (const c of held) c.close();
    held.length = 0;
    await untilCounts(p, "three ends", (c) => c.eof === 3);
  },
);

e2eTest(
  "refused clients lingering near the descriptor limit (prlimit --nofile=256) do not keep a " +
    "client with a route out: the oldest lingering closes are cut for it (counted as " +
    "fd_reserve), each after its alert",
  async (scope) => {
    const b = await identityBackend(scope, "a.test");
    const p = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [b.address] }],
      metrics: { address: "127.0.0.1:0" },
      timeouts: { linger_ms: 20_000 },
      ebpf: { enabled: false },
    }, { wrapper: ["prlimit", "--nofile=256"] });
    const hello = await clientHelloBytes("nope.test");
    const held: Deno.TcpConn[] = [];
    scope.defer(() => held.forEach((c) => c.close()));
    // silent refused clients: each would hold its descriptor for linger_ms
    for (let i = 0; i < 240; i++) {
      const c = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
      held.push(c);
      await writeAll(c, hello);
    }
    await sleep(300);
    const t0 = Date.now();
    assert.equal(await whoAnswers(p.port(), "a.test"), "a.test");
    assert.ok(Date.now() - t0 < 2000, `served after ${Date.now() - t0} ms`);
    // every refused client is lingering or was cut, each counted once
    const c = await untilCounts(p, "240 refused", (c) => c.gauge + (c.fd_reserve ?? 0) === 240);
    assert.ok(c.fd_reserve > 0, JSON.stringify(c));
    // the first was cut: it read its alert, then the end
    const buf = new Uint8Array(64);
    const n = await held[0].read(buf);
    assert.deepEqual([...buf.subarray(0, n ?? 0)], UNRECOGNIZED_NAME);
    assert.equal(await held[0].read(buf), null);
  },
);
