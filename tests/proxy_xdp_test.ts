/**
 * The proxy's own XDP filter (ebpf.xdp from config), end to end in two network namespaces the
 * test creates: a denied source cannot even connect (dropped before the stack, counted), an
 * allowed one is proxied, and SIGHUP swaps the lists in place.
 */
import assert from "node:assert/strict";
import { certs, sleep, startProxy } from "./proxy_harness.ts";

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

async function curlFrom(source: string): Promise<{ code: number; body: string }> {
  const c = await certs();
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
      "https://a.test:8443/",
    ],
    stdin: "null",
  }).output();
  return { code: out.code, body: new TextDecoder().decode(out.stdout) };
}

async function metrics(): Promise<string> {
  const out = await new Deno.Command("ip", {
    args: ["netns", "exec", NS_P, "curl", "-s", "http://10.198.0.1:9090/metrics"],
  }).output();
  return new TextDecoder().decode(out.stdout);
}

const dropped = (text: string) =>
  Number(/^sni_proxy_kernel_xdp_dropped_deny_total (\d+)$/m.exec(text)?.[1] ?? NaN);

Deno.test({
  name: "ebpf.xdp drops denied sources before the stack, proxies the others, and reloads in place",
  ignore: !isRoot,
  fn: async () => {
    await ip("netns", "del", NS_P).catch(() => {});
    await ip("netns", "del", NS_C).catch(() => {});
    await ip("netns", "add", NS_P);
    await ip("netns", "add", NS_C);
    let backend: Deno.ChildProcess | null = null;
    let proxy: Awaited<ReturnType<typeof startProxy>> | null = null;
    try {
      await ip(
        "link",
        "add",
        "sxp-p",
        "netns",
        NS_P,
        "type",
        "veth",
        "peer",
        "sxp-c",
        "netns",
        NS_C,
      );
      await ip("-n", NS_P, "addr", "add", "10.198.0.1/24", "dev", "sxp-p");
      await ip("-n", NS_C, "addr", "add", "10.198.0.2/24", "dev", "sxp-c");
      await ip("-n", NS_C, "addr", "add", "10.198.0.3/24", "dev", "sxp-c");
      for (const [ns, dev] of [[NS_P, "sxp-p"], [NS_C, "sxp-c"]]) {
        await ip("-n", ns, "link", "set", dev, "up");
        await ip("-n", ns, "link", "set", "lo", "up");
      }
      // the TLS backend lives in the proxy's namespace
      const c = await certs();
      const script = await Deno.makeTempFile({ suffix: ".ts" });
      await Deno.writeTextFile(
        script,
        `Deno.serve({ hostname: "10.198.0.1", port: 9443, cert: ${JSON.stringify(c.cert)}, ` +
          `key: ${JSON.stringify(c.key)}, onListen() { console.log("ready"); } }, ` +
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
      proxy = await startProxy({
        listeners: [{ address: "10.198.0.1:8443" }],
        routes: [{ match: "a.test", backends: ["10.198.0.1:9443"] }],
        acl: { deny: ["10.198.0.3/32"] },
        metrics: { address: "10.198.0.1:9090" },
        ebpf: {
          enabled: true,
          sockmap_enabled: false,
          xdp: { interfaces: ["sxp-p"], mode: "auto" },
        },
      }, { wrapper: ["ip", "netns", "exec", NS_P] });
      await proxy.waitFor("XDP source filter on sxp-p");

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
      await proxy.waitFor("reloaded");
      await sleep(100);
      assert.equal((await curlFrom("10.198.0.3")).body, "xdp-ok", "now allowed");
      assert.equal((await curlFrom("10.198.0.2")).code, 28, "now dropped");
    } finally {
      if (proxy) assert.equal(await proxy.stop(), 0, proxy.stderr());
      if (backend) {
        backend.kill("SIGTERM");
        await backend.status;
      }
      await ip("netns", "del", NS_P).catch(() => {});
      await ip("netns", "del", NS_C).catch(() => {});
    }
  },
});
