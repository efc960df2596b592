/**
 * Writing the client's first bytes (the hello, after any PROXY header) to a backend that
 * accepts and never reads: given up at `timeouts.connect_ms` as the backend's failure (a log
 * line naming it, `connect_failures_total`, passive health), the client told (a TLS
 * internal_error alert) and closed, nothing left behind.
 *
 * The write blocks only once the proxy's send buffer is full: the test runs in a network
 * namespace of its own whose `net.ipv4.tcp_wmem` caps send buffers at 16 KiB (the host's let
 * them grow to 4 MiB), with a ~120 KB hello (`limits.max_client_hello_bytes` raised) and a backend
 * whose receive buffer is 2 KiB and whose queue is never accepted.
 *
 * @module
 */
import assert from "node:assert/strict";
import {
  clientHelloBytes,
  e2eTest,
  fixtureClients,
  kernelEbpf,
  kernelSkipReason,
  runChecked,
  type Scope,
  sleep,
  startProxy,
  testNamespace,
} from "./harness/mod.ts";
import { lines } from "../src/net/bytes.ts";

const SKIP = await kernelSkipReason();
if (SKIP) console.warn(`\n!!! SKIPPING tests/hello_write_test.ts (needs root): ${SKIP}\n`);

/** The fatal alert internal_error, in hex. */
const INTERNAL_ERROR = "15030300020250";

/** A namespace of the test whose send buffers are capped at 16 KiB (see the module comment). */
async function smallSendBuffers(scope: Scope, tag: string): Promise<string[]> {
  const wrapper = await testNamespace(scope, tag);
  await runChecked([...wrapper, "sysctl", "-qw", "net.ipv4.tcp_wmem=4096 16384 16384"]);
  return wrapper;
}

/**
 * A backend in `wrapper`'s namespace with a 2 KiB receive buffer: a python `body` run after it
 * listens on `l` (backlog `backlog`) and printed its port; its address. Killed with the scope.
 */
async function pyBackend(scope: Scope, wrapper: string[], body: string, backlog = 64) {
  const script = "import socket, time\n" +
    "l = socket.socket()\n" +
    "l.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)\n" +
    "l.bind(('127.0.0.1', 0))\n" +
    `l.listen(${backlog})\n` +
    "print(l.getsockname()[1], flush=True)\n" + body;
  const child = new Deno.Command(wrapper[0], {
    args: [...wrapper.slice(1), "python3", "-c", script],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  scope.defer(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  });
  const { value } = await lines(child.stdout).next();
  return `127.0.0.1:${Number(value)}`;
}

/** A backend that never accepts (nor reads), with a 2 KiB receive buffer. */
function deafBackend(scope: Scope, wrapper: string[]): Promise<string> {
  return pyBackend(scope, wrapper, "time.sleep(120)\n");
}

for (const mode of ["userspace", "pipe", "sockmap"] as const) {
  e2eTest(
    `${mode} mode: a backend that accepts and never reads: a 120 KB hello is given up at ` +
      `connect_ms, logged and counted as the backend's failure; the client reads internal_error ` +
      `then the end (a sockmap relay, which holds the client's socket, resets it)`,
    async (scope) => {
      const wrapper = await smallSendBuffers(scope, `hello-write-${mode}`);
      const backend = await deafBackend(scope, wrapper);
      const p = await startProxy(scope, {
        listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
        routes: [{ match: "a.test", backends: [backend], health: { max_fails: 1 } }],
        timeouts: { connect_ms: 1000 },
        limits: { max_client_hello_bytes: 262144 },
        metrics: { address: "127.0.0.1:0" },
        ebpf: mode === "userspace" ? { enabled: false } : kernelEbpf({ splice_mode: mode }),
      }, { wrapper });
      const [r] = await fixtureClients(wrapper, p.port(), {
        count: 1,
        name: "a.test",
        kind: "grow",
      });
      const e = await p.waitAccess((e) => e.sni === "a.test");
      assert.equal(e.close_reason, "backend_timeout", JSON.stringify(e));
      assert.equal(e.backend, backend);
      // pipe mode writes the hello as userspace mode does (a pair moves to splice(2) once bulk)
      if (mode === "sockmap") {
        assert.deepEqual([r.got, r.end], ["", "ConnectionReset"], JSON.stringify(r));
        await p.waitForLog(`backend ${backend} did not take the hello within connect_ms`);
      } else {
        assert.deepEqual([r.got, r.end], [INTERNAL_ERROR, "eof"], JSON.stringify(r));
        await p.waitForLog(
          new RegExp(`backend ${backend} took \\d+ of the \\d+ bytes of the hello`),
        );
      }
      assert.equal(e.mode, mode === "pipe" ? "kernel" : e.mode);
      assert.ok(r.ms >= 900 && r.ms < 3000, `given up after ${r.ms} ms`);
      await p.waitForLog(`backend ${backend} of route "a.test" down`);
      const metrics = await runChecked([
        ...wrapper,
        "curl",
        "-sS",
        `http://${p.ready.metrics}/metrics`,
      ]);
      assert.match(metrics, /^sni_proxy_connect_failures_total 1$/m);
      assert.match(metrics, /^sni_proxy_connections_closed_total\{reason="backend_timeout"\} 1$/m);
      assert.match(metrics, /^sni_proxy_connections_active 0$/m);
    },
    { ignore: SKIP !== null },
  );
}

/** TCP connections established in `wrapper`'s namespace with `filter` (an ss filter). */
async function established(wrapper: string[], filter: string): Promise<number> {
  const out = await runChecked([...wrapper, "ss", "-Htn", "state", "established", filter]);
  return out.split("\n").filter((l) => l.trim()).length;
}

e2eTest(
  "a session stopped while its hello is written (the drain ran out) resets the backend's " +
    "connection: the backend is not left holding a part of the hello",
  async (scope) => {
    const wrapper = await smallSendBuffers(scope, "hello-write-stop");
    const backend = await deafBackend(scope, wrapper);
    const port = backend.split(":")[1];
    const p = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [backend] }],
      timeouts: { connect_ms: 20_000, drain_ms: 300 },
      limits: { max_client_hello_bytes: 262144 },
      ebpf: { enabled: false },
    }, { wrapper });
    const client = fixtureClients(wrapper, p.port(), { count: 1, name: "a.test", kind: "grow" });
    // the backend's side of the connection, holding the part of the hello it was given
    const end = Date.now() + 10_000;
    while ((await established(wrapper, `( sport = :${port} )`)) !== 1) {
      assert.ok(Date.now() < end, "the proxy connected the backend");
      await sleep(50);
    }
    await sleep(200);
    p.signal("SIGTERM");
    const e = await p.waitAccess((e) => e.sni === "a.test");
    assert.equal(e.close_reason, "shutdown");
    await client;
    assert.equal(await established(wrapper, `( sport = :${port} )`), 0, "reset");
  },
  { ignore: SKIP !== null },
);

e2eTest(
  "an HTTP listener: a 120 KB request head to a backend that never reads is answered 504 at " +
    "connect_ms",
  async (scope) => {
    const wrapper = await smallSendBuffers(scope, "hello-write-http");
    const backend = await deafBackend(scope, wrapper);
    const p = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
      routes: [{ match: "a.test", backends: [backend] }],
      timeouts: { connect_ms: 1000 },
      limits: { max_client_hello_bytes: 262144 },
      ebpf: { enabled: false },
    }, { wrapper });
    const [r] = await fixtureClients(wrapper, p.port(), { count: 1, name: "a.test", kind: "http" });
    const text = new TextDecoder().decode(
      new Uint8Array((r.got.match(/../g) ?? []).map((b) => parseInt(b, 16))),
    );
    assert.match(text, /^HTTP\/1\.1 504 Gateway Timeout\r\n/, JSON.stringify(r));
    assert.equal(r.end, "eof");
    const e = await p.waitAccess((e) => e.sni === "a.test");
    assert.equal(e.close_reason, "backend_timeout");
  },
  { ignore: SKIP !== null },
);

e2eTest(
  "pipe mode: client bytes after the hello that a slow backend has not taken yet are not taken " +
    "for the hello: the connection outlives connect_ms and every byte arrives",
  async (scope) => {
    const wrapper = await smallSendBuffers(scope, "hello-write-later");
    // reads what comes at once (the hello), pauses 2.5 s, then reads to the end and says how much
    const backend = await pyBackend(
      scope,
      wrapper,
      "c, _ = l.accept()\n" +
        "n = len(c.recv(65536))\n" +
        "time.sleep(2.5)\n" +
        "while True:\n" +
        "  b = c.recv(65536)\n" +
        "  if not b: break\n" +
        "  n += len(b)\n" +
        "c.sendall(str(n).encode())\n" +
        "c.close()\n" +
        "time.sleep(30)\n",
      8,
    );
    const p = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [{ match: "a.test", backends: [backend] }],
      timeouts: { connect_ms: 1000 },
      ebpf: kernelEbpf({ splice_mode: "pipe" }),
    }, { wrapper });
    assert.equal(p.ready.mode, "kernel");
    const hello = Array.from(await clientHelloBytes("a.test"));
    // the hello, then 200 KB in small writes (copied, not spliced), then the end
    const client = "import socket, sys, time\n" +
      `c = socket.create_connection(('127.0.0.1', ${p.port()}))\n` +
      `c.sendall(bytes(${JSON.stringify(hello)}))\n` +
      "time.sleep(0.2)\n" +
      "for i in range(200): c.sendall(b'x' * 1000); time.sleep(0.002)\n" +
      "c.shutdown(socket.SHUT_WR)\n" +
      "c.settimeout(10)\n" +
      "try:\n" +
      "  print(c.recv(100).decode() or 'eof')\n" +
      "except Exception as e:\n" +
      "  print(type(e).__name__)\n";
    const out = await runChecked([...wrapper, "python3", "-c", client]);
    assert.equal(out.trim(), String(hello.length + 200_000));
    const e = await p.waitAccess((e) => e.sni === "a.test");
    assert.notEqual(e.close_reason, "backend_timeout", JSON.stringify(e));
  },
  { ignore: SKIP !== null },
);
