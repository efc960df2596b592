/**
 * End to end, bad input on a QUIC listener: datagrams a client's first flight never is (cut,
 * garbage, another version, undecryptable, too small, a hello too large or malformed) and
 * floods of unfinished hellos from many sources. Each is dropped and counted by reason, the
 * state kept stays within its bounds, and a real client is served all along.
 */
import assert from "node:assert/strict";
import { e2eTest, type ProxyProcess, scrapeMetrics, sleep, startProxy } from "./harness/mod.ts";
import { haveCommand } from "./harness/quic_clients.ts";
import { quicBackend, quicGet, sample } from "./harness/quic.ts";
import {
  concatBytes,
  cryptoFrame,
  fromHex,
  type PacketSpec,
  protectPacket,
} from "./harness/quic_initial.ts";
import type { Scope } from "./harness/scope.ts";

const tools = await haveCommand("gtlsclient") && await haveCommand("gtlsserver") &&
  Deno.uid() === 0;

const rfc = JSON.parse(
  Deno.readTextFileSync(new URL("./fixtures/quic/rfc_vectors.json", import.meta.url)),
);
/** The RFC 9001 A.2 ClientHello (example.com) as a handshake message. */
const hello: Uint8Array = fromHex(rfc.cryptoFrame).subarray(4);
const DCID = fromHex("8394c8f03e515708");

/** One 1200-byte Initial datagram of `frames`, with a DCID of its own (`n`). */
function initial(frames: Uint8Array, n = 0, over: Partial<PacketSpec> = {}): Uint8Array {
  const dcid = DCID.slice();
  dcid[7] = n & 0xff;
  dcid[6] = (n >> 8) & 0xff;
  return protectPacket({ dcid, pn: 0, frames, size: 1200, ...over });
}

/** A UDP socket on `host` sending to the proxy. */
function sender(s: Scope, host = "127.0.0.1"): Deno.DatagramConn {
  const sock = Deno.listenDatagram({ transport: "udp", hostname: host, port: 0 });
  s.defer(() => sock.close());
  return sock;
}

async function send(sock: Deno.DatagramConn, port: number, d: Uint8Array): Promise<void> {
  await sock.send(d, { transport: "udp", hostname: "127.0.0.1", port });
}

/** Polls the metrics until `ok` holds for them (fails with them after `ms`). */
async function metricsUntil(p: ProxyProcess, ok: (m: string) => boolean, ms = 5000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const m = await scrapeMetrics(p);
    if (ok(m)) return m;
    if (Date.now() > deadline) throw new Error(`metrics never as expected:\n${m}`);
    await sleep(50);
  }
}

const dropped = (m: string, reason: string) =>
  sample(m, "sni_proxy_quic_dropped_total", `{reason="${reason}"}`);

async function proxyWithBackend(s: Scope, extra: Record<string, unknown> = {}) {
  const a = await quicBackend(s, { who: "backend A\n" });
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
    routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
    metrics: { address: "127.0.0.1:0" },
    ...extra,
  });
  return proxy;
}

/** A real download still works. */
async function stillServes(p: ProxyProcess): Promise<void> {
  const got = await quicGet(p.port(), { name: "a.test", path: "who" });
  assert.equal(new TextDecoder().decode(got.body ?? new Uint8Array()), "backend A\n");
}

e2eTest(
  "QUIC bad input: each kind of bad first datagram is dropped and counted by reason",
  async (s) => {
    const proxy = await proxyWithBackend(s, { limits: { max_client_hello_bytes: 512 } });
    const port = proxy.port();
    const good = initial(cryptoFrame(0, hello));
    const flipped = good.slice();
    flipped[good.length - 30] ^= 1;
    const wrongVersion = good.slice();
    wrongVersion.set([0x0a, 0x0a, 0x0a, 0x0a], 1);
    const huge = concatBytes(Uint8Array.of(1, 0, 0x08, 0), hello.subarray(4)); // says 2048 bytes
    const notHello = concatBytes(Uint8Array.of(2), hello.subarray(1));
    const cases: [string, Uint8Array][] = [
      ["garbage", Uint8Array.of(0xc0, 1, 2)],
      [
        "unknown_flow",
        concatBytes(Uint8Array.of(0x40), crypto.getRandomValues(new Uint8Array(60))),
      ],
      ["wrong_version", wrongVersion],
      // its Length runs past the datagram's end
      ["truncated", initial(cryptoFrame(0, hello), 4, { size: 1300 }).subarray(0, 1250)],
      ["small_datagram", initial(cryptoFrame(0, hello), 1, { size: 1199 })],
      ["undecryptable", flipped],
      ["too_large", initial(cryptoFrame(0, huge), 2)],
      ["bad_hello", initial(cryptoFrame(0, notHello), 3)],
    ];
    for (const [reason, d] of cases) {
      // each from its own address:port, three times (a retransmitting client)
      const sock = sender(s);
      for (let i = 0; i < 3; i++) await send(sock, port, d);
      const m = await metricsUntil(proxy, (m) => dropped(m, reason) >= 1);
      assert.ok(dropped(m, reason) >= 1, reason);
    }
    const m = await metricsUntil(proxy, (m) => dropped(m, "refused_flow") >= 4);
    // nothing routed; the two final refusals (too_large, bad_hello) are flows kept to drop
    // their retransmissions cheaply, the rest left no state
    assert.equal(sample(m, "sni_proxy_quic_flows_total"), 0, m);
    assert.equal(sample(m, "sni_proxy_quic_flows_active"), 2, m);
    assert.equal(sample(m, "sni_proxy_quic_flows_closed_total", '{reason="bad_initial"}'), 2, m);
    await proxy.waitAccess((e) =>
      e.close_reason === "bad_initial" && /too large|over/.test(
        String(e.error),
      )
    );
    await proxy.waitAccess((e) =>
      e.close_reason === "bad_initial" && /client_hello/.test(
        String(e.error),
      )
    );
    const logged = (await proxy.access()).filter((e) => e.close_reason === "bad_initial");
    assert.equal(logged.length, 2, JSON.stringify(logged));
    await stillServes(proxy);
  },
  { ignore: !tools, timeoutMs: 40_000 },
);

e2eTest(
  "QUIC bad input: a flood of unfinished hellos from many sources stays within max_pending_flows",
  async (s) => {
    const proxy = await proxyWithBackend(s, {
      quic: { max_pending_flows: 16, max_flows_per_source: 5 },
      timeouts: { client_hello_ms: 1500 },
    });
    const port = proxy.port();
    const half = cryptoFrame(0, hello.subarray(0, 100)); // the hello's first 100 bytes only
    const sources = 200;
    for (let i = 0; i < sources; i++) {
      const sock = sender(s, `127.0.0.${2 + (i % 200)}`);
      await send(sock, port, initial(half, 100 + i));
    }
    let m = await metricsUntil(proxy, (m) => dropped(m, "pending_evicted") >= sources - 16);
    assert.ok(sample(m, "sni_proxy_quic_flows_active") <= 16, m);
    // a real client gets through meanwhile
    await stillServes(proxy);
    // one source at its max_flows_per_source
    const one = Array.from({ length: 10 }, () => sender(s, "127.0.0.250"));
    for (const [i, sock] of one.entries()) await send(sock, port, initial(half, 1000 + i));
    m = await metricsUntil(proxy, (m) => dropped(m, "source_flows") >= 5);
    assert.equal(dropped(m, "source_flows"), 5, m);
    // the unfinished hellos end at client_hello_ms: only the real client's flow is left
    m = await metricsUntil(proxy, (m) => sample(m, "sni_proxy_quic_flows_active") === 1, 8000);
    assert.equal(
      sample(m, "sni_proxy_quic_flows_closed_total", '{reason="client_hello_timeout"}') +
        sample(m, "sni_proxy_quic_flows_closed_total", '{reason="pending_evicted"}'),
      sources + 5,
      m,
    );
  },
  { ignore: !tools, timeoutMs: 40_000 },
);

e2eTest(
  "QUIC: at quic.max_flows routed flows new clients are dropped (flow_limit); unfinished hellos give way",
  async (s) => {
    const proxy = await proxyWithBackend(s, { quic: { max_flows: 2, idle_ms: 4000 } });
    const port = proxy.port();
    // two routed flows (they live until they idle out)
    await stillServes(proxy);
    await stillServes(proxy);
    let m = await metricsUntil(proxy, (m) => sample(m, "sni_proxy_quic_flows_active") === 2);
    const third = await quicGet(port, {
      name: "a.test",
      path: "who",
      args: ["--handshake-timeout=1s"],
    }, 6);
    assert.ok(!third.body?.length, "the third client is not served");
    m = await metricsUntil(proxy, (m) => dropped(m, "flow_limit") >= 1);
    assert.equal(sample(m, "sni_proxy_quic_flows_active"), 2, m);
    // once they idle out a client is served again
    await metricsUntil(proxy, (m) =>
      sample(m, "sni_proxy_quic_flows_total") === 2 &&
      sample(m, "sni_proxy_quic_flows_closed_total", '{reason="idle_timeout"}') === 2, 12_000);
    await stillServes(proxy);
    // unfinished hellos never fill the table: each gives way to the next
    const half = cryptoFrame(0, hello.subarray(0, 100));
    for (let i = 0; i < 5; i++) await send(sender(s), port, initial(half, 300 + i));
    m = await metricsUntil(proxy, (m) => dropped(m, "pending_evicted") >= 3);
    await stillServes(proxy);
  },
  { ignore: !tools, timeoutMs: 60_000 },
);

e2eTest(
  "QUIC: an Initial of a new connection from a routed flow's address starts a new flow",
  async (s) => {
    const a = await quicBackend(s, { who: "backend A\n" });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
      // the RFC 9001 hello asks for example.com
      routes: [{ match: "example.com", backends: [`127.0.0.1:${a.port}`] }],
      metrics: { address: "127.0.0.1:0" },
    });
    const port = proxy.port();
    const sock = sender(s);
    await send(sock, port, initial(cryptoFrame(0, hello), 7));
    await metricsUntil(proxy, (m) => sample(m, "sni_proxy_quic_flows_total") === 1);
    // a retransmission of the same connection stays in the flow
    await send(sock, port, initial(cryptoFrame(0, hello), 7));
    await sleep(200);
    let m = await scrapeMetrics(proxy);
    assert.equal(sample(m, "sni_proxy_quic_flows_total"), 1, m);
    // the same address:port, another Destination Connection ID: another connection
    await send(sock, port, initial(cryptoFrame(0, hello), 8));
    m = await metricsUntil(proxy, (m) => sample(m, "sni_proxy_quic_flows_total") === 2);
    assert.equal(
      sample(m, "sni_proxy_quic_flows_closed_total", '{reason="new_connection"}'),
      1,
      m,
    );
    assert.equal(sample(m, "sni_proxy_quic_flows_active"), 1, m);
  },
  { ignore: !tools, timeoutMs: 30_000 },
);

e2eTest(
  "QUIC: limits.per_source applies to new flows (source_rate); other sources are served",
  async (s) => {
    const proxy = await proxyWithBackend(s, {
      limits: { per_source: { new_per_second: 0.5, burst: 2 } },
    });
    const port = proxy.port();
    const half = cryptoFrame(0, hello.subarray(0, 100));
    for (let i = 0; i < 4; i++) await send(sender(s, "127.0.0.9"), port, initial(half, 400 + i));
    const m = await metricsUntil(proxy, (m) => dropped(m, "source_rate") >= 2);
    assert.equal(dropped(m, "source_rate"), 2, m);
    assert.equal(sample(m, "sni_proxy_quic_flows_active"), 2, m);
    // another address is not limited
    await stillServes(proxy);
  },
  { ignore: !tools, timeoutMs: 30_000 },
);

e2eTest(
  "QUIC bad input: 3000 random and mutated datagrams leave the proxy serving, within its bounds",
  async (s) => {
    const proxy = await proxyWithBackend(s, { quic: { max_pending_flows: 32 } });
    const port = proxy.port();
    const socks = Array.from({ length: 20 }, (_, i) => sender(s, `127.0.0.${20 + i}`));
    const good = initial(cryptoFrame(0, hello), 9);
    let sent = 0;
    for (let i = 0; i < 3000; i++) {
      let d: Uint8Array;
      if (i % 3 === 0) {
        d = crypto.getRandomValues(new Uint8Array(Math.floor(Math.random() * 1500)));
      } else {
        // a real Initial with a few bytes changed, or cut
        d = good.slice(0, i % 5 === 0 ? Math.floor(Math.random() * good.length) : good.length);
        for (let k = 0; k < 3; k++) d[Math.floor(Math.random() * d.length)] ^= 1 + (i & 0x7f);
      }
      await send(socks[i % socks.length], port, d);
      sent++;
    }
    const m = await metricsUntil(proxy, (m) => {
      const drops = m.split("\n").filter((l) => l.startsWith("sni_proxy_quic_dropped_total{"))
        .reduce((n, l) => n + Number(l.split(" ")[1]), 0);
      return drops >= sent * 0.9;
    }, 10_000);
    assert.ok(sample(m, "sni_proxy_quic_flows_active") <= 32 + 20, m);
    await stillServes(proxy);
  },
  { ignore: !tools, timeoutMs: 60_000 },
);
