/**
 * End to end, several machines: two proxy instances, each in a network namespace of its own
 * with its own TLS backend, behind an L4 balancer (HAProxy in TCP mode, sending PROXY v2 and
 * checking each instance's `/healthz`) in a third namespace, clients in a fourth. One instance
 * is stopped (SIGTERM) while the clients open new TLS connections: none may fail or lose a
 * byte, and both instances log the clients' own address.
 *
 * The namespaces are joined by veth pairs (addresses in 10.99.0.0/16, inside them only) and
 * removed when the test ends, also when it fails. Needs root (`ip netns`) and haproxy.
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  ip,
  type Scope,
  served,
  sleep,
  startProxy,
  testCerts,
  traffic,
  within,
} from "./harness/mod.ts";

const haproxy = await new Deno.Command("haproxy", { args: ["-v"], stdout: "null", stderr: "null" })
  .output().then((o) => o.success, () => false);
const runnable = Deno.uid() === 0 && haproxy;
if (!runnable) console.warn("!!! SKIPPING the several-machines test: it needs root and haproxy");

/** The client's address: every access log entry must name it (PROXY v2 from the balancer). */
const CLIENT_IP = "10.99.1.2";
/** Where clients connect: the balancer's address on the clients' link. */
const VIP = "10.99.1.1";

/**
 * Four namespaces: the balancer's linked to each of the others by a veth pair, subnet
 * 10.99.N.0/24 (the balancer .1, the other end .2): N = 1 clients, 2 instance a, 3 instance b.
 * Returns each one's `ip netns exec` wrapper.
 */
async function network(s: Scope) {
  const name = (role: string) => `sni-multi-${Deno.pid}-${role}`;
  const roles = ["lb", "client", "a", "b"] as const;
  for (const role of roles) {
    await ip("netns", "del", name(role)).catch(() => {});
    await ip("netns", "add", name(role));
    s.defer(() => ip("netns", "del", name(role)));
    await ip("-n", name(role), "link", "set", "lo", "up");
  }
  for (const [n, role] of [[1, "client"], [2, "a"], [3, "b"]] as const) {
    // created in the balancer's namespace, the peer moved straight into the other one
    await ip(
      "-n",
      name("lb"),
      "link",
      "add",
      `to-${role}`,
      "type",
      "veth",
      "peer",
      "name",
      "eth0",
      "netns",
      name(role),
    );
    await ip("-n", name("lb"), "addr", "add", `10.99.${n}.1/24`, "dev", `to-${role}`);
    await ip("-n", name(role), "addr", "add", `10.99.${n}.2/24`, "dev", "eth0");
    await ip("-n", name("lb"), "link", "set", `to-${role}`, "up");
    await ip("-n", name(role), "link", "set", "eth0", "up");
  }
  const wrapper = (role: (typeof roles)[number]) => ["ip", "netns", "exec", name(role)];
  return { lb: wrapper("lb"), client: wrapper("client"), a: wrapper("a"), b: wrapper("b") };
}

/** HAProxy in `wrapper`'s namespace, balancing VIP:443 over the instances; stopped at the end. */
async function balancer(s: Scope, wrapper: string[]) {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-haproxy-" });
  s.defer(() => Deno.remove(dir, { recursive: true }));
  await Deno.writeTextFile(
    `${dir}/haproxy.cfg`,
    `global
  maxconn 2000
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch 1
frontend vip
  bind ${VIP}:443
  default_backend instances
backend instances
  balance roundrobin
  option httpchk
  http-check send meth GET uri /healthz
  http-check expect status 200
  default-server check port 9090 inter 200 fall 2 rise 2 send-proxy-v2
  server a 10.99.2.2:443
  server b 10.99.3.2:443
`,
  );
  const child = new Deno.Command(wrapper[0], {
    args: [...wrapper.slice(1), "haproxy", "-db", "-f", `${dir}/haproxy.cfg`],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output = "";
  const collect = async (stream: ReadableStream<Uint8Array>) => {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) output += text;
  };
  const collected = Promise.all([collect(child.stdout), collect(child.stderr)]);
  s.defer(async () => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await child.status;
    await collected;
  });
  // listening once ss in its namespace shows the VIP's socket
  await within(
    10_000,
    "haproxy listening",
    (async () => {
      for (;;) {
        const out = await new Deno.Command(wrapper[0], {
          args: [...wrapper.slice(1), "ss", "-Hltn", `src ${VIP}:443`],
          stderr: "null",
        }).output();
        if (new TextDecoder().decode(out.stdout).includes(`${VIP}:443`)) return;
        await sleep(50);
      }
    })(),
  );
  return { output: () => output };
}

/** A proxy instance in `wrapper`'s namespace at 10.99.N.2, trusting the balancer's PROXY v2. */
function instance(s: Scope, wrapper: string[], n: number, backend: number, workers: number) {
  return startProxy(s, {
    workers,
    listeners: [{ address: `10.99.${n}.2:443`, accept_proxy_protocol: [`10.99.${n}.1/32`] }],
    routes: [{ match: "a.test", backends: [`127.0.0.1:${backend}`] }],
    metrics: { address: `10.99.${n}.2:9090` },
    // the balancer checks every 200 ms and takes an instance out after 2 failed checks
    timeouts: { stop_delay_ms: 1500, drain_ms: 10_000 },
    log: { level: "info" },
  }, { wrapper });
}

for (const workers of [1, 2]) {
  e2eTest(
    `several machines (workers ${workers}): two instances behind HAProxy (PROXY v2, /healthz); ` +
      "one stopped under load: nothing refused, no byte lost, the client's own address logged",
    async (s) => {
      const ns = await network(s);
      const certs = await testCerts();
      const tls = ["--tls", certs.dir];
      const backendA = await traffic(s, ns.a, tls);
      const backendB = await traffic(s, ns.b, tls);
      const a = await instance(s, ns.a, 2, backendA.backend!, workers);
      const b = await instance(s, ns.b, 3, backendB.backend!, workers);
      const lb = await balancer(s, ns.lb);
      const clients = await traffic(s, ns.client, [...tls, "--no-backend"]);
      await clients.start(443, VIP);
      await within(15_000, "both instances serving", Promise.all([served(a, 20), served(b, 20)]));

      a.signal("SIGTERM");
      await a.waitForLog(/stopping: \/healthz answers 503/);
      assert.equal((await within(20_000, "instance a's exit", a.status)).code, 0);
      const before = (await b.access()).length;
      await served(b, before + 50);
      const result = await clients.stop();
      assert.deepEqual(result.errors, [], `of ${result.connections} connections`);
      assert.ok(result.connections >= 100, `${result.connections} connections`);

      const entriesA = await a.access();
      // the access log is written in batches: wait for the running instance's last ones
      await served(b, result.connections - entriesA.length).catch((e) => {
        throw new Error(`${e.message}\nhaproxy:\n${lb.output()}\nb:\n${b.stderr().slice(-3000)}`);
      });
      const entriesB = await b.access();
      assert.equal(
        entriesA.length + entriesB.length,
        result.connections,
        "every connection was served by one of the instances",
      );
      for (const e of [...entriesA, ...entriesB]) {
        assert.match(e.client, new RegExp(`^${CLIENT_IP.replace(/\./g, "\\.")}:\\d+$`));
        assert.equal(e.sni, "a.test");
        assert.equal(e.close_reason, "done", JSON.stringify(e));
      }
      // taken out by its /healthz (503 from the SIGTERM on), not by a refused connect
      assert.match(
        lb.output(),
        /Server instances\/a is DOWN, reason: Layer7 wrong status, code: 503/,
      );
      assert.match(a.stderr(), /stopped/);
    },
    { timeoutMs: 90_000, ignore: !runnable },
  );
}
