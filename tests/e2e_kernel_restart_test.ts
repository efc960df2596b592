/**
 * A restart without downtime in kernel mode (the README's procedure, `ebpf.splice_mode` "pipe",
 * with the XDP filter denying a source on the interface): a new proxy starts next to the running
 * one, and once it is ready the old one gets SIGTERM and drains, while clients keep opening new
 * TLS connections every 20 ms, long transfers are in flight, and a denied source keeps trying to
 * connect. Nothing may be refused or reset, no byte lost, the denied source must never get
 * through, the XDP program must be the new process's once the old one is gone, and nothing may
 * stay attached once the new one stops.
 *
 * Two network namespaces the test creates, joined by a veth pair: the proxies and a TLS echo
 * backend on one side (`net.ipv4.tcp_migrate_req` on there), the clients on the other. Needs
 * root; elsewhere it skips.
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  ensureBpfObject,
  ip,
  type ProxyProcess,
  type Scope,
  sleep,
  startProxy,
  testCerts,
  traffic,
  within,
} from "./harness/mod.ts";
import { lines } from "../src/net/bytes.ts";

const SKIP = Deno.uid() !== 0
  ? "not root (network namespaces, eBPF)"
  : await ensureBpfObject("xdp");
if (SKIP) console.warn(`!!! SKIPPING tests/e2e_kernel_restart_test.ts: ${SKIP}`);

const NS_P = `snikr-p-${Deno.pid}`;
const NS_C = `snikr-c-${Deno.pid}`;
const DEV = "skr-p";
const PROXY_IP = "10.196.0.1";
const CLIENT_IP = "10.196.0.2";
const DENIED_IP = "10.196.0.3";
const PORT = 8443;
const LONG = { count: 3, bytes: 10 * 1024 * 1024, paceMs: 60 };

/** The two namespaces and their veth pair; removed when the test ends. */
async function namespaces(s: Scope): Promise<void> {
  for (const ns of [NS_P, NS_C]) {
    await ip("netns", "del", ns).catch(() => {});
    await ip("netns", "add", ns);
    s.defer(() => ip("netns", "del", ns));
  }
  await ip("link", "add", DEV, "netns", NS_P, "type", "veth", "peer", "skr-c", "netns", NS_C);
  await ip("-n", NS_P, "addr", "add", `${PROXY_IP}/24`, "dev", DEV);
  // the first address is the primary one: the clients' connections come from it
  await ip("-n", NS_C, "addr", "add", `${CLIENT_IP}/24`, "dev", "skr-c");
  await ip("-n", NS_C, "addr", "add", `${DENIED_IP}/24`, "dev", "skr-c");
  for (const [ns, dev] of [[NS_P, DEV], [NS_C, "skr-c"]]) {
    await ip("-n", ns, "link", "set", dev, "up");
    await ip("-n", ns, "link", "set", "lo", "up");
  }
  await ip("netns", "exec", NS_P, "sysctl", "-qw", "net.ipv4.tcp_migrate_req=1");
}

/** XDP program ids on the proxy's interface, as iproute2 reports them. */
async function xdpIds(): Promise<number[]> {
  const out = await new Deno.Command("ip", { args: ["-n", NS_P, "-d", "link", "show", DEV] })
    .output();
  const text = new TextDecoder().decode(out.stdout);
  return [...text.matchAll(/prog\/xdp\w* id (\d+)/g)].map((m) => Number(m[1]));
}

interface ClientsResult {
  connections: number;
  errors: string[];
  long: {
    bytes: number;
    received: number;
    sent: string;
    got: string;
    startedAt: number;
    endedAt: number;
  }[];
  probes: { dropped: number; passed: string[] };
}

/** tests/fixtures/kernel_restart_clients.ts in the client namespace; stop() for its result. */
async function clients(s: Scope, ca: string) {
  const child = new Deno.Command("ip", {
    args: [
      "netns",
      "exec",
      NS_C,
      Deno.execPath(),
      "run",
      "-A",
      new URL("./fixtures/kernel_restart_clients.ts", import.meta.url).pathname,
      JSON.stringify({ proxy: PROXY_IP, port: PORT, ca, denied: DENIED_IP, long: LONG }),
    ],
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  s.defer(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  });
  const output = lines(child.stdout);
  const line = async () => {
    const { value, done } = await output.next();
    if (done) throw new Error("the clients ended early");
    return JSON.parse(value);
  };
  await within(20_000, "the clients' start", line());
  return {
    stop: async (): Promise<ClientsResult> => {
      const w = child.stdin.getWriter();
      await w.write(new TextEncoder().encode("stop\n"));
      return await within(60_000, "the clients' result", line());
    },
  };
}

/** Starts a proxy in the proxy namespace and checks it runs in kernel mode with XDP on. */
async function kernelProxy(s: Scope, config: Record<string, unknown>): Promise<ProxyProcess> {
  const proxy = await startProxy(s, config, { wrapper: ["ip", "netns", "exec", NS_P] });
  assert.equal(proxy.ready.mode, "kernel", proxy.stderr());
  assert.match(proxy.stderr(), new RegExp(`XDP source filter on ${DEV}`), proxy.stderr());
  return proxy;
}

e2eTest(
  "restart in kernel mode with XDP: nothing refused or lost, the denied source never gets " +
    "through, the new process's XDP program stays, nothing once it stops",
  async (s) => {
    await namespaces(s);
    const certs = await testCerts();
    const backend = await traffic(s, ["ip", "netns", "exec", NS_P], ["--tls", certs.dir]);
    const config = {
      listeners: [{ address: `${PROXY_IP}:${PORT}` }],
      routes: [{ match: "a.test", backends: [`127.0.0.1:${backend.backend}`] }],
      acl: { deny: [`${DENIED_IP}/32`] },
      timeouts: { drain_ms: 30_000 },
      log: { level: "info" },
      ebpf: {
        enabled: true,
        sockmap_enabled: true,
        splice_mode: "pipe",
        xdp: { interfaces: [DEV], mode: "auto" },
      },
    };
    const old = await kernelProxy(s, config);
    const [oldProg] = await xdpIds();
    assert.ok(oldProg > 0, "the old process's XDP program is attached");
    const load = await clients(s, certs.caFile);
    await sleep(1000);

    const next = await kernelProxy(s, config);
    const taken = new RegExp(
      `XDP on ${DEV} taken over from sni-proxy program id ${oldProg} .*now runs program id (\\d+)`,
    ).exec(next.stderr());
    assert.ok(taken, `the new process takes XDP over:\n${next.stderr()}`);
    const newProg = Number(taken[1]);
    assert.deepEqual(await xdpIds(), [newProg]);
    await sleep(500);
    const sigtermAt = Date.now();
    old.signal("SIGTERM");
    assert.equal((await within(45_000, "the old proxy's exit", old.status)).code, 0);
    assert.match(old.stderr(), new RegExp(`on ${DEV}: left to program id ${newProg}\\b`));
    assert.deepEqual(await xdpIds(), [newProg], "the new process's program stays attached");
    await sleep(1000);

    const result = await load.stop();
    console.log(
      `${result.connections} connections, ${result.long.length} long transfers, ` +
        `${result.probes.dropped} denied probes dropped`,
    );
    assert.deepEqual(result.errors, [], `of ${result.connections} connections`);
    assert.ok(result.connections >= 100, `only ${result.connections} connections`);
    for (const t of result.long) {
      assert.equal(t.received, t.bytes);
      assert.equal(t.got, t.sent, "sha256 of the bytes back equals that of the bytes sent");
      assert.ok(t.endedAt > sigtermAt, "the transfer was in flight at the SIGTERM");
    }
    assert.deepEqual(result.probes.passed, [], "the denied source never got through");
    assert.ok(result.probes.dropped >= 20, `only ${result.probes.dropped} probes`);

    assert.equal(await next.stop(), 0, next.stderr());
    assert.match(next.stderr(), new RegExp(`XDP source filter detached from ${DEV}`));
    assert.deepEqual(await xdpIds(), [], "nothing attached after the last process stopped");
  },
  { timeoutMs: 120_000, ignore: SKIP !== null },
);
