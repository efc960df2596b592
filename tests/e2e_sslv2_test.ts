/**
 * End to end, the SSLv2-compatible ClientHello (issue 19): the v2-format hello old clients send
 * has no room for a server name, so the real proxy routes it like any hello without one: to
 * `default_backend` with its bytes unchanged (nginx `stream` answers it too), else refused as
 * `no_route`. Observed from outside the process: what the backend receives, what the client
 * gets, the access log and `sni-proxy ctl sessions`.
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  identityBackend,
  type ProxyProcess,
  rawServer,
  readExact,
  readToEnd,
  runCli,
  type Scope,
  sleep,
  sslv2ClientHello,
  startProxy,
  unusedPort,
  whoAnswers,
  within,
  writeAll,
} from "./harness/mod.ts";

const ANSWER = new TextEncoder().encode("default backend's answer\n");

/** A plain-TCP default backend: records each v2 hello it reads, answers, then records the rest. */
async function recordingBackend(s: Scope, release: Promise<void>) {
  const received: Uint8Array[] = [];
  const server = await rawServer(s, async (conn) => {
    const head = await readExact(conn, 2);
    const rest = await readExact(conn, ((head[0] & 0x7f) << 8) | head[1]);
    await release;
    await writeAll(conn, ANSWER);
    await conn.closeWrite();
    const after = await readToEnd(conn);
    received.push(new Uint8Array([...head, ...rest, ...after]));
  }, { tls: false });
  return { server, received };
}

/** `sni-proxy ctl --json sessions` against `p`. */
async function sessions(p: ProxyProcess): Promise<Record<string, unknown>[]> {
  const r = await runCli(["ctl", "--config", p.configPath, "--json", "sessions"]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  return JSON.parse(r.stdout).sessions;
}

for (const mode of ["userspace", "kernel"] as const) {
  e2eTest(
    `${mode} mode: an SSLv2-compatible ClientHello goes to default_backend unchanged; the client gets its answer`,
    async (s) => {
      const named = await identityBackend(s, "named");
      const release = Promise.withResolvers<void>();
      const dflt = await recordingBackend(s, release.promise);
      const dir = await Deno.makeTempDir({ prefix: "sni-e2e-sslv2-" });
      s.defer(() => Deno.remove(dir, { recursive: true }));
      const p = await startProxy(s, {
        listeners: [{ address: "127.0.0.1:0" }],
        routes: [{ match: "a.test", backends: [named.address] }],
        default_backend: dflt.server.address,
        // fingerprint patterns are matched against the v2 hello's JA4 and JA3 (no match here)
        acl: { deny_fingerprints: ["t10d*"] },
        admin: { socket: `${dir}/admin.sock` },
        // pipe mode (splice(2)): no eBPF or privilege needed
        ...(mode === "kernel" ? { ebpf: { enabled: true, sockmap_enabled: true } } : {}),
      });
      assert.equal(p.ready.mode, mode);
      const hello = sslv2ClientHello();
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
      s.defer(() => conn.close());
      await writeAll(conn, hello);

      // while the backend holds its answer, the admin view lists the session without a name
      const live = await within(
        5000,
        "session listed",
        (async () => {
          for (;;) {
            const list = await sessions(p);
            if (list.length === 1 && list[0].backend !== null) return list[0];
            await sleep(50);
          }
        })(),
      );
      assert.equal(live.sni, null, JSON.stringify(live));
      assert.equal(live.route, "default_backend", JSON.stringify(live));
      release.resolve();

      assert.deepEqual(await within(5000, "answer", readExact(conn, ANSWER.length)), ANSWER);
      await conn.closeWrite();
      assert.equal((await within(5000, "EOF", readToEnd(conn))).length, 0);
      await within(5000, "backend done", dflt.server.settled());
      assert.deepEqual(dflt.received, [hello], "the backend got exactly the v2 hello's bytes");

      const e = await p.waitAccess((e) => e.backend === dflt.server.address);
      assert.equal(e.sni, null);
      assert.equal(e.route, "default_backend");
      assert.equal(e.close_reason, "done");
      assert.equal(e.mode, mode);
      assert.equal(e.bytes_up, hello.length);
      assert.equal(e.bytes_down, ANSWER.length);
      assert.deepEqual(e.alpn ?? [], []);
      // TLS 1.0, no SNI, the 20 TLS suites of OpenSSL 0.9.8's list, no extensions, no ALPN
      assert.match(e.ja4 as string, /^t10i200000_[0-9a-f]{12}_000000000000$/, JSON.stringify(e));
      assert.match(e.ja3 as string, /^[0-9a-f]{32}$/);
      assert.equal(named.accepted, 0, "the named route's backend was never contacted");
      assert.equal(await whoAnswers(p.port(), "a.test"), "named", "still serving names");
    },
  );
}

e2eTest(
  "without default_backend an SSLv2-compatible ClientHello is closed as no_route",
  async (s) => {
    const named = await identityBackend(s, "named");
    const p = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [named.address] }],
    });
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
    s.defer(() => conn.close());
    await writeAll(conn, sslv2ClientHello());
    // told so (a TLS alert, as to any nameless hello) and closed, without waiting for the client
    const answer = await within(5000, "close", readToEnd(conn));
    assert.equal(answer[0], 0x15, "an alert record");
    const e = await p.waitAccess((e) => e.close_reason === "no_route");
    assert.equal(e.sni, null);
    assert.equal(e.backend, null);
    assert.equal(named.accepted, 0);
    assert.match(p.stderr(), /no route for a hello without SNI/);
  },
);

e2eTest(
  "an SSLv2-compatible ClientHello reaches a real TLS server through the proxy (openssl s_server answers with a ServerHello)",
  async (s) => {
    const dir = await Deno.makeTempDir({ prefix: "sni-e2e-sslv2-tls-" });
    s.defer(() => Deno.remove(dir, { recursive: true }));
    // an RSA certificate: the suites of a v2 hello have no ECDSA (the test CA's leaf is EC)
    const req = await new Deno.Command("openssl", {
      args: [
        ...["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=old.test", "-days"],
        ...["1", "-keyout", `${dir}/key.pem`, "-out", `${dir}/cert.pem`],
      ],
      stdout: "null",
      stderr: "piped",
    }).output();
    assert.ok(req.success, new TextDecoder().decode(req.stderr));
    const port = unusedPort();
    // TLS 1.0 with the old suites: what a server answering these clients still runs
    const server = new Deno.Command("openssl", {
      args: [
        ...["s_server", "-accept", `127.0.0.1:${port}`, "-cert", `${dir}/cert.pem`],
        ...["-key", `${dir}/key.pem`, "-tls1", "-cipher", "ALL:@SECLEVEL=0", "-quiet"],
      ],
      stdin: "piped",
      stdout: "null",
      stderr: "null",
    }).spawn();
    s.defer(async () => {
      server.kill("SIGKILL");
      await server.status;
    });
    const serverHello = async (target: number) => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: target });
      try {
        await writeAll(conn, sslv2ClientHello());
        // record header, then the handshake type and the version the server picked
        return [...await within(5000, "ServerHello", readExact(conn, 11))];
      } finally {
        conn.close();
      }
    };
    await within(
      10_000,
      "s_server listening",
      (async () => {
        for (;;) {
          try {
            (await Deno.connect({ hostname: "127.0.0.1", port })).close();
            return;
          } catch {
            await sleep(50);
          }
        }
      })(),
    );
    const direct = await serverHello(port);
    assert.deepEqual([direct[0], direct[5], direct[9], direct[10]], [0x16, 2, 3, 1], `${direct}`);
    const p = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [],
      default_backend: `127.0.0.1:${port}`,
    });
    const proxied = await serverHello(p.port());
    assert.deepEqual(proxied.slice(0, 6), direct.slice(0, 6));
    assert.deepEqual(proxied.slice(9), direct.slice(9));
    const e = await p.waitAccess((e) => e.backend === `127.0.0.1:${port}`);
    assert.equal(e.sni, null);
    assert.equal(e.route, "default_backend");
  },
);
