import assert from "node:assert/strict";
import { Acl, parseCidr } from "../src/route/acl.ts";
import { BackendPool } from "../src/route/backend.ts";
import { compilePattern, Router } from "../src/route/router.ts";

function router(...patterns: string[]) {
  return new Router(
    patterns.map((p, i) => ({ pattern: compilePattern(p), alpn: null, allow: null, target: i })),
  );
}

function routed(r: Router<number>, name: string | null): number | null {
  const found = r.lookup(name);
  return found.kind === "route" ? found.route.target : null;
}

Deno.test("exact names match case-insensitively, with or without a trailing dot", () => {
  const r = router("a.test");
  assert.equal(routed(r, "a.test"), 0);
  assert.equal(routed(r, "A.TeSt."), 0);
  assert.equal(routed(r, "b.a.test"), null);
  assert.equal(routed(r, null), null);
});

Deno.test("a wildcard matches one or more labels but not the bare domain", () => {
  const r = router("*.b.test");
  assert.equal(routed(r, "x.b.test"), 0);
  assert.equal(routed(r, "x.y.B.test"), 0);
  assert.equal(routed(r, "b.test"), null);
  assert.equal(routed(r, "xb.test"), null);
});

Deno.test("regex routes, '*' catch-all and first match wins", () => {
  const r = router("~^api[0-9]+\\.c\\.test$", "a.test", "*");
  assert.equal(routed(r, "api12.c.test"), 0);
  assert.equal(routed(r, "API7.C.TEST"), 0);
  assert.equal(routed(r, "apix.c.test"), 2);
  assert.equal(routed(r, "a.test"), 1);
  assert.equal(routed(r, null), null, "no SNI is for default_backend, not '*'");
});

Deno.test("a dynamic route refuses names outside its allow list", () => {
  const r = new Router([{
    pattern: compilePattern("*"),
    alpn: null,
    allow: [compilePattern("*.ok.test")],
    target: 0,
  }]);
  assert.equal(r.lookup("x.ok.test").kind, "route");
  assert.equal(r.lookup("evil.test").kind, "not_allowed");
});

Deno.test("ALPN routes match a hello offering one of their protocols; others fall through", () => {
  const route = (match: string, alpn: string[] | null, target: number) => ({
    pattern: compilePattern(match),
    alpn,
    allow: null,
    target,
  });
  const r = new Router([
    route("a.test", ["acme-tls/1"], 0),
    route("a.test", ["h2", "h3"], 1),
    route("a.test", null, 2),
  ]);
  const at = (alpn?: string[]) => {
    const found = r.lookup("a.test", alpn);
    return found.kind === "route" ? found.route.target : null;
  };
  assert.equal(at(["acme-tls/1"]), 0);
  assert.equal(at(["h2", "http/1.1"]), 1, "one offered protocol is enough");
  assert.equal(at(["http/1.1", "h3"]), 1, "not only the first offered");
  assert.equal(at(["http/1.1"]), 2);
  assert.equal(at([]), 2, "a hello without ALPN takes the route without a condition");
  assert.equal(at(), 2);
  assert.equal(r.lookup("b.test", ["acme-tls/1"]).kind, "none", "the name still has to match");
});

Deno.test("bad patterns are refused with a reason", () => {
  assert.throws(() => compilePattern("~(("), /bad regular expression/);
  assert.throws(() => compilePattern("a.*.test"), /not a name/);
  assert.throws(() => compilePattern("exa mple.com"), /not a name/);
});

Deno.test("ACL: deny wins, allow lists restrict, IPv4-mapped IPv6 folds to IPv4", () => {
  const acl = new Acl([parseCidr("127.0.0.0/8"), parseCidr("2001:db8::/32")], [
    parseCidr("127.0.0.2/32"),
  ]);
  assert.equal(acl.permits("127.0.0.1"), true);
  assert.equal(acl.permits("127.0.0.2"), false);
  assert.equal(acl.permits("::ffff:127.0.0.2"), false);
  assert.equal(acl.permits("::ffff:127.0.0.9"), true);
  assert.equal(acl.permits("10.0.0.1"), false);
  assert.equal(acl.permits("2001:db8:1::5"), true);
  assert.equal(acl.permits("2001:db9::5"), false);
  assert.equal(acl.permits("::1"), false);
  assert.equal(new Acl([], []).permits("garbage"), true);
  assert.equal(new Acl([parseCidr("::/0")], []).permits("fe80::1"), true);
  assert.throws(() => parseCidr("1.2.3.4/40"), /prefix length/);
  assert.throws(() => parseCidr("1.2.3"), /not an IP/);
  // IPv4-mapped blocks keep their meaning: ::ffff:10.1.2.0/120 is 10.1.2.0/24
  const mapped = new Acl([], [parseCidr("::ffff:10.1.2.0/120")]);
  assert.equal(mapped.permits("10.1.2.9"), false);
  assert.equal(mapped.permits("10.1.3.9"), true);
  assert.throws(() => parseCidr("::ffff:10.1.2.3/24"), /prefix length must be 96-128/);
});

Deno.test("balancing: round robin rotates, source hash sticks, least_conn picks the idlest", () => {
  const addrs = [1, 2, 3].map((i) => ({ text: `h${i}:1`, host: `h${i}`, port: 1, dynamic: false }));
  const rr = new BackendPool("r", addrs, "round_robin");
  assert.deepEqual([0, 1, 2, 3].map(() => rr.pick("1.1.1.1")!.address.host), [
    "h1",
    "h2",
    "h3",
    "h1",
  ]);
  const sh = new BackendPool("r", addrs, "source_hash");
  const first = sh.pick("203.0.113.7");
  for (let i = 0; i < 10; i++) assert.equal(sh.pick("203.0.113.7"), first);
  const spread = new Set(Array.from({ length: 50 }, (_, i) => sh.pick(`10.0.0.${i}`)));
  assert.equal(spread.size, 3, "different clients spread over all backends");
  const lc = new BackendPool("r", addrs, "least_conn");
  lc.backends[0].active = 5;
  lc.backends[1].active = 1;
  lc.backends[2].active = 3;
  assert.equal(lc.pick("x")!.address.host, "h2");
  const rnd = new BackendPool("r", addrs, "random");
  const seen = new Set(Array.from({ length: 100 }, () => rnd.pick("x")));
  assert.equal(seen.size, 3);
});

Deno.test("passive health: max_fails connect failures take a backend out for fail_timeout_ms", async () => {
  const addrs = [1, 2].map((i) => ({ text: `h${i}:1`, host: `h${i}`, port: 1, dynamic: false }));
  for (const mode of ["round_robin", "random", "least_conn", "source_hash"] as const) {
    const pool = new BackendPool("r", addrs, mode, {
      health: { maxFails: 2, failTimeoutMs: 200, active: null },
    });
    const [h1, h2] = pool.backends;
    pool.connectFailed(h1, "refused");
    assert.ok(pool.isUp(h1), "one failure is not enough");
    pool.connectFailed(h1, "refused");
    assert.ok(!pool.isUp(h1));
    for (let i = 0; i < 10; i++) {
      assert.equal(pool.pick(`10.0.0.${i}`), h2, `${mode} skips the down one`);
    }
    assert.equal(
      pool.pick("x", new Set([h2])),
      null,
      "nothing left when the only up one is excluded",
    );
    pool.connectFailed(h2, "refused");
    pool.connectFailed(h2, "refused");
    assert.equal(pool.pick("x"), null, `${mode}: all down`);
    await new Promise((r) => setTimeout(r, 250));
    assert.ok(pool.pick("x") !== null, `${mode}: back after fail_timeout_ms`);
  }
});

type Spec = { weight?: number; backup?: boolean; maxConnections?: number };

/** A pool of backends h1, h2, … with the given weights, roles and limits. */
function pool(mode: "round_robin" | "random" | "least_conn" | "source_hash", ...specs: Spec[]) {
  const addrs = specs.map((spec, i) => ({
    text: `h${i + 1}:1`,
    host: `h${i + 1}`,
    port: 1,
    dynamic: false,
    ...spec,
  }));
  return new BackendPool("r", addrs, mode, {
    health: { maxFails: 1, failTimeoutMs: 60_000, active: null },
  });
}

const MODES = ["round_robin", "random", "least_conn", "source_hash"] as const;

Deno.test("weights: every balancing mode shares connections in weight proportion", () => {
  for (const mode of MODES) {
    const p = pool(mode, { weight: 1 }, { weight: 3 }, { weight: 6 });
    const counts = new Map<string, number>();
    const live: ReturnType<typeof p.pick>[] = [];
    for (let i = 0; i < 20_000; i++) {
      const b = p.pick(`10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`)!;
      counts.set(b.address.host, (counts.get(b.address.host) ?? 0) + 1);
      // least_conn weighs live connections: keep 100 open, closing the oldest
      b.active++;
      live.push(b);
      if (live.length > 100) live.shift()!.active--;
    }
    for (const [host, share] of [["h1", 0.1], ["h2", 0.3], ["h3", 0.6]] as const) {
      const got = (counts.get(host) ?? 0) / 20_000;
      assert.ok(Math.abs(got - share) < 0.02, `${mode}: ${host} got ${got}, expected ${share}`);
    }
  }
});

Deno.test("smooth weighted round robin interleaves; least_conn shares idle backends by weight", () => {
  for (const mode of ["round_robin", "least_conn"] as const) {
    const p = pool(mode, { weight: 5 }, { weight: 1 }, { weight: 1 });
    // connections that end before the next one starts: least_conn sees idle backends only
    const order = Array.from({ length: 7 }, () => p.pick("x")!.address.host).join(" ");
    assert.equal(order, "h1 h1 h2 h1 h3 h1 h1", mode);
  }
});

Deno.test("source_hash with weights keeps clients put when another backend goes down", () => {
  const p = pool("source_hash", { weight: 1 }, { weight: 2 }, { weight: 1 });
  const clients = Array.from({ length: 500 }, (_, i) => `192.0.2.${i % 250}:${i}`);
  const before = clients.map((c) => p.pick(c));
  p.connectFailed(p.backends[2], "refused");
  const after = clients.map((c) => p.pick(c));
  clients.forEach((_, i) => {
    if (before[i] !== p.backends[2]) assert.equal(after[i], before[i], "only h3's clients move");
    else assert.notEqual(after[i], p.backends[2]);
  });
});

Deno.test("backups: used only while every primary is down (or failed this connection)", () => {
  for (const mode of MODES) {
    const p = pool(mode, {}, {}, { backup: true }, { backup: true, weight: 3 });
    const [h1, h2, b1, b2] = p.backends;
    for (let i = 0; i < 50; i++) {
      assert.ok(!p.pick(`10.0.0.${i}`)!.backup, `${mode}: primaries serve while up`);
    }
    p.connectFailed(h1, "refused");
    for (let i = 0; i < 20; i++) assert.equal(p.pick(`10.0.1.${i}`), h2, `${mode}: h2 left`);
    assert.ok(p.pick("x", new Set([h2]))!.backup, `${mode}: h2 failed this connection`);
    p.connectFailed(h2, "refused");
    const used = new Set(Array.from({ length: 50 }, (_, i) => p.pick(`10.0.2.${i}`)));
    assert.deepEqual(used, new Set([b1, b2]), `${mode}: both backups serve`);
    h1.downUntil = 0; // h1 is back
    for (let i = 0; i < 20; i++) assert.equal(p.pick(`10.0.3.${i}`), h1, `${mode}: h1 is back`);
  }
});

Deno.test("max_connections: a full backend is skipped; all full is told apart from all down", () => {
  for (const mode of MODES) {
    const p = pool(mode, { maxConnections: 2 }, { maxConnections: 1 }, { backup: true });
    const [h1, h2] = p.backends;
    h1.active = 2;
    for (let i = 0; i < 10; i++) assert.equal(p.pick(`10.0.0.${i}`), h2, `${mode}: h1 is full`);
    h2.active = 1;
    assert.equal(p.pick("x"), null, `${mode}: a full primary is not down: no backup`);
    assert.ok(p.allFull(), `${mode}: refused for being full`);
    h1.active = 1;
    assert.equal(p.pick("x"), h1, `${mode}: a slot came free`);
    assert.ok(!p.allFull());
    p.connectFailed(h1, "refused");
    p.connectFailed(h2, "refused");
    assert.ok(p.pick("x")!.backup, `${mode}: down, not full: the backup serves`);
  }
  const split = new BackendPool(
    "r",
    [{ text: "h:1", host: "h", port: 1, dynamic: false, maxConnections: 5 }],
    "round_robin",
    { workers: 2 },
  );
  assert.equal(split.backends[0].maxConnections, 3, "two workers share 5 as 3 each");
});
