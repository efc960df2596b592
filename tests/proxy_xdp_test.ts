/**
 * The proxy's own XDP filter (ebpf.xdp from config), end to end in two network namespaces the
 * test creates: a denied source cannot even connect (dropped before the stack, counted), an
 * allowed one is proxied, and SIGHUP swaps the lists in place; a source that keeps sending bad
 * hellos or exceeding its per-source limits is blocked by XDP (ebpf.xdp.block) until the block
 * expires.
 */
import assert from "node:assert/strict";
import { type ProxyProcess, Scope, sleep, startProxy, testCerts } from "./harness/mod.ts";

const isRoot = Deno.uid() === 0;
if (!isRoot) {
  console.warn("!!! SKIPPING tests/proxy_xdp_test.ts: XDP and network namespaces need root");
}

const NS_P = `snipx-p-${Deno.pid}`;
const NS_C = `snipx-c-${Deno.pid}`;

async function ip(...args: string[]): Promise<void> {
  const out = await new Deno.Command("ip", { args, stdin: "null" }).output();
  if (!out.success) {
    throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/** curl from `source` in the client namespace: https through the proxy, or plain http to its
 * TLS port (a bad ClientHello). */
async function curlFrom(
  source: string,
  scheme: "https" | "http" = "https",
): Promise<{ code: number; body: string }> {
  const c = await testCerts();
  const out = await new Deno.Command("ip", {
    args: [
      "netns",
      "exec",
      NS_C,
      "curl",
      "-sS",
      "--max-time",
      "2",
      "--interface",
      source,
      "--cacert",
      c.caFile,
      "--resolve",
      "a.test:8443:10.198.0.1",
      `${scheme}://a.test:8443/`,
    ],
    stdin: "null",
  }).output();
  return { code: out.code, body: new TextDecoder().decode(out.stdout) };
}

async function metrics(path = "/metrics"): Promise<string> {
  const out = await new Deno.Command("ip", {
    args: ["netns", "exec", NS_P, "curl", "-s", `http://10.198.0.1:9090${path}`],
  }).output();
  return new TextDecoder().decode(out.stdout);
}

/** A sample of /metrics, NaN when absent. */
const metric = (text: string, series: string) =>
  Number(
    new RegExp(`^sni_proxy_${series.replace(/[{}."]/g, "\\$&")} (\\d+)$`, "m").exec(text)?.[1] ??
      NaN,
  );
const dropped = (text: string) => metric(text, "kernel_xdp_dropped_deny_total");

/** Runs `sni-proxy ARGS` (deno run main.ts), in the proxy's namespace when `inProxyNs`. */
function sniProxy(args: string[], inProxyNs = false): Promise<Deno.CommandOutput> {
  const main = new URL("../main.ts", import.meta.url).pathname;
  const cmd = [Deno.execPath(), "run", "-A", "--unstable-net", main, ...args];
  const [c, ...rest] = inProxyNs ? ["ip", "netns", "exec", NS_P, ...cmd] : cmd;
  return new Deno.Command(c, { args: rest, stdin: "null" }).output();
}

/** `sni-proxy stats` in the proxy's namespace (it reads /stats); its table. */
async function statsCli(configPath: string): Promise<string> {
  const cli = await sniProxy(["stats", "--config", configPath], true);
  assert.ok(cli.success, new TextDecoder().decode(cli.stderr));
  return new TextDecoder().decode(cli.stdout);
}

/**
 * Two namespaces joined by a veth pair (proxy side 10.198.0.1, client side .2 and .3), a TLS
 * backend on 10.198.0.1:9443 answering "xdp-ok", and the proxy on 10.198.0.1:8443 (metrics on
 * :9090) with XDP on sxp-p and the `acl` / `ebpf.xdp` given; everything is removed afterwards.
 */
async function withNamespaces(
  extra: {
    acl?: Record<string, unknown>;
    xdp?: Record<string, unknown>;
    /** More top-level config fields (workers, admin). */
    config?: Record<string, unknown>;
  },
  f: (proxy: Awaited<ReturnType<typeof startProxy>>) => Promise<void>,
): Promise<void> {
  await ip("netns", "del", NS_P).catch(() => {});
  await ip("netns", "del", NS_C).catch(() => {});
  await ip("netns", "add", NS_P);
  await ip("netns", "add", NS_C);
  let backend: Deno.ChildProcess | null = null;
  let proxy: ProxyProcess | null = null;
  await using scope = new Scope();
  try {
    await ip("link", "add", "sxp-p", "netns", NS_P, "type", "veth", "peer", "sxp-c", "netns", NS_C);
    await ip("-n", NS_P, "addr", "add", "10.198.0.1/24", "dev", "sxp-p");
    await ip("-n", NS_C, "addr", "add", "10.198.0.2/24", "dev", "sxp-c");
    await ip("-n", NS_C, "addr", "add", "10.198.0.3/24", "dev", "sxp-c");
    for (const [ns, dev] of [[NS_P, "sxp-p"], [NS_C, "sxp-c"]]) {
      await ip("-n", ns, "link", "set", dev, "up");
      await ip("-n", ns, "link", "set", "lo", "up");
    }
    // the TLS backend lives in the proxy's namespace
    const c = await testCerts();
    const script = await Deno.makeTempFile({ suffix: ".ts" });
    await Deno.writeTextFile(
      script,
      `Deno.serve({ hostname: "10.198.0.1", port: 9443, cert: ${JSON.stringify(c.certPem)}, ` +
        `key: ${JSON.stringify(c.keyPem)}, onListen() { console.log("ready"); } }, ` +
        `() => new Response("xdp-ok"));`,
    );
    backend = new Deno.Command("ip", {
      args: ["netns", "exec", NS_P, Deno.execPath(), "run", "-A", script],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const reader = backend.stdout.getReader();
    await reader.read(); // "ready"
    reader.releaseLock();
    proxy = await startProxy(scope, {
      listeners: [{ address: "10.198.0.1:8443" }],
      routes: [{ match: "a.test", backends: ["10.198.0.1:9443"] }],
      acl: extra.acl ?? {},
      metrics: { address: "10.198.0.1:9090" },
      ebpf: {
        enabled: true,
        sockmap_enabled: false,
        xdp: { interfaces: ["sxp-p"], mode: "auto", ...extra.xdp },
      },
      ...extra.config,
    }, { wrapper: ["ip", "netns", "exec", NS_P] });
    await proxy.waitForLog("XDP source filter on sxp-p");
    await f(proxy);
  } finally {
    if (proxy) assert.equal(await proxy.stop(), 0, proxy.stderr());
    if (backend) {
      backend.kill("SIGTERM");
      await backend.status;
    }
    await ip("netns", "del", NS_P).catch(() => {});
    await ip("netns", "del", NS_C).catch(() => {});
  }
}

Deno.test({
  name: "ebpf.xdp drops denied sources before the stack, proxies the others, and reloads in place",
  ignore: !isRoot,
  fn: () =>
    withNamespaces({ acl: { deny: ["10.198.0.3/32"] } }, async (proxy) => {
      assert.equal((await curlFrom("10.198.0.2")).body, "xdp-ok", "an allowed source is proxied");
      const before = dropped(await metrics());
      const denied = await curlFrom("10.198.0.3");
      assert.equal(denied.code, 28, "a denied source cannot even connect (curl times out)");
      const after = dropped(await metrics());
      assert.ok(after > before, `XDP drop counter rose: ${before} → ${after}`);
      const entries = await proxy.access();
      assert.ok(
        entries.every((e) => !String(e.client).startsWith("10.198.0.3:")),
        "the denied source never reached the proxy process",
      );

      // reload: deny .2 instead of .3, in place
      const cfg = JSON.parse(await Deno.readTextFile(proxy.configPath));
      cfg.acl.deny = ["10.198.0.2/32"];
      await Deno.writeTextFile(proxy.configPath, JSON.stringify(cfg));
      proxy.signal("SIGHUP");
      await proxy.waitForLog("reloaded");
      await sleep(100);
      assert.equal((await curlFrom("10.198.0.3")).body, "xdp-ok", "now allowed");
      assert.equal((await curlFrom("10.198.0.2")).code, 28, "now dropped");
    }),
});

Deno.test({
  name:
    "ebpf.xdp.block drops a source that keeps sending bad hellos or exceeding its limits, until expiry",
  ignore: !isRoot,
  fn: () =>
    withNamespaces({
      xdp: { block: { after: 3, window_ms: 10_000, block_ms: 6_000 } },
      config: { admin: { socket: `/tmp/snipx-admin-${Deno.pid}.sock` } },
    }, async (proxy) => {
      const fromBad = async () =>
        (await proxy.access()).filter((e) => String(e.client).startsWith("10.198.0.3:")).length;
      assert.equal((await curlFrom("10.198.0.3")).body, "xdp-ok", "well behaved at first");
      // plain HTTP to the TLS port: three bad ClientHellos
      for (let i = 0; i < 3; i++) {
        assert.notEqual((await curlFrom("10.198.0.3", "http")).code, 0, "a bad hello is refused");
      }
      await proxy.waitForLog("10.198.0.3 blocked in XDP for 6000 ms: 3 offences");
      const blockedAt = Date.now();
      // the access log is written asynchronously: wait for the good and the three bad ones
      for (let i = 0; i < 50 && await fromBad() < 4; i++) await sleep(100);
      const seen = await fromBad();
      assert.equal(seen, 4, "four connections from 10.198.0.3 logged before the block");
      const before = await metrics();
      assert.equal(metric(before, "xdp_blocked_total"), 1);
      assert.equal(metric(before, "xdp_blocked_sources"), 1);
      assert.ok(
        metric(before, 'xdp_blocked_seconds{source="10.198.0.3"}') > 0,
        `the blocked set in /metrics:\n${before}`,
      );
      // the stats CLI (it reads /stats)
      const table = await statsCli(proxy.configPath);
      assert.match(table, /^xdp_block\.blocked_sources +1$/m, table);
      assert.match(table, /^xdp_block\.blocked\.10\.198\.0\.3\.seconds_left +[1-6]$/m, table);

      assert.equal((await curlFrom("10.198.0.3")).code, 28, "blocked: cannot even connect");
      const after = await metrics();
      const [b, a] = [before, after].map((t) => metric(t, "kernel_xdp_dropped_blocked_total"));
      assert.ok(a > b, `XDP block drop counter rose: ${b} → ${a}`);
      assert.ok(
        JSON.parse(await metrics("/stats")).xdp_block.blocked["10.198.0.3"].hits > 0,
        "the entry counts its drops",
      );
      assert.equal(await fromBad(), seen, "the proxy never saw the blocked connection");
      assert.equal((await curlFrom("10.198.0.2")).body, "xdp-ok", "other sources pass");

      // expiry lifts it (the sweep deletes the entry within a second)
      await sleep(Math.max(0, blockedAt + 6_000 - Date.now()));
      await proxy.waitForLog("10.198.0.3 unblocked in XDP: its block expired");
      assert.equal((await curlFrom("10.198.0.3")).body, "xdp-ok", "let through after expiry");
      const end = await metrics();
      assert.equal(metric(end, "xdp_blocked_sources"), 0);
      assert.equal(metric(end, "xdp_blocked_total"), 1);

      // per-source limit refusals count too (limits.per_source reloads; the set is kept)
      const cfg = JSON.parse(await Deno.readTextFile(proxy.configPath));
      cfg.limits = { per_source: { new_per_second: 0.1, burst: 1 } };
      await Deno.writeTextFile(proxy.configPath, JSON.stringify(cfg));
      proxy.signal("SIGHUP");
      await proxy.waitForLog("reloaded");
      for (let i = 0; i < 4; i++) await curlFrom("10.198.0.3"); // one served, three refused
      await proxy.waitForLog(
        "10.198.0.3 blocked in XDP for 6000 ms: 3 offences within 10000 ms " +
          "(last: source_rate)",
      );
      assert.equal((await curlFrom("10.198.0.3")).code, 28, "blocked again");
      assert.equal(metric(await metrics(), "xdp_blocked_total"), 2);

      // ctl unblock lifts it before its expiry: packets reach the proxy again (whose rate limit
      // refuses them in userspace)
      const lifted = await sniProxy(["ctl", "--config", proxy.configPath, "unblock", "10.198.0.3"]);
      assert.ok(lifted.success, new TextDecoder().decode(lifted.stderr));
      await proxy.waitForLog("admin: 10.198.0.3 unblocked in XDP by the admin API");
      assert.notEqual((await curlFrom("10.198.0.3")).code, 28, "not dropped by XDP any more");
      assert.equal(metric(await metrics(), "xdp_blocked_sources"), 0);
    }),
});

Deno.test({
  name: "ebpf.xdp.block with workers: 2: offences from both workers add up in the supervisor, " +
    "which blocks; ctl unblock lifts it; SIGHUP keeps it; expiry lifts it",
  ignore: !isRoot,
  fn: async () => {
    const dir = await Deno.makeTempDir({ prefix: "sni-xdp-workers-" });
    const socket = `${dir}/admin.sock`;
    // 12 offences: 11 spread over two workers by SO_REUSEPORT leave both below it (all 11 on
    // one worker has a chance of 1 in 1024), and neither worker alone could have counted 12
    const after = 12;
    try {
      await withNamespaces({
        xdp: { block: { after, window_ms: 30_000, block_ms: 10_000 } },
        config: { workers: 2, admin: { socket } },
      }, async (proxy) => {
        await proxy.waitForLog(`XDP blocks misbehaving sources: ${after} offences`);
        await proxy.waitForLog(`admin API on ${socket}`);
        assert.doesNotMatch(proxy.stderr(), /not enforced/, "no warning: workers report");
        const fromBad = async () =>
          (await proxy.access()).filter((e) => String(e.client).startsWith("10.198.0.3:"));
        /** Waits until the access log holds `n` entries from 10.198.0.3 (flushed every 500 ms). */
        const loggedFromBad = async (n: number) => {
          for (let i = 0; i < 50 && (await fromBad()).length < n; i++) await sleep(100);
          const entries = await fromBad();
          assert.equal(entries.length, n, "every connection from 10.198.0.3 so far is logged");
          return entries;
        };
        const stats = async () => JSON.parse(await metrics("/stats"));
        const badHellos = async (n: number) => {
          for (let i = 0; i < n; i++) {
            assert.notEqual((await curlFrom("10.198.0.3", "http")).code, 0, "bad hello refused");
          }
        };

        assert.equal((await curlFrom("10.198.0.3")).body, "xdp-ok", "well behaved at first");
        let mark = proxy.stderr().length;
        await badHellos(after - 1);
        // the workers' batches reach the supervisor within 50 ms
        for (let i = 0; i < 50 && (await stats()).xdp_block.offences_total < after - 1; i++) {
          await sleep(20);
        }
        assert.equal((await stats()).xdp_block.offences_total, after - 1, "all reported");
        assert.equal((await stats()).xdp_block.blocked_sources, 0, "one short of the threshold");
        assert.doesNotMatch(proxy.stderr().slice(mark), /blocked in XDP/);
        const bad = (await loggedFromBad(after)).filter((e) => e.sni === null);
        assert.equal(bad.length, after - 1, "the bad hellos: no SNI read");
        const byWorker = Object.groupBy(bad, (e) => String(e.worker));
        assert.deepEqual(
          Object.keys(byWorker).sort(),
          ["1", "2"],
          `SO_REUSEPORT spread the bad hellos over both workers: ${JSON.stringify(bad)}`,
        );

        await badHellos(1);
        await proxy.waitForLog(
          `10.198.0.3 blocked in XDP for 10000 ms: ${after} offences within 30000 ms`,
          5_000,
          mark,
        );
        const seen = (await loggedFromBad(after + 1)).length;
        const before = await metrics();
        assert.equal(metric(before, "xdp_blocked_total"), 1);
        assert.equal(metric(before, "xdp_blocked_sources"), 1);
        assert.equal(metric(before, "xdp_offences_total"), after);
        assert.equal(metric(before, "xdp_offences_dropped_total"), 0, "nothing lost on the way");
        assert.ok(
          metric(before, 'xdp_blocked_seconds{source="10.198.0.3"}') > 0,
          `the blocked set in the supervisor's /metrics:\n${before}`,
        );
        const table = await statsCli(proxy.configPath);
        assert.match(table, /^xdp_block\.blocked_sources +1$/m, table);
        assert.match(
          table,
          /^xdp_block\.blocked\.10\.198\.0\.3\.seconds_left +([1-9]|10)$/m,
          table,
        );

        assert.equal((await curlFrom("10.198.0.3")).code, 28, "blocked: cannot even connect");
        const dropped = metric(await metrics(), "kernel_xdp_dropped_blocked_total");
        const was = metric(before, "kernel_xdp_dropped_blocked_total");
        assert.ok(dropped > was, `XDP block drop counter rose: ${was} → ${dropped}`);
        await sleep(600); // an access line the proxy would have written is flushed by now
        assert.equal((await fromBad()).length, seen, "no worker saw the blocked connections");
        for (let i = 0; i < 4; i++) {
          assert.equal((await curlFrom("10.198.0.2")).body, "xdp-ok", "other sources pass");
        }

        // the operator lifts it early, through the supervisor's admin socket
        const unblock = () =>
          sniProxy(["ctl", "--config", proxy.configPath, "unblock", "10.198.0.3"]);
        const lifted = await unblock();
        const said = new TextDecoder().decode(lifted.stdout);
        assert.ok(lifted.success, new TextDecoder().decode(lifted.stderr));
        assert.match(said, /^10\.198\.0\.3 unblocked in XDP by the admin API/);
        await proxy.waitForLog("admin: 10.198.0.3 unblocked in XDP by the admin API");
        assert.equal((await curlFrom("10.198.0.3")).body, "xdp-ok", "let through at once");
        assert.equal(metric(await metrics(), "xdp_blocked_sources"), 0);
        const again = await unblock();
        assert.equal(again.code, 1);
        assert.match(
          new TextDecoder().decode(again.stderr),
          /10\.198\.0\.3 is not blocked in XDP \(blocked now: none\)/,
        );

        // its count started over: a full round of bad hellos blocks it again
        mark = proxy.stderr().length;
        await badHellos(after);
        await proxy.waitForLog(`10.198.0.3 blocked in XDP for 10000 ms: ${after}`, 5_000, mark);
        const blockedAt = Date.now();
        assert.equal(metric(await metrics(), "xdp_blocked_total"), 2);

        // SIGHUP reaches the workers and keeps the block set (per-source limits from now on)
        const cfg = JSON.parse(await Deno.readTextFile(proxy.configPath));
        cfg.limits = { per_source: { new_per_second: 0.1, burst: 1 } };
        await Deno.writeTextFile(proxy.configPath, JSON.stringify(cfg));
        mark = proxy.stderr().length;
        proxy.signal("SIGHUP");
        await proxy.waitForLog("passed to 2 workers", 5_000, mark);
        await proxy.waitForLog(/worker1.*reloaded/, 5_000, mark);
        await proxy.waitForLog(/worker2.*reloaded/, 5_000, mark);
        assert.equal((await curlFrom("10.198.0.3")).code, 28, "still blocked after the reload");
        assert.equal(metric(await metrics(), "xdp_blocked_sources"), 1);

        // expiry lifts it (the supervisor's sweep deletes the entry within a second)
        await sleep(Math.max(0, blockedAt + 10_000 - Date.now()));
        await proxy.waitForLog("10.198.0.3 unblocked in XDP: its block expired", 5_000, mark);
        assert.equal((await curlFrom("10.198.0.3")).body, "xdp-ok", "let through after expiry");
        assert.equal(metric(await metrics(), "xdp_blocked_sources"), 0);

        // per-source limit refusals in both workers count too
        mark = proxy.stderr().length;
        const blockedRe =
          /10\.198\.0\.3 blocked in XDP for 10000 ms: \d+ offences within 30000 ms \(last: source_rate\)/;
        for (let i = 0; i < after + 4 && !blockedRe.test(proxy.stderr().slice(mark)); i++) {
          await curlFrom("10.198.0.3");
          await sleep(20);
        }
        await proxy.waitForLog(blockedRe, 5_000, mark);
        assert.equal((await curlFrom("10.198.0.3")).code, 28, "blocked again");
        const end = await metrics();
        assert.equal(metric(end, "xdp_blocked_total"), 3);
        assert.equal(metric(end, "xdp_offences_dropped_total"), 0);
      });
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
