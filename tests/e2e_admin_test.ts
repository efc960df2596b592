/**
 * End to end, the admin API: `sni-proxy ctl` (a real process) against a running proxy's admin
 * socket: listing, draining, disabling and enabling backends, listing and closing sessions,
 * reload and the config in force, socket permissions, and the fan-out to workers.
 */
import assert from "node:assert/strict";
import {
  e2eTest,
  identityBackend,
  LineReader,
  type ProxyProcess,
  rawBackend,
  rawSpliced,
  runCli,
  type Scope,
  sleep,
  spread,
  startProxy,
  tlsConnect,
  whoAnswers,
  within,
  writeAll,
} from "./harness/mod.ts";

const encoder = new TextEncoder();

/** `sni-proxy ctl ARGS` against `p`'s config; asserts exit 0 unless `fails`. */
async function ctl(p: ProxyProcess, args: string[], fails = false): Promise<string> {
  const r = await runCli(["ctl", "--config", p.configPath, ...args]);
  if (fails) {
    assert.equal(r.code, 1, `ctl ${args.join(" ")} should fail:\n${r.stdout}${r.stderr}`);
    return r.stderr;
  }
  assert.equal(r.code, 0, `ctl ${args.join(" ")}:\n${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** `ctl --json ARGS`, parsed. */
async function ctlJson(p: ProxyProcess, args: string[]): Promise<Record<string, unknown>> {
  return JSON.parse(await ctl(p, ["--json", ...args]));
}

/** A live TLS connection to `a.test` through the proxy, with the backend that answers it. */
async function openSession(p: ProxyProcess) {
  const conn = await tlsConnect(p.port(), "a.test");
  const lines = new LineReader(conn);
  const ask = async (text: string) => {
    await writeAll(conn, encoder.encode(`${text}\n`));
    return await within(5000, `answer to ${text}`, lines.line());
  };
  const first = await ask("hello");
  return { conn, ask, backend: /^backend=(\S+) /.exec(first ?? "")?.[1] };
}

/**
 * Two identity backends `one` and `two` behind route `a.test`, the admin socket on; `tls`:
 * whether the backends speak TLS (plain ones answer HTTP requests).
 */
async function twoBackends(s: Scope, extra: Record<string, unknown> = {}, tls = true) {
  const one = await identityBackend(s, "one", { tls });
  const two = await identityBackend(s, "two", { tls });
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-admin-" });
  s.defer(() => Deno.remove(dir, { recursive: true }));
  await Deno.chmod(dir, 0o755); // the socket's permissions decide, not its directory's
  const socket = `${dir}/run/admin.sock`;
  const p = await startProxy(s, {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "a.test", backends: [one.address, two.address], balance: "round_robin" }],
    admin: { socket },
    ...extra,
  });
  await p.waitForLog(`admin API on ${socket}`);
  return { one, two, p, socket };
}

/** Which backends answer `n` new connections. */
async function answering(p: ProxyProcess, n: number): Promise<Set<string>> {
  const seen = new Set<string>();
  for (let i = 0; i < n; i++) seen.add(await whoAnswers(p.port(), "a.test"));
  return seen;
}

e2eTest(
  "ctl backends / drain / enable: a drained backend gets no new connection, its live one goes on",
  async (s) => {
    const { one, two, p, socket } = await twoBackends(s);
    const st = await Deno.stat(socket);
    assert.equal(st.mode! & 0o777, 0o600, "without admin.group only the owner may connect");
    assert.equal(await answering(p, 4).then((x) => x.size), 2, "round robin over both");
    const live = await openSession(p);
    const held = live.backend!;
    const heldAddress = held === "one" ? one.address : two.address;

    const table = await ctl(p, ["backends"]);
    assert.match(table, /^table\s+route\s+backend\s+weight\s+health\s+admin\s+active$/m);
    assert.match(
      table,
      new RegExp(`^default\\s+a\\.test\\s+${heldAddress}\\s+1\\s+up\\s+enabled\\s+1$`, "m"),
    );

    const drained = await ctl(p, ["drain", heldAddress]);
    assert.match(drained, /drained: no new connections, live ones finish/);
    assert.match(drained, /until the next reload or restart: it is not written to the config/);
    await p.waitForLog(
      new RegExp(
        `admin: backend ${
          heldAddress.replace(/\./g, "\\.")
        } of route "a\\.test" \\(table default\\) drained`,
      ),
    );
    const rows = (await ctlJson(p, ["backends"])).backends as Record<string, unknown>[];
    assert.deepEqual(
      rows.map((r) => [r.backend, r.admin, r.active]),
      [one.address, two.address].map((b) => [
        b,
        b === heldAddress ? "drained" : "enabled",
        b === heldAddress ? 1 : 0,
      ]),
    );
    const others = await answering(p, 4);
    assert.ok(
      !others.has(held) && others.size === 1,
      `no new connection to ${held}: ${[...others]}`,
    );
    assert.equal(await live.ask("still"), `backend=${held} still`, "the live connection goes on");

    await ctl(p, ["enable", heldAddress]);
    assert.equal((await answering(p, 4)).size, 2, "back in rotation");
    live.conn.close();

    // errors name what is wrong and exit 1
    assert.match(
      await ctl(p, ["drain", "192.0.2.1:1"], true),
      /no backend 192\.0\.2\.1:1 \(backends: /,
    );
    assert.match(await ctl(p, ["close"], true), /close needs a client, route or backend filter/);
    const help = await runCli(["ctl", "--help"]);
    assert.equal(help.code, 0);
    const commands = ["backends", "drain", "disable", "enable", "weight", "sessions", "close"];
    for (const cmd of [...commands, "reload"]) {
      assert.match(help.stdout, new RegExp(`^  ${cmd}\\b`, "m"), `ctl --help names ${cmd}`);
    }
    assert.equal((await runCli(["ctl", "--config", p.configPath, "--bogus"])).code, 2);
    const usage = await runCli(["ctl", "--config", p.configPath, "frob"]);
    assert.equal(usage.code, 1);
    assert.match(usage.stderr, /unknown command "frob"/);
  },
);

e2eTest(
  "ctl disable closes the backend's live sessions; sessions lists and close closes by filter",
  async (s) => {
    const { p } = await twoBackends(s);
    const a = await openSession(p);
    const b = await openSession(p);
    assert.notEqual(a.backend, b.backend, "round robin put them on different backends");
    const list = (await ctlJson(p, ["sessions"])).sessions as Record<string, string>[];
    assert.equal(list.length, 2);
    const aClient = `127.0.0.1:${(a.conn.localAddr as Deno.NetAddr).port}`;
    const aInfo = list.find((x) => x.client === aClient)!;
    assert.ok(aInfo, `a (${aClient}) listed: ${JSON.stringify(list)}`);
    assert.equal(aInfo.route, "a.test");
    assert.equal(aInfo.table, "default");
    assert.equal(aInfo.sni, "a.test");
    assert.equal(aInfo.backend, aInfo.backend_config);
    const table = await ctl(p, ["sessions", "--route", "a.test"]);
    assert.equal(table.trim().split("\n").length, 3, table);
    assert.equal(((await ctlJson(p, ["sessions", "--route", "b.test"])).sessions as []).length, 0);
    const byClient = (await ctlJson(p, ["sessions", "--client", aClient])).sessions as [];
    assert.equal(byClient.length, 1);

    // disable: a's backend leaves rotation and a is closed, b is untouched
    const aAddress = aInfo.backend_config;
    const out = await ctl(p, ["disable", aAddress]);
    assert.match(out, /disabled: no new connections, 1 session\(s\) closed/);
    assert.equal(await within(5000, "a closed", a.ask("gone?").catch(() => null)), null);
    const entry = await p.waitAccess((e) => e.client === aClient);
    assert.equal(entry.close_reason, "admin");
    assert.equal(await b.ask("still"), `backend=${b.backend} still`);
    assert.deepEqual([...await answering(p, 3)], [b.backend]);

    // close by client: b goes
    const bClient = `127.0.0.1:${(b.conn.localAddr as Deno.NetAddr).port}`;
    assert.match(
      await ctl(p, ["close", "--client", bClient]),
      new RegExp(`^1 session\\(s\\) closed \\(client ${bClient}\\)$`, "m"),
    );
    assert.equal(await within(5000, "b closed", b.ask("gone?").catch(() => null)), null);
    assert.equal((await p.waitAccess((e) => e.client === bClient)).close_reason, "admin");
    a.conn.close();
    b.conn.close();
  },
);

e2eTest(
  "ctl reload applies the file and ends admin changes; ctl config; the socket answers while draining",
  async (s) => {
    const { one, p } = await twoBackends(s);
    await ctl(p, ["drain", one.address]);
    const cfg = JSON.parse(await Deno.readTextFile(p.configPath));
    cfg.routes[0].backends = [one.address];
    cfg.timeouts.idle_ms = 12345;
    await Deno.writeTextFile(p.configPath, JSON.stringify(cfg));
    assert.match(await ctl(p, ["reload"]), /^reloaded /);
    await p.waitForLog(
      `reload: admin changes end, the config file rules again: ${one.address} drained`,
    );
    assert.deepEqual([...await answering(p, 2)], ["one"], "the drain ended with the reload");
    const shown = await ctl(p, ["config"]);
    const config = JSON.parse(shown);
    assert.equal(config.path, p.configPath);
    // the config in force, with its defaults filled in (a backend as its full object)
    assert.deepEqual(config.config.routes[0].backends, [
      { address: one.address, backup: false, weight: 1 },
    ]);
    assert.equal(config.config.timeouts.idle_ms, 12345);
    // a bad file: the reload fails with its errors, the running config stays
    cfg.routes[0].backends = ["127.0.0.1:99999"];
    await Deno.writeTextFile(p.configPath, JSON.stringify(cfg));
    const refused = await ctl(p, ["reload"], true);
    assert.match(
      refused,
      /reload failed, keeping the running config: routes\[0\]\.backends\[0\]: port out of range/,
    );
    assert.deepEqual([...await answering(p, 1)], ["one"]);
    // while a SIGTERM drains, the socket still answers: close what is left (the live session,
    // and maybe the last probe's, whose close the proxy may not have seen yet)
    const live = await openSession(p);
    const liveClient = `127.0.0.1:${(live.conn.localAddr as Deno.NetAddr).port}`;
    p.signal("SIGTERM");
    await p.waitForLog(/draining \d connection/);
    assert.match(await ctl(p, ["close", "--all"]), /^[12] session\(s\) closed \(all\)$/m);
    assert.equal((await within(1500, "exit after the close (drain_ms is 2000)", p.status)).code, 0);
    const entry = (await p.access()).find((e) => e.client === liveClient);
    assert.equal(entry?.close_reason, "admin");
    live.conn.close();
  },
);

e2eTest(
  "the admin socket: mode 0660 with admin.group; others are refused; replaced by a restart, removed at exit",
  async (s) => {
    const { p, socket } = await twoBackends(s);
    await p.stop();
    assert.equal(await Deno.stat(socket).then(() => true, () => false), false, "removed at exit");
    const group = "daemon"; // not the primary group of nobody (nogroup)
    const gid = Number(
      (await Deno.readTextFile("/etc/group")).split("\n").find((l) => l.startsWith(`${group}:`))!
        .split(":")[2],
    );
    const one = await identityBackend(s, "one");
    const q = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [one.address] }],
      admin: { socket, group },
    });
    await q.waitForLog(`admin API on ${socket} (group ${group})`);
    const st = await Deno.stat(socket);
    assert.equal(st.mode! & 0o777, 0o660);
    assert.equal(st.gid, gid);
    assert.equal(st.uid, Deno.uid());
    // an unprivileged user (nobody) gets in only with the socket's group
    const denoDir = await Deno.makeTempDir({ prefix: "sni-e2e-nobody-" });
    s.defer(() => Deno.remove(denoDir, { recursive: true }));
    await Deno.chmod(denoDir, 0o777);
    const asNobody = async (groups: string[]) => {
      const out = await new Deno.Command("setpriv", {
        args: [
          "--reuid=65534",
          "--regid=65534",
          ...(groups.length ? [`--groups=${groups.join(",")}`] : ["--clear-groups"]),
          Deno.execPath(),
          "eval",
          `const c = await Deno.connect({ transport: "unix", path: ${JSON.stringify(socket)} });
         await c.write(new TextEncoder().encode('{"cmd":"backends"}\\n'));
         const b = new Uint8Array(65536);
         console.log(new TextDecoder().decode(b.subarray(0, (await c.read(b)) ?? 0)));`,
        ],
        cwd: "/",
        env: { DENO_DIR: denoDir, NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      return new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    };
    assert.match(await asNobody([String(gid)]), /"ok":true/);
    assert.match(await asNobody([]), /PermissionDenied|Permission denied/);
    // a second proxy on the same socket path takes it over; the first one's exit leaves it alone
    const r = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [one.address] }],
      admin: { socket },
    });
    await r.waitForLog(/admin\.socket .*another process served it; this one takes it over/);
    await q.stop();
    await sleep(100);
    assert.match(await ctl(r, ["backends"]), /one|127\.0\.0\.1/);
  },
);

e2eTest(
  "workers: 2: ctl asks every worker; drain holds in all, sessions are listed with their worker",
  async (s) => {
    const { one, two, p } = await twoBackends(s, { workers: 2 });
    await ctl(p, ["drain", one.address]);
    assert.deepEqual([...await answering(p, 12)], ["two"], "no worker sends to the drained one");
    // enough live sessions for both workers to hold some (all on one: 1 in 2^15)
    const live = [];
    for (let i = 0; i < 16; i++) live.push(await openSession(p));
    const sessions = (await ctlJson(p, ["sessions"])).sessions as Record<string, unknown>[];
    assert.equal(sessions.length, 16);
    const workers = new Set(sessions.map((x) => x.worker));
    assert.deepEqual([...workers].sort(), [1, 2], "sessions of both workers");
    const rows = (await ctlJson(p, ["backends"])).backends as Record<string, unknown>[];
    const twoRow = rows.find((r) => r.backend === two.address)!;
    assert.equal(twoRow.active, 16, "connections summed over workers");
    assert.equal(rows.find((r) => r.backend === one.address)!.admin, "drained");
    assert.match(
      await ctl(p, ["close", "--route", "a.test"]),
      /^16 session\(s\) closed \(route a\.test\)$/m,
    );
    for (const l of live) {
      assert.equal(await within(5000, "closed", l.ask("x").catch(() => null)), null);
    }
    for (const l of live) l.conn.close();
  },
);

e2eTest(
  "ctl weight (workers: 2): 2,000 connections follow the new weights; a reload restores the config's",
  async (s) => {
    const { one, two, p } = await twoBackends(s, {
      workers: 2,
      listeners: [{ address: "127.0.0.1:0", protocol: "http" }],
      log: { level: "info", access_log: false },
    }, false);
    /** Asserts `one` gets `share` of 2,000 new connections (within 3 points). */
    const shares = async (share: number) => {
      const counts = await spread(p.port(), 2000, 16);
      const got = (counts.get("one") ?? 0) / 2000;
      assert.ok(Math.abs(got - share) < 0.03, `one: ${got} of the connections, not ${share}`);
      assert.equal((counts.get("one") ?? 0) + (counts.get("two") ?? 0), 2000);
    };
    await shares(0.5);
    const out = await ctl(p, ["weight", one.address, "3"]);
    assert.match(out, /weight 3: its share of the route's new connections follows/);
    assert.match(out, /until the next reload or restart: it is not written to the config/);
    await p.waitForLog(
      new RegExp(
        `admin: backend ${one.address.replace(/\./g, "\\.")} of route "a\\.test" .*weight 3`,
      ),
    );
    const rows = (await ctlJson(p, ["backends"])).backends as Record<string, unknown>[];
    assert.deepEqual(rows.map((r) => [r.backend, r.weight]), [[one.address, 3], [two.address, 1]]);
    assert.match(
      await ctl(p, ["backends"]),
      new RegExp(`^default\\s+a\\.test\\s+${one.address}\\s+3\\s+up\\s+enabled\\s+\\d+$`, "m"),
    );
    await shares(0.75);
    // refused: out of range, not a number, an unknown backend
    assert.match(
      await ctl(p, ["weight", one.address, "1001"], true),
      /weight needs a whole number from 1 to 1000, not 1001/,
    );
    assert.match(await ctl(p, ["weight", "192.0.2.1:1", "2"], true), /no backend 192\.0\.2\.1:1/);
    const usage = await runCli(["ctl", "--config", p.configPath, "weight", one.address, "x"]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /expected weight BACKEND N/);

    assert.match(await ctl(p, ["reload"]), /^reloaded /);
    await p.waitForLog(
      `reload: admin changes end, the config file rules again: ${one.address} weight 3`,
    );
    const after = (await ctlJson(p, ["backends"])).backends as Record<string, unknown>[];
    assert.deepEqual(after.map((r) => r.weight), [1, 1]);
    await shares(0.5);
  },
  { timeoutMs: 120_000 },
);

e2eTest(
  "ctl unblock: the supervisor answers (workers: 2); refused without an XDP block set or an address",
  async (s) => {
    const { p } = await twoBackends(s, { workers: 2 });
    assert.match(
      await ctl(p, ["unblock", "192.0.2.7"], true),
      /no XDP block set: ebpf\.xdp\.block is off, or the XDP filter is not attached/,
    );
    assert.match(
      await ctl(p, ["unblock", "192.0.2.7:443"], true),
      /unblock needs one IP address, e\.g\. 192\.0\.2\.7, not 192\.0\.2\.7:443/,
    );
    const usage = await runCli(["ctl", "--config", p.configPath, "unblock"]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /expected unblock ADDRESS/);
    const help = await runCli(["ctl", "--help"]);
    assert.match(help.stdout, /^ {2}unblock ADDRESS\b/m);
    // with the block set on, tests/proxy_xdp_test.ts lifts a real block
  },
);

e2eTest(
  "ctl sessions shows each connection's state: hello, relaying, draining once one side ended",
  async (s) => {
    const backend = rawBackend(s);
    const dir = await Deno.makeTempDir({ prefix: "sni-e2e-admin-" });
    s.defer(() => Deno.remove(dir, { recursive: true }));
    const p = await startProxy(s, {
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: [backend.address] }],
      admin: { socket: `${dir}/admin.sock` },
    });
    await p.waitForLog("admin API on");
    const stateOf = async (port: number) => {
      const list = (await ctlJson(p, ["sessions"])).sessions as Record<string, string>[];
      return list.find((x) => x.client === `127.0.0.1:${port}`)?.state;
    };
    const portOf = (c: Deno.Conn) => (c.localAddr as Deno.NetAddr).port;
    // connected, no hello yet
    const silent = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
    s.defer(() => silent.close());
    assert.equal(await within(5000, "listed", waitFor(() => stateOf(portOf(silent)))), "hello");
    // routed and connected: relaying; the client half-closes: draining (the backend still may send)
    const { conn } = await rawSpliced(p.port(), "a.test");
    s.defer(() => conn.close());
    const server = await backend.next();
    assert.equal(await stateOf(portOf(conn)), "relaying");
    await conn.closeWrite();
    assert.equal(
      await within(
        5000,
        "draining",
        waitFor(async () => {
          const st = await stateOf(portOf(conn));
          return st === "draining" ? st : undefined;
        }),
      ),
      "draining",
    );
    server.close();
  },
);

/** Polls `f` every 50 ms until it gives a value. */
async function waitFor<T>(f: () => Promise<T | undefined>): Promise<T> {
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    await sleep(50);
  }
}
