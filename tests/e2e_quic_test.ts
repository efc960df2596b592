/**
 * End to end, QUIC listeners: real HTTP/3 clients (gtlsclient) through the proxy to real
 * HTTP/3 servers (gtlsserver) chosen by the SNI of the client's Initials, every byte compared;
 * many flows at once; a flow's idle end (metrics, admin view, access log); a client that
 * rebinds its port mid-download, with one worker and with two (steered by connection ID).
 */
import assert from "node:assert/strict";
import {
  assertPromtoolClean,
  cpuTimeMs,
  curl,
  e2eTest,
  ensureBpfObject,
  identityBackend,
  type ProxyProcess,
  pseudoRandomBytes,
  runCli,
  scrapeMetrics,
  sha256,
  sleep,
  startProxy,
  unusedPort,
} from "./harness/mod.ts";
import { haveCommand } from "./harness/quic_clients.ts";
import {
  chromiumDumpDom,
  quicBackend,
  quicDownloads,
  quicGet,
  rebindingShim,
  sample,
} from "./harness/quic.ts";
import type { Scope } from "./harness/scope.ts";

const tools = await haveCommand("gtlsclient") && await haveCommand("gtlsserver") &&
  Deno.uid() === 0;
if (!tools) console.warn("e2e_quic_test: needs root, gtlsclient and gtlsserver: skipped");

/** Two HTTP/3 backends with their own content, a QUIC listener routing a.test and b.test. */
async function twoBackends(s: Scope, extra: Record<string, unknown> = {}) {
  const bodyA = pseudoRandomBytes(1 << 20, 1);
  const bodyB = pseudoRandomBytes(1 << 20, 2);
  const a = await quicBackend(s, { who: "backend A\n", "f.bin": bodyA });
  const b = await quicBackend(s, { who: "backend B\n", "f.bin": bodyB });
  const proxy = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
    routes: [
      { match: "a.test", backends: [`127.0.0.1:${a.port}`] },
      { match: "b.test", alpn: ["h3"], backends: [`127.0.0.1:${b.port}`] },
    ],
    metrics: { address: "127.0.0.1:0" },
    ...extra,
  });
  return { a, b, bodyA, bodyB, proxy };
}

for (
  const [workers, mode] of [[1, "userspace"], [2, "userspace"], [1, "kernel"], [
    2,
    "kernel",
  ]] as const
) {
  e2eTest(
    `QUIC (workers ${workers}, ${mode} forwarding): downloads by SNI reach the backend of the ` +
      "name, byte for byte",
    async (s) => {
      const kernel = mode === "kernel";
      const { a, b, bodyA, bodyB, proxy } = await twoBackends(s, {
        workers,
        ...(kernel ? { ebpf: { enabled: true, quic: { interfaces: ["lo"] } } } : {}),
      });
      if (kernel) assert.doesNotMatch(proxy.stderr(), /QUIC kernel forwarding unavailable/);
      assert.equal(proxy.listeners[0].protocol, "quic");
      const port = proxy.port();
      const got = await quicDownloads(port, [
        { name: "a.test", path: "who" },
        { name: "b.test", path: "who" },
        { name: "a.test", path: "f.bin" },
        { name: "b.test", path: "f.bin" },
      ]);
      assert.deepEqual(got.map((g) => g.code), [0, 0, 0, 0]);
      const text = (g: { body: Uint8Array | null }) => new TextDecoder().decode(g.body!);
      assert.equal(text(got[0]), "backend A\n");
      assert.equal(text(got[1]), "backend B\n");
      assert.equal(sha256(got[2].body!), sha256(bodyA));
      assert.equal(sha256(got[3].body!), sha256(bodyB));
      const m = await scrapeMetrics(proxy);
      assert.equal(sample(m, "sni_proxy_quic_flows_total"), 4, m);
      await assertPromtoolClean(m);
      if (kernel) {
        // the routed flows' datagrams went by the kernel, not through the process
        assert.ok(sample(m, "sni_proxy_kernel_quic_to_client_packets_total") > 1000, m);
      } else {
        assert.ok(sample(m, "sni_proxy_quic_bytes_total", '{direction="down"}') > 2 << 20);
      }
      // the flows end when idle; each is logged once with its name, route and backend
      await proxy.stop();
      const entries = (await proxy.access()).filter((e) => e.protocol === "quic");
      assert.equal(entries.length, 4, JSON.stringify(entries));
      for (const e of entries) {
        const backend = e.sni === "a.test" ? a.port : b.port;
        assert.equal(e.backend, `127.0.0.1:${backend}`);
        assert.equal(e.mode, mode);
        assert.ok(e.ja4?.startsWith("q"), e.ja4);
        assert.deepEqual(e.alpn, ["h3"]);
        assert.ok((e.datagrams_down ?? 0) > 0 && (e.datagrams_up ?? 0) > 0);
      }
      const big = entries.filter((e) => e.bytes_down > 1 << 20);
      assert.equal(big.length, 2);
    },
    { ignore: !tools, timeoutMs: 60_000 },
  );
}

e2eTest(
  "QUIC: a dual-stack listener ([::]) serves IPv4 and IPv6 clients beside a TLS listener on its port",
  async (s) => {
    const a = await quicBackend(s, { who: "backend A\n" });
    const tls = await identityBackend(s, "tls-backend");
    const port = unusedPort();
    const proxy = await startProxy(s, {
      listeners: [
        { address: `[::]:${port}`, protocol: "tls" },
        { address: `[::]:${port}`, protocol: "quic" },
      ],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
      default_backend: `127.0.0.1:${tls.port}`,
    });
    assert.deepEqual(proxy.listeners.map((l) => [l.port, l.protocol]), [
      [port, "tls"],
      [port, "quic"],
    ]);
    for (const ip of ["127.0.0.1", "::1"]) {
      const [got] = await quicDownloads(port, [{ name: "a.test", path: "who" }], 20, ip);
      assert.equal(new TextDecoder().decode(got.body ?? new Uint8Array()), "backend A\n", ip);
    }
    assert.equal((await curl(port, "other.test")).body, "tls-backend", "TCP on the same port");
    await proxy.stop();
    const clients = (await proxy.access()).filter((e) => e.protocol === "quic").map((e) =>
      e.client
    );
    assert.ok(clients.some((c) => c.startsWith("[::ffff:127.0.0.1]:")), clients.join(" "));
    assert.ok(clients.some((c) => c.startsWith("[::1]:")), clients.join(" "));
  },
  { ignore: !tools, timeoutMs: 40_000 },
);

e2eTest(
  "QUIC: a name no route takes is refused (no_route, logged once) and the client gives up",
  async (s) => {
    const { proxy } = await twoBackends(s);
    const got = await quicGet(proxy.port(), {
      name: "other.test",
      path: "who",
      args: ["--handshake-timeout=2s"],
    }, 8);
    assert.ok(!got.body?.length, "nothing downloaded");
    const e = await proxy.waitAccess((e) => e.sni === "other.test");
    assert.equal(e.close_reason, "no_route");
    assert.equal(e.backend, null);
    const m = await scrapeMetrics(proxy);
    assert.ok(sample(m, "sni_proxy_quic_dropped_total", '{reason="refused_flow"}') >= 1, m);
    assert.equal((await proxy.access()).filter((x) => x.sni === "other.test").length, 1);
  },
  { ignore: !tools, timeoutMs: 30_000 },
);

/** The flows the admin API lists. */
async function adminFlows(p: ProxyProcess): Promise<Record<string, unknown>[]> {
  const r = await runCli(["ctl", "--config", p.configPath, "--json", "sessions"]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout).sessions;
}

e2eTest(
  "QUIC: a flow lives in the admin view and the metrics until it idles out, then is gone",
  async (s) => {
    const dir = await Deno.makeTempDir();
    s.defer(() => Deno.remove(dir, { recursive: true }));
    const { a, proxy } = await twoBackends(s, {
      quic: { idle_ms: 1500 },
      admin: { socket: `${dir}/admin.sock` },
    });
    const got = await quicGet(proxy.port(), { name: "a.test", path: "who" });
    assert.equal(got.code, 0);
    const listed = await adminFlows(proxy);
    assert.equal(listed.length, 1, JSON.stringify(listed));
    assert.equal(listed[0].sni, "a.test");
    assert.equal(listed[0].backend, `127.0.0.1:${a.port}`);
    let m = await scrapeMetrics(proxy);
    assert.equal(sample(m, "sni_proxy_quic_flows_active"), 1, m);
    const e = await proxy.waitAccess((e) => e.protocol === "quic", 5000);
    assert.equal(e.close_reason, "idle_timeout");
    assert.ok(e.duration_ms >= 1500 && e.duration_ms < 4000, `${e.duration_ms}`);
    m = await scrapeMetrics(proxy);
    assert.equal(sample(m, "sni_proxy_quic_flows_active"), 0, m);
    assert.equal(sample(m, "sni_proxy_quic_flows_closed_total", '{reason="idle_timeout"}'), 1);
    assert.deepEqual(await adminFlows(proxy), []);
  },
  { ignore: !tools, timeoutMs: 30_000 },
);

e2eTest(
  "QUIC: a client that rebinds its port mid-download keeps its flow and its download",
  async (s) => {
    const big = pseudoRandomBytes(16 << 20, 3);
    const a = await quicBackend(s, { "big.bin": big });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
      metrics: { address: "127.0.0.1:0" },
    });
    // a NAT in front of the client gives it a new outside port after 300 datagrams
    const direct = performance.now();
    assert.equal(
      sha256((await quicGet(a.port, { name: "a.test", path: "big.bin" })).body!),
      sha256(big),
    );
    const directMs = performance.now() - direct;
    const cpu0 = await cpuTimeMs(proxy.pid);
    const t0 = performance.now();
    const plain = await quicGet(proxy.port(), { name: "a.test", path: "big.bin" });
    const wallMs = performance.now() - t0;
    console.log(
      `userspace: 16 MiB in ${wallMs.toFixed(0)} ms (direct ${directMs.toFixed(0)} ms), ` +
        `proxy CPU ${await cpuTimeMs(proxy.pid) - cpu0} ms`,
    );
    assert.equal(sha256(plain.body!), sha256(big));
    const nat = rebindingShim(s, proxy.port(), 300);
    const got = await quicGet(nat.port, { name: "a.test", path: "big.bin" });
    assert.equal(got.code, 0);
    assert.equal(sha256(got.body!), sha256(big));
    assert.ok(nat.afterSwitch() > 100, `${nat.afterSwitch()} datagrams after the switch`);
    const m = await scrapeMetrics(proxy);
    assert.ok(sample(m, "sni_proxy_quic_rebinds_total") >= 1, m);
    assert.equal(sample(m, "sni_proxy_quic_flows_total"), 2, m);
    await proxy.stop();
    const entries = (await proxy.access()).filter((e) =>
      e.protocol === "quic" && e.client.endsWith(`:${nat.outside[1]}`)
    );
    assert.equal(entries.length, 1, JSON.stringify(entries));
    assert.ok(entries[0].bytes_down >= 16 << 20);
    assert.equal(entries[0].client, `127.0.0.1:${nat.outside[1]}`, "logged at its last address");
  },
  { ignore: !tools, timeoutMs: 60_000 },
);

// workers > 1 steer by connection ID with the program of bpf/quic_reuseport.bpf.c (built here)
const steerable = tools && (await ensureBpfObject("quic_reuseport")) === null;

e2eTest(
  "QUIC (workers 2): a client that rebinds its port again and again keeps its download, " +
    "whichever worker its new ports hash to",
  async (s) => {
    const big = pseudoRandomBytes(16 << 20, 4);
    const a = await quicBackend(s, { "big.bin": big });
    const proxy = await startProxy(s, {
      workers: 2,
      listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
      metrics: { address: "127.0.0.1:0" },
    });
    // the kernel's hash sends each new port to either worker: over 8 switches the flow's
    // worker is left at least once but for a chance of 1 in 256, and that worker is then
    // reached by the flow's connection ID alone
    const switches = 8;
    const nat = rebindingShim(s, proxy.port(), 150, switches);
    const got = await quicGet(nat.port, { name: "a.test", path: "big.bin" }, 60);
    assert.equal(got.code, 0, `download failed after ${nat.switched()} switches`);
    assert.equal(sha256(got.body!), sha256(big));
    assert.equal(nat.switched(), switches, `${nat.afterSwitch()} datagrams after the first`);
    const m = await scrapeMetrics(proxy);
    // more only when a datagram from an older port overtook one from the next (it moves back)
    assert.ok(sample(m, "sni_proxy_quic_rebinds_total") >= switches, m);
    assert.equal(sample(m, "sni_proxy_quic_dropped_total", '{reason="unknown_flow"}'), 0, m);
    assert.ok(sample(m, "sni_proxy_kernel_quic_steer_steered_total") > 0, m);
    assert.equal(sample(m, "sni_proxy_kernel_quic_steer_map_full_total"), 0, m);
    await proxy.stop();
    const entries = (await proxy.access()).filter((e) => e.protocol === "quic");
    assert.equal(entries.length, 1, JSON.stringify(entries));
    assert.equal(entries[0].client, `127.0.0.1:${nat.outside[switches]}`, "at its last address");
    assert.ok(entries[0].bytes_down >= 16 << 20);
  },
  { ignore: !steerable, timeoutMs: 90_000 },
);

e2eTest(
  "QUIC (workers 2) without BPF (nobody): one warning that a client that rebinds may lose its " +
    "flow, and it serves",
  async (s) => {
    const a = await quicBackend(s, { who: "backend A\n" });
    const proxy = await startProxy(s, {
      workers: 2,
      listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
    }, {
      wrapper: ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"],
      uid: 65534,
    });
    const got = await quicGet(proxy.port(), { name: "a.test", path: "who" });
    assert.equal(new TextDecoder().decode(got.body!), "backend A\n");
    const warned = proxy.stderr().split("\n").filter((l) => /steering by connection ID/.test(l));
    assert.equal(warned.length, 1, proxy.stderr());
    assert.match(warned[0], /may land on a worker without its flow.*not permitted/);
  },
  { ignore: !steerable, timeoutMs: 60_000 },
);

e2eTest(
  "QUIC: 200 concurrent flows with 1 MiB downloads, every byte compared",
  async (s) => {
    const { bodyA, bodyB, proxy } = await twoBackends(s, { workers: 2 });
    const n = 200;
    const t = performance.now();
    const got = await quicDownloads(
      proxy.port(),
      Array.from({ length: n }, (_, i) => ({ name: i % 2 ? "b.test" : "a.test", path: "f.bin" })),
      60,
    );
    const seconds = (performance.now() - t) / 1000;
    const failed = got.map((g, i) => [i, g.code] as const).filter(([, c]) => c !== 0);
    assert.deepEqual(failed, [], `${failed.length} of ${n} downloads failed`);
    got.forEach((g, i) => assert.equal(sha256(g.body!), sha256(i % 2 ? bodyB : bodyA)));
    console.log(`${n} concurrent 1 MiB QUIC downloads in ${seconds.toFixed(1)} s`);
    const m = await scrapeMetrics(proxy);
    assert.equal(sample(m, "sni_proxy_quic_flows_total"), n, m);
    await sleep(0);
  },
  { ignore: !tools, timeoutMs: 120_000 },
);

const chromium = tools && await haveCommand("chromium");

e2eTest(
  "QUIC: headless Chromium loads a page over HTTP/3 through the proxy from the backend of its name",
  async (s) => {
    const page = (who: string) => `<html><head></head><body><p>served by ${who}</p></body></html>`;
    const a = await quicBackend(s, { "index.html": page("backend A") });
    const b = await quicBackend(s, { "index.html": page("backend B") });
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
      routes: [
        { match: "a.test", alpn: ["h3"], backends: [`127.0.0.1:${a.port}`] },
        { match: "*.b.test", backends: [`127.0.0.1:${b.port}`] },
      ],
      metrics: { address: "127.0.0.1:0" },
    });
    const domA = await chromiumDumpDom("a.test", proxy.port());
    assert.match(domA, /served by backend A/);
    const domB = await chromiumDumpDom("x.y.b.test", proxy.port());
    assert.match(domB, /served by backend B/);
    const m = await scrapeMetrics(proxy);
    assert.ok(sample(m, "sni_proxy_quic_flows_total") >= 2, m);
    await proxy.stop();
    const entries = (await proxy.access()).filter((e) => e.protocol === "quic");
    const sni = new Set(entries.map((e) => e.sni));
    assert.ok(sni.has("a.test") && sni.has("x.y.b.test"), JSON.stringify(entries));
    for (const e of entries) {
      assert.ok(e.ja4?.startsWith("q"), e.ja4);
      assert.ok(e.alpn?.includes("h3"));
    }
  },
  { ignore: !chromium, timeoutMs: 120_000 },
);

e2eTest(
  "QUIC: ctl close ends a live flow (admin); a reload sends new flows by the new routes",
  async (s) => {
    const dir = await Deno.makeTempDir();
    s.defer(() => Deno.remove(dir, { recursive: true }));
    const { a, b, proxy } = await twoBackends(s, { admin: { socket: `${dir}/admin.sock` } });
    const who = async () =>
      new TextDecoder().decode(
        (await quicGet(proxy.port(), { name: "a.test", path: "who" })).body ?? new Uint8Array(),
      );
    assert.equal(await who(), "backend A\n");
    const r = await runCli(["ctl", "--config", proxy.configPath, "close", "--all"]);
    assert.equal(r.code, 0, r.stderr);
    const e = await proxy.waitAccess((e) => e.protocol === "quic" && e.close_reason === "admin");
    assert.equal(e.backend, `127.0.0.1:${a.port}`);
    assert.deepEqual(await adminFlows(proxy), []);
    // a.test moves to backend B
    const config = JSON.parse(await Deno.readTextFile(proxy.configPath));
    config.routes[0].backends = [`127.0.0.1:${b.port}`];
    await Deno.writeTextFile(proxy.configPath, JSON.stringify(config));
    proxy.signal("SIGHUP");
    await proxy.waitForLog("reloaded");
    assert.equal(await who(), "backend B\n");
  },
  { ignore: !tools, timeoutMs: 40_000 },
);

e2eTest(
  "QUIC: a backend's Retry passes through and the client's retried Initial stays in its flow",
  async (s) => {
    const body = pseudoRandomBytes(1 << 20, 4);
    // -V: the server validates the client's address with a Retry before anything else
    const a = await quicBackend(s, { "f.bin": body }, ["-V"]);
    const proxy = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
      metrics: { address: "127.0.0.1:0" },
    });
    const got = await quicGet(proxy.port(), { name: "a.test", path: "f.bin" });
    assert.equal(sha256(got.body!), sha256(body));
    const m = await scrapeMetrics(proxy);
    assert.equal(sample(m, "sni_proxy_quic_flows_total"), 1, m);
    assert.equal(sample(m, "sni_proxy_quic_flows_closed_total", '{reason="new_connection"}'), 0);
  },
  { ignore: !tools, timeoutMs: 30_000 },
);
