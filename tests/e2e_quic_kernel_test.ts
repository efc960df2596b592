/**
 * End to end, QUIC in kernel mode (`ebpf.quic`): the real proxy with the tc fast path on `lo`,
 * gtlsclient downloads through it from gtlsserver. Once a flow is routed its datagrams are
 * forwarded by the kernel (the process counts only the few it forwarded itself), the bytes
 * arrive intact, and a flow that idles out is gone from the process and from the kernel's map.
 * A client that rebinds keeps its flow, with one worker and with two (steered by connection ID).
 *
 * Needs root, libbpf, clang (the object), bpftool, gtlsclient and gtlsserver; elsewhere skipped
 * with the reason. Run under the kernel lock:
 * `flock /tmp/sni-kernel-tests.lock ./run test tests/e2e_quic_kernel_test.ts`.
 */
import assert from "node:assert/strict";
import {
  cpuTimeMs,
  e2eTest,
  hasCommand,
  pseudoRandomBytes,
  ROOT,
  scrapeMetrics,
  sha256,
  sleep,
  startProxy,
} from "./harness/mod.ts";
import { quicBackend, quicDownloads, quicGet, rebindingShim, sample } from "./harness/quic.ts";

async function mtime(path: string): Promise<number> {
  return await Deno.stat(path).then((s) => s.mtime?.getTime() ?? 0, () => -1);
}

async function skipReason(): Promise<string | null> {
  if (Deno.uid() !== 0) return "not root";
  for (const cmd of ["gtlsclient", "gtlsserver", "bpftool", "clang"]) {
    if (!(await hasCommand(cmd))) return `${cmd} missing`;
  }
  const src = Math.max(await mtime(`${ROOT}bpf/quic.bpf.c`), await mtime(`${ROOT}bpf/quic.h`));
  if ((await mtime(`${ROOT}bpf/quic.bpf.o`)) < src) {
    const out = await new Deno.Command("bash", { args: [`${ROOT}build.sh`, "bpf"] }).output();
    if (!out.success) return "build.sh bpf failed";
  }
  return null;
}

const SKIP = await skipReason();
if (SKIP) console.warn(`\n!!! SKIPPING tests/e2e_quic_kernel_test.ts: ${SKIP}\n`);

/** Entries of the QUIC fast path's flow maps (two per flow in the kernel). */
async function kernelFlowEntries(): Promise<number> {
  const out = await new Deno.Command("bpftool", {
    args: ["-j", "map", "dump", "name", "quic_flows"],
    stdout: "piped",
    stderr: "null",
  }).output();
  const text = new TextDecoder().decode(out.stdout).trim();
  if (!text) return 0;
  const parsed = JSON.parse(text);
  return Array.isArray(parsed) ? parsed.length : 0;
}

for (const host of ["127.0.0.1", "0.0.0.0", "[::]"]) {
  e2eTest(
    `QUIC kernel mode (listener ${host}): a routed flow's datagrams bypass the process, bytes intact; idle flows leave the kernel`,
    async (s) => {
      const big = pseudoRandomBytes(16 << 20, 9);
      const a = await quicBackend(s, { "big.bin": big });
      const proxy = await startProxy(s, {
        listeners: [{ address: `${host}:0`, protocol: "quic" }],
        routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
        metrics: { address: "127.0.0.1:0" },
        quic: { idle_ms: 2000 },
        ebpf: { enabled: true, quic: { interfaces: ["lo"] } },
      });
      assert.doesNotMatch(proxy.stderr(), /QUIC kernel forwarding unavailable/);
      const cpu0 = await cpuTimeMs(proxy.pid);
      const t0 = performance.now();
      const got = await quicGet(proxy.port(), { name: "a.test", path: "big.bin" });
      const wallMs = performance.now() - t0;
      console.log(
        `kernel mode: 16 MiB in ${wallMs.toFixed(0)} ms, proxy CPU ` +
          `${await cpuTimeMs(proxy.pid) - cpu0} ms`,
      );
      assert.equal(got.code, 0);
      assert.equal(sha256(got.body!), sha256(big));
      let m = await scrapeMetrics(proxy);
      const kernelDown = sample(m, "sni_proxy_kernel_quic_to_client_packets_total");
      const userDown = sample(m, "sni_proxy_quic_datagrams_total", '{direction="down"}');
      // 16 MiB is over 11,000 datagrams: the process saw the handshake's, the kernel the rest
      assert.ok(kernelDown > 10_000, m);
      assert.ok(userDown < kernelDown / 20, `userspace forwarded ${userDown} of them`);
      assert.equal(await kernelFlowEntries(), 2, "the flow's two entries in the kernel");
      const e = await proxy.waitAccess((e) => e.protocol === "quic", 8000);
      assert.equal(e.close_reason, "idle_timeout");
      assert.equal(e.mode, "kernel");
      assert.ok(e.bytes_down >= 16 << 20, `${e.bytes_down}`);
      assert.ok((e.datagrams_down ?? 0) > 10_000);
      assert.equal(await kernelFlowEntries(), 0, "gone from the kernel with the flow");
      m = await scrapeMetrics(proxy);
      assert.equal(sample(m, "sni_proxy_quic_flows_active"), 0, m);
      await sleep(0);
    },
    { ignore: SKIP !== null, timeoutMs: 60_000 },
  );
}

e2eTest(
  "QUIC kernel mode with workers 2: each worker's fast path forwards its own flows",
  async (s) => {
    const big = pseudoRandomBytes(4 << 20, 10);
    const a = await quicBackend(s, { "big.bin": big });
    const proxy = await startProxy(s, {
      workers: 2,
      listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
      metrics: { address: "127.0.0.1:0" },
      ebpf: { enabled: true, quic: { interfaces: ["lo"] } },
    });
    assert.doesNotMatch(proxy.stderr(), /QUIC kernel forwarding unavailable/);
    const got = await quicDownloads(
      proxy.port(),
      Array.from({ length: 8 }, () => ({ name: "a.test", path: "big.bin" })),
    );
    for (const g of got) assert.equal(sha256(g.body!), sha256(big));
    const m = await scrapeMetrics(proxy);
    const kernelDown = sample(m, "sni_proxy_kernel_quic_to_client_packets_total");
    const userDown = sample(m, "sni_proxy_quic_datagrams_total", '{direction="down"}');
    assert.ok(kernelDown > 8 * 2500, m);
    assert.ok(userDown < kernelDown / 10, `userspace forwarded ${userDown}`);
    assert.equal(sample(m, "sni_proxy_quic_flows_total"), 8, m);
  },
  { ignore: SKIP !== null, timeoutMs: 60_000 },
);

for (const workers of [1, 2]) {
  e2eTest(
    `QUIC kernel mode (workers ${workers}): a client that rebinds mid-download keeps its flow, ` +
      "forwarded by the kernel",
    async (s) => {
      const big = pseudoRandomBytes(16 << 20, 11);
      const a = await quicBackend(s, { "big.bin": big });
      const proxy = await startProxy(s, {
        workers,
        listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
        routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
        metrics: { address: "127.0.0.1:0" },
        ebpf: { enabled: true, quic: { interfaces: ["lo"] } },
      });
      // the flow's ID is learned from the backend's first datagrams before the kernel takes
      // them over: it is what the rebound client's datagrams are found (and steered) by
      const switches = 4;
      const nat = rebindingShim(s, proxy.port(), 150, switches);
      const got = await quicGet(nat.port, { name: "a.test", path: "big.bin" }, 60);
      assert.equal(sha256(got.body ?? new Uint8Array()), sha256(big));
      assert.equal(nat.switched(), switches);
      const m = await scrapeMetrics(proxy);
      assert.ok(sample(m, "sni_proxy_quic_rebinds_total") >= switches, m);
      assert.equal(sample(m, "sni_proxy_quic_dropped_total", '{reason="unknown_flow"}'), 0, m);
      const kernelDown = sample(m, "sni_proxy_kernel_quic_to_client_packets_total");
      const userDown = sample(m, "sni_proxy_quic_datagrams_total", '{direction="down"}');
      assert.ok(userDown < kernelDown / 20, `userspace forwarded ${userDown} of ${kernelDown}`);
      if (workers > 1) assert.ok(sample(m, "sni_proxy_kernel_quic_steer_steered_total") > 0, m);
    },
    { ignore: SKIP !== null, timeoutMs: 90_000 },
  );
}

e2eTest(
  "QUIC with ebpf.xdp.block: a source that keeps sending bad Initials is blocked in XDP",
  async (s) => {
    const a = await quicBackend(s, { who: "backend A\n" });
    const proxy = await startProxy(s, {
      listeners: [
        { address: "127.0.0.1:0", protocol: "tls" },
        { address: "127.0.0.1:0", protocol: "quic" },
      ],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${a.port}`] }],
      metrics: { address: "127.0.0.1:0" },
      ebpf: { enabled: true, xdp: { interfaces: ["lo"], block: { after: 3, block_ms: 5000 } } },
    });
    await proxy.waitForLog("XDP source filter on lo");
    const send = async (from: string, d: Uint8Array, n: number) => {
      const sock = Deno.listenDatagram({ transport: "udp", hostname: from, port: 0 });
      s.defer(() => sock.close());
      for (let i = 0; i < n; i++) {
        await sock.send(d, { transport: "udp", hostname: "127.0.0.1", port: proxy.port(1) });
      }
    };
    // Initials that do not decrypt: two from 127.0.0.8 (under the threshold), three from .7
    const junk = new Uint8Array(1200);
    junk.set([0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0x00]);
    await send("127.0.0.8", junk, 2);
    await send("127.0.0.7", junk, 3);
    await proxy.waitForLog("127.0.0.7 blocked in XDP");
    const m = await scrapeMetrics(proxy);
    assert.equal(sample(m, "sni_proxy_xdp_blocked_total"), 1, m);
    assert.equal(sample(m, "sni_proxy_xdp_offences_total"), 5, m);
    assert.equal(sample(m, "sni_proxy_quic_dropped_total", '{reason="undecryptable"}'), 5, m);
    // now XDP drops the blocked source's datagrams to the QUIC listener before the stack: the
    // proxy never reads them
    const blockedBefore = sample(m, "sni_proxy_kernel_xdp_dropped_blocked_total");
    await send("127.0.0.7", junk, 4);
    let after = m;
    for (let i = 0; i < 50; i++) {
      after = await scrapeMetrics(proxy);
      if (sample(after, "sni_proxy_kernel_xdp_dropped_blocked_total") >= blockedBefore + 4) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.equal(
      sample(after, "sni_proxy_kernel_xdp_dropped_blocked_total"),
      blockedBefore + 4,
      after,
    );
    assert.equal(
      sample(after, "sni_proxy_quic_dropped_total", '{reason="undecryptable"}'),
      5,
      "no datagram of the blocked source reached the proxy",
    );
    // a real client from elsewhere is served
    const got = await quicGet(proxy.port(1), { name: "a.test", path: "who" });
    assert.equal(new TextDecoder().decode(got.body ?? new Uint8Array()), "backend A\n");
  },
  { ignore: SKIP !== null, timeoutMs: 60_000 },
);
