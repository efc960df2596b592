/**
 * Backend name resolution and the DNS cache against a real DNS server on loopback (a tiny UDP
 * responder started by each test, which counts the queries it gets): cache hits, TTL expiry and
 * clamping, negative caching, coalescing of concurrent lookups, A + AAAA, CNAMEs, failover, the
 * hosts file. Every cache behaviour runs twice: with the in-process LRU and with the pinned BPF
 * LRU_HASH map (ebpf.dns_cache_enabled; needs root and libbpf, skipped loudly elsewhere), which
 * also must survive a restart, be shared with another process and be readable by bpftool.
 */

import assert from "node:assert/strict";
import { BpfMapFd, BpfMapType, libbpf } from "../ffi/libbpf.ts";
import { DnsError } from "../src/dns/dnscache.ts";
import { queryDns } from "../src/dns/client.ts";
import { Resolver, type ResolverOptions } from "../src/dns/resolver.ts";
import { type FakeDnsServer, startFakeDns } from "./fixtures/dns_server.ts";

const PIN_ROOT = "/sys/fs/bpf/sni-proxy-dns-test";

function pinnedSkipReason(): string | null {
  if (Deno.build.os !== "linux") return "not Linux";
  if (Deno.uid() !== 0) {
    return "not root (the pinned DNS cache tests need root: sudo deno task test)";
  }
  try {
    libbpf();
  } catch (e) {
    return (e as Error).message;
  }
  return null;
}
const PINNED_SKIP = pinnedSkipReason();
if (PINNED_SKIP) console.warn(`SKIPPING the pinned DNS cache tests: ${PINNED_SKIP}`);

type Kind = "memory" | "pinned";
const KINDS: Kind[] = ["memory", "pinned"];

let pinSeq = 0;
function newPinPath(): string {
  return `${PIN_ROOT}/${Deno.pid}-${++pinSeq}`;
}

async function removePin(path: string): Promise<void> {
  await Deno.remove(path).catch(() => {});
  await Deno.remove(PIN_ROOT).catch(() => {}); // only when empty
}

interface Fixture {
  dns: FakeDnsServer;
  resolver: Resolver;
  options: ResolverOptions;
  logs: string[];
  /** Another resolver on the same store (a restart, or a second proxy on the host). */
  reopen(): Resolver;
}

/** Runs `body` with a fake DNS server and a resolver of `kind`; cleans both up. */
async function withResolver(
  kind: Kind,
  records: Parameters<typeof startFakeDns>[0],
  overrides: Partial<ResolverOptions>,
  body: (f: Fixture) => Promise<void>,
): Promise<void> {
  const dns = startFakeDns(records);
  const pinPath = kind === "pinned" ? newPinPath() : null;
  const logs: string[] = [];
  const options: ResolverOptions = {
    minTtlMs: 0,
    maxTtlMs: 60_000,
    negativeTtlMs: 300,
    maxEntries: 64,
    servers: [dns.server],
    hostsFile: null,
    timeoutMs: 500,
    attempts: 1,
    pinned: pinPath ? { path: pinPath } : null,
    ...overrides,
  };
  const log = (level: string, msg: string) => logs.push(`${level}: ${msg}`);
  const resolver = Resolver.open(options, log);
  const opened: Resolver[] = [resolver];
  try {
    assert.equal(resolver.cache.kind, kind, logs.join("\n"));
    await body({
      dns,
      resolver,
      options,
      logs,
      reopen: () => {
        const r = Resolver.open(options, log);
        opened.push(r);
        return r;
      },
    });
  } finally {
    for (const r of opened) r.close();
    await dns.close();
    if (pinPath) await removePin(pinPath);
  }
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<DnsError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof DnsError, `expected a DnsError, got ${e}`);
    assert.equal(e.code, code, e.message);
    return e;
  }
  assert.fail(`expected a DnsError ${code}, but it resolved`);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function cacheTest(name: string, fn: (kind: Kind) => Promise<void>): void {
  for (const kind of KINDS) {
    Deno.test({
      name: `dns cache (${kind}): ${name}`,
      ignore: kind === "pinned" && PINNED_SKIP !== null,
      fn: () => fn(kind),
    });
  }
}

cacheTest("a repeated lookup within the TTL is answered from the cache", async (kind) => {
  const records = { "web.test": { a: ["10.0.0.1", "10.0.0.2"], aaaa: ["2001:db8::1"], ttl: 60 } };
  await withResolver(kind, records, {}, async ({ dns, resolver }) => {
    const first = await resolver.resolve("web.test");
    assert.deepEqual(first, ["10.0.0.1", "10.0.0.2", "2001:db8::1"]);
    assert.equal(dns.queries("web.test", "A"), 1);
    assert.equal(dns.queries("web.test", "AAAA"), 1);
    // case and trailing dot do not matter
    for (const n of ["web.test", "WEB.Test", "web.test."]) {
      assert.deepEqual(await resolver.resolve(n), first);
    }
    assert.equal(dns.totalQueries, 2, "no query after the first lookup");
    assert.equal(resolver.cache.stats.hits, 3);
    assert.equal(resolver.cache.stats.lookups, 1);
  });
});

cacheTest("an answer is looked up again once its TTL has passed", async (kind) => {
  const records = { "short.test": { a: ["10.0.1.1"], ttl: 1 } };
  await withResolver(kind, records, {}, async ({ dns, resolver }) => {
    assert.deepEqual(await resolver.resolve("short.test"), ["10.0.1.1"]);
    await sleep(400);
    assert.deepEqual(await resolver.resolve("short.test"), ["10.0.1.1"]);
    assert.equal(dns.queries("short.test", "A"), 1, "still fresh at 400 ms of a 1 s TTL");
    dns.records.set("short.test", { a: ["10.0.1.2"], ttl: 1 });
    await sleep(700);
    assert.deepEqual(await resolver.resolve("short.test"), ["10.0.1.2"], "the new answer");
    assert.equal(dns.queries("short.test", "A"), 2);
  });
});

cacheTest("TTLs are clamped to [min_ttl, max_ttl]", async (kind) => {
  const records = {
    "zero.test": { a: ["10.0.2.1"], ttl: 0 },
    "long.test": { a: ["10.0.2.2"], ttl: 86400 },
  };
  await withResolver(kind, records, { minTtlMs: 400, maxTtlMs: 800 }, async ({ dns, resolver }) => {
    await resolver.resolve("zero.test");
    await resolver.resolve("long.test");
    await sleep(150);
    await resolver.resolve("zero.test");
    assert.equal(dns.queries("zero.test", "A"), 1, "a TTL of 0 is kept min_ttl long");
    await sleep(400); // 550 ms
    await resolver.resolve("zero.test");
    await resolver.resolve("long.test");
    assert.equal(dns.queries("zero.test", "A"), 2, "expired after min_ttl");
    assert.equal(dns.queries("long.test", "A"), 1, "a day-long TTL is still fresh at 550 ms");
    await sleep(350); // 900 ms
    await resolver.resolve("long.test");
    assert.equal(dns.queries("long.test", "A"), 2, "expired after max_ttl");
  });
});

cacheTest("NXDOMAIN is cached for negative_ttl, then asked again", async (kind) => {
  await withResolver(kind, {}, { negativeTtlMs: 400 }, async ({ dns, resolver }) => {
    const e = await rejectsWith(resolver.resolve("missing.test"), "not_found");
    assert.match(e.message, /"missing\.test".*NXDOMAIN/);
    const queries = dns.queries("missing.test");
    assert.ok(queries >= 1 && queries <= 2, `${queries} queries`);
    const cached = await rejectsWith(resolver.resolve("missing.test"), "not_found");
    assert.match(cached.message, /cached for \d+ ms more/);
    assert.equal(dns.queries("missing.test"), queries, "the negative answer came from the cache");
    assert.equal(resolver.cache.stats.negativeHits, 1);
    dns.records.set("missing.test", { a: ["10.0.3.1"], ttl: 60 });
    await sleep(450);
    assert.deepEqual(await resolver.resolve("missing.test"), ["10.0.3.1"]);
  });
});

cacheTest("a name without A or AAAA records is cached as no-data", async (kind) => {
  await withResolver(kind, { "empty.test": { ttl: 60 } }, {}, async ({ dns, resolver }) => {
    await rejectsWith(resolver.resolve("empty.test"), "no_data");
    await rejectsWith(resolver.resolve("empty.test"), "no_data");
    assert.equal(dns.queries("empty.test", "A"), 1);
    assert.equal(dns.queries("empty.test", "AAAA"), 1);
  });
});

cacheTest("50 concurrent lookups of one name make one query per family", async (kind) => {
  const records = { "busy.test": { a: ["10.0.4.1"], aaaa: ["2001:db8::4"], ttl: 60 } };
  await withResolver(kind, records, {}, async ({ dns, resolver }) => {
    dns.delayMs = 150; // keep the first lookup in flight while the others arrive
    const results = await Promise.all(
      Array.from({ length: 50 }, () => resolver.resolve("busy.test")),
    );
    for (const r of results) assert.deepEqual(r, ["10.0.4.1", "2001:db8::4"]);
    assert.equal(dns.queries("busy.test", "A"), 1);
    assert.equal(dns.queries("busy.test", "AAAA"), 1);
    assert.equal(resolver.cache.stats.coalesced, 49);
    assert.equal(resolver.cache.stats.lookups, 1);
  });
});

cacheTest(
  "a resolver closed while a lookup is under way (a reload replaced it) still answers it and stores the answer before its cache closes",
  async (kind) => {
    const records = { "slow.test": { a: ["10.0.5.1"], ttl: 60 } };
    await withResolver(kind, records, {}, async ({ dns, resolver, reopen }) => {
      dns.delayMs = 150;
      const pending = resolver.resolve("slow.test");
      await sleep(20);
      resolver.close();
      assert.deepEqual(await pending, ["10.0.5.1"]);
      dns.delayMs = 0;
      // the next resolver on the same store: a pinned map holds the answer written after close()
      const next = reopen();
      assert.deepEqual(await next.resolve("slow.test"), ["10.0.5.1"]);
      assert.equal(dns.queries("slow.test", "A"), kind === "pinned" ? 1 : 2);
    });
  },
);

cacheTest("IPv4 and IPv6 addresses: both families, either alone, via CNAME", async (kind) => {
  const records = {
    "dual.test": { a: ["192.0.2.10"], aaaa: ["2001:db8:0:1::10", "fe80::1:0:0:2"], ttl: 60 },
    "v6only.test": { aaaa: ["::1"], ttl: 60 },
    "v4only.test": { a: ["127.0.0.1"], ttl: 60 },
    "alias.test": { cname: "dual.test", ttl: 60 },
  };
  await withResolver(kind, records, {}, async ({ dns, resolver }) => {
    const dual = ["192.0.2.10", "2001:db8:0:1::10", "fe80::1:0:0:2"];
    assert.deepEqual(await resolver.resolve("dual.test"), dual);
    assert.deepEqual(await resolver.resolve("v6only.test"), ["::1"]);
    assert.deepEqual(await resolver.resolve("v4only.test"), ["127.0.0.1"]);
    assert.deepEqual(await resolver.resolve("alias.test"), dual);
    const before = dns.totalQueries;
    // all from the cache now (the pinned map stores the bytes: this checks the round trip)
    assert.deepEqual(await resolver.resolve("dual.test"), dual);
    assert.deepEqual(await resolver.resolve("v6only.test"), ["::1"]);
    assert.deepEqual(await resolver.resolve("alias.test"), dual);
    assert.equal(dns.totalQueries, before);
  });
});

cacheTest("a failed lookup is not cached, and the next server is tried", async (kind) => {
  const records = { "up.test": { a: ["10.0.5.1"], ttl: 60 } };
  const dead = startFakeDns(records);
  dead.silent = true;
  try {
    await withResolver(kind, records, { timeoutMs: 200 }, async ({ dns, options }) => {
      const failing = Resolver.open({ ...options, servers: [dead.server], pinned: null });
      try {
        const e = await rejectsWith(failing.resolve("up.test"), "timeout");
        assert.match(e.message, /no answer in 200 ms/);
        await rejectsWith(failing.resolve("up.test"), "timeout");
        assert.equal(dead.queries("up.test", "A"), 2, "the failure was not cached");
      } finally {
        failing.close();
      }
      // the silent server first, the live one second
      const failover = Resolver.open({ ...options, servers: [dead.server, dns.server] });
      try {
        assert.deepEqual(await failover.resolve("up.test"), ["10.0.5.1"]);
        assert.equal(dns.queries("up.test", "A"), 1);
        assert.equal(dead.queries("up.test", "A"), 3);
      } finally {
        failover.close();
      }
    });
  } finally {
    await dead.close();
  }
});

Deno.test("dns cache (memory): beyond cache_entries the least recently used name is evicted", async () => {
  const records = {
    "a.test": { a: ["10.0.6.1"], ttl: 60 },
    "b.test": { a: ["10.0.6.2"], ttl: 60 },
    "c.test": { a: ["10.0.6.3"], ttl: 60 },
  };
  await withResolver("memory", records, { maxEntries: 2 }, async ({ dns, resolver }) => {
    await resolver.resolve("a.test");
    await resolver.resolve("b.test");
    await resolver.resolve("a.test"); // a is now the most recent
    await resolver.resolve("c.test"); // evicts b
    await resolver.resolve("a.test");
    assert.equal(dns.queries("a.test", "A"), 1);
    await resolver.resolve("b.test");
    assert.equal(dns.queries("b.test", "A"), 2);
  });
});

Deno.test({
  name: "dns cache (pinned): a restarted proxy and a second process use the entries in the map",
  ignore: PINNED_SKIP !== null,
  fn: async () => {
    const records = { "shared.test": { a: ["10.0.7.1"], aaaa: ["2001:db8::7"], ttl: 60 } };
    await withResolver("pinned", records, {}, async ({ dns, resolver, options, logs, reopen }) => {
      assert.deepEqual(await resolver.resolve("shared.test"), ["10.0.7.1", "2001:db8::7"]);
      assert.equal(dns.totalQueries, 2);
      resolver.close(); // the "restart": the map stays pinned
      const restarted = reopen();
      assert.equal(restarted.cache.kind, "pinned");
      assert.ok(logs.some((l) => l.includes("using the pinned map")), logs.join("\n"));
      assert.deepEqual(await restarted.resolve("shared.test"), ["10.0.7.1", "2001:db8::7"]);
      assert.equal(dns.totalQueries, 2, "the restarted resolver asked no server");

      // another process on the host: it sees this entry, and its own lookup lands in the map
      dns.records.set("other.test", { a: ["10.0.7.2"], ttl: 60 });
      const script = `
        import { Resolver } from ${
        JSON.stringify(new URL("../src/dns/resolver.ts", import.meta.url).href)
      };
        const r = Resolver.open(${JSON.stringify(options)});
        console.log(JSON.stringify([r.cache.kind, await r.resolve("shared.test"), await r.resolve("other.test")]));
        r.close();`;
      const out = await new Deno.Command(Deno.execPath(), {
        args: ["eval", "--unstable-net", script],
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(out.stdout);
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      assert.deepEqual(JSON.parse(text), [
        "pinned",
        ["10.0.7.1", "2001:db8::7"],
        ["10.0.7.2"],
      ]);
      assert.equal(dns.queries("shared.test"), 2, "the other process asked no server for it");
      assert.equal(dns.queries("other.test"), 2);
      assert.deepEqual(await restarted.resolve("other.test"), ["10.0.7.2"]);
      assert.equal(dns.queries("other.test"), 2, "this process found the other's entry");
    });
  },
});

Deno.test({
  name: "dns cache (pinned): bpftool map dump shows names, expiry and addresses",
  ignore: PINNED_SKIP !== null,
  fn: async () => {
    const records = { "dump.test": { a: ["10.0.8.1"], aaaa: ["2001:db8::8"], ttl: 60 } };
    await withResolver("pinned", records, {}, async ({ resolver, options }) => {
      const before = Date.now();
      await resolver.resolve("dump.test");
      await rejectsWith(resolver.resolve("nx.test"), "not_found");
      const out = await new Deno.Command("bpftool", {
        args: ["-j", "map", "dump", "pinned", options.pinned!.path],
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.ok(out.success, new TextDecoder().decode(out.stderr));
      const dump = JSON.parse(new TextDecoder().decode(out.stdout)) as {
        formatted: {
          key: { name: string };
          value: {
            expires_at_ms: number;
            flags: number;
            count_v4: number;
            count_v6: number;
            ipv4: number[][];
            ipv6: number[][];
          };
        };
      }[];
      const byName = new Map(dump.map((e) => [e.formatted.key.name, e.formatted.value]));
      const v = byName.get("dump.test");
      assert.ok(v, `dump.test in ${[...byName.keys()]}`);
      assert.equal(v.flags, 0);
      assert.equal(v.count_v4, 1);
      assert.deepEqual(v.ipv4[0], [10, 0, 8, 1]);
      assert.equal(v.count_v6, 1);
      assert.deepEqual(v.ipv6[0], [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8]);
      assert.ok(v.expires_at_ms >= before + 59_000 && v.expires_at_ms <= Date.now() + 60_000);
      const nx = byName.get("nx.test");
      assert.ok(nx, "the negative entry is in the map");
      assert.equal(nx.flags & 1, 1, "flagged NXDOMAIN");
    });
  },
});

Deno.test({
  name: "dns cache (pinned): a pin of another layout or size is replaced, with a log line",
  ignore: PINNED_SKIP !== null,
  fn: async () => {
    const path = newPinPath();
    await Deno.mkdir(PIN_ROOT, { recursive: true });
    const old = BpfMapFd.create({
      type: BpfMapType.LRU_HASH,
      name: "old_layout",
      keySize: 64,
      valueSize: 16,
      maxEntries: 8,
    });
    old.pin(path);
    old.close();
    const logs: string[] = [];
    const dns = startFakeDns({ "new.test": { a: ["10.0.9.1"], ttl: 60 } });
    const r = Resolver.open({
      minTtlMs: 0,
      maxTtlMs: 60_000,
      negativeTtlMs: 300,
      maxEntries: 32,
      servers: [dns.server],
      hostsFile: null,
      pinned: { path },
    }, (level, msg) => logs.push(`${level}: ${msg}`));
    try {
      assert.equal(r.cache.kind, "pinned");
      assert.ok(logs.some((l) => /^warning: .*replacing the pinned map/.test(l)), logs.join("\n"));
      assert.deepEqual(await r.resolve("new.test"), ["10.0.9.1"]);
      using reopened = BpfMapFd.openPinned(path);
      assert.equal(reopened.info.keySize, 256);
      assert.equal(reopened.info.maxEntries, 32);
    } finally {
      r.close();
      await dns.close();
      await removePin(path);
    }
  },
});

Deno.test("resolver: when the pinned map cannot be opened, the in-process cache is used", async () => {
  const logs: string[] = [];
  const dns = startFakeDns({ "fallback.test": { a: ["10.0.10.1"], ttl: 60 } });
  // a path that cannot be a bpffs pin: its parent is a regular file
  const file = await Deno.makeTempFile();
  const r = Resolver.open({
    minTtlMs: 0,
    maxTtlMs: 60_000,
    negativeTtlMs: 300,
    maxEntries: 32,
    servers: [dns.server],
    hostsFile: null,
    pinned: { path: `${file}/cache` },
  }, (level, msg) => logs.push(`${level}: ${msg}`));
  try {
    assert.equal(r.cache.kind, "memory");
    assert.ok(
      logs.some((l) => l.startsWith("warning: DNS cache:") && l.includes("in-process cache")),
      logs.join("\n"),
    );
    assert.deepEqual(await r.resolve("fallback.test"), ["10.0.10.1"]);
  } finally {
    r.close();
    await dns.close();
    await Deno.remove(file);
  }
});

Deno.test("resolver: a pin path outside /sys/fs/bpf gets no bpffs mounted over it; one warning says why", async () => {
  const logs: string[] = [];
  const dns = startFakeDns({ "outside.test": { a: ["10.0.10.2"], ttl: 60 } });
  const dir = await Deno.makeTempDir();
  const r = Resolver.open({
    minTtlMs: 0,
    maxTtlMs: 60_000,
    negativeTtlMs: 300,
    maxEntries: 32,
    servers: [dns.server],
    hostsFile: null,
    pinned: { path: `${dir}/cache` },
  }, (level, msg) => logs.push(`${level}: ${msg}`));
  try {
    assert.equal(r.cache.kind, "memory");
    const warned = logs.filter((l) => l.startsWith("warning:"));
    assert.equal(warned.length, 1, logs.join("\n"));
    assert.match(warned[0], /is not on a bpf filesystem .*not under \/sys\/fs\/bpf/);
    const mounts = await Deno.readTextFile("/proc/self/mounts");
    assert.ok(!mounts.split("\n").some((l) => l.split(" ")[1] === dir), mounts);
    assert.deepEqual(await r.resolve("outside.test"), ["10.0.10.2"]);
  } finally {
    r.close();
    await dns.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("resolver: IP literals, hosts-file names and bad names ask no server", async () => {
  const hosts = await Deno.makeTempFile();
  await Deno.writeTextFile(
    hosts,
    "# comment\n127.0.0.1 localhost\n10.1.0.1 Box.Lan box # trailing\n::1 box\n",
  );
  await withResolver("memory", {}, { hostsFile: hosts }, async ({ dns, resolver }) => {
    assert.deepEqual(await resolver.resolve("192.0.2.1"), ["192.0.2.1"]);
    assert.deepEqual(await resolver.resolve("2001:db8::1"), ["2001:db8::1"]);
    assert.deepEqual(await resolver.resolve("box"), ["10.1.0.1", "::1"]);
    assert.deepEqual(await resolver.resolve("box.lan."), ["10.1.0.1"]);
    assert.deepEqual(await resolver.resolve("localhost"), ["127.0.0.1"]);
    for (const bad of ["", "a..b", "-x.test", "x".repeat(64) + ".test", "sp ace.test", "é.test"]) {
      await rejectsWith(resolver.resolve(bad), "bad_name");
    }
    assert.equal(dns.totalQueries, 0);
  });
  await Deno.remove(hosts);
});

Deno.test("resolver: lookups that come together before the hosts file was read all find its names, asking no server", async () => {
  const hosts = await Deno.makeTempFile();
  await Deno.writeTextFile(hosts, "10.1.0.1 box\n");
  await withResolver("memory", {}, { hostsFile: hosts }, async ({ dns, resolver }) => {
    const all = await Promise.all(Array.from({ length: 20 }, () => resolver.resolve("box")));
    assert.deepEqual(all, Array(20).fill(["10.1.0.1"]));
    assert.equal(dns.totalQueries, 0);
  });
  await Deno.remove(hosts);
});

Deno.test("resolver: the system hosts file answers localhost by default", async () => {
  const r = Resolver.open({ minTtlMs: 0, maxTtlMs: 1000, negativeTtlMs: 100, maxEntries: 4 });
  try {
    const addrs = await r.resolve("localhost");
    assert.ok(addrs.includes("127.0.0.1") || addrs.includes("::1"), `${addrs}`);
  } finally {
    r.close();
  }
});

Deno.test("queryDns: a truncated UDP answer is retried over TCP", async () => {
  // a server that answers every UDP query with TC set and serves the full answer over TCP
  // the same port number for UDP and TCP: take a free TCP port, then its UDP twin (retry if taken)
  const { udp, tcp } = (() => {
    for (let i = 0;; i++) {
      const tcp = Deno.listen({ hostname: "127.0.0.1", port: 0 });
      try {
        const port = (tcp.addr as Deno.NetAddr).port;
        return { tcp, udp: Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port }) };
      } catch (e) {
        tcp.close();
        if (i > 20) throw e;
      }
    }
  })();
  const port = (udp.addr as Deno.NetAddr).port;
  const many = Array.from({ length: 100 }, (_, i) => `10.2.${i >> 8}.${i & 0xff}`);
  const fake = startFakeDns({ "big.test": { a: many, ttl: 42 } }); // builds the full answer
  const udpLoop = (async () => {
    for (;;) {
      let msg: Uint8Array, from: Deno.Addr;
      try {
        [msg, from] = await udp.receive();
      } catch {
        return;
      }
      const reply = new Uint8Array(msg.length);
      reply.set(msg);
      reply[2] = 0x80 | 0x02 | (msg[2] & 1); // QR, TC
      reply[3] = 0x80;
      reply[6] = reply[7] = 0; // no answers
      await udp.send(reply.subarray(0, msg.length), from);
    }
  })();
  const tcpLoop = (async () => {
    for await (const conn of tcp) {
      const buf = new Uint8Array(512);
      const n = (await conn.read(buf)) ?? 0;
      const query = buf.subarray(2, n);
      // forward to the fake server over UDP and relay its answer with a length prefix
      const relay = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
      await relay.send(query, { transport: "udp", ...fake.server, hostname: "127.0.0.1" });
      const [answer] = await relay.receive();
      relay.close();
      const framed = new Uint8Array(2 + answer.length);
      new DataView(framed.buffer).setUint16(0, answer.length);
      framed.set(answer, 2);
      await conn.write(framed);
      conn.close();
    }
  })();
  try {
    const a = await queryDns("big.test", "A", { ipAddr: "127.0.0.1", port }, 1000);
    assert.deepEqual(a.addresses, many);
    assert.equal(a.ttlMs, 42_000);
    assert.equal(fake.queries("big.test", "A"), 1);
  } finally {
    udp.close();
    tcp.close();
    await Promise.all([udpLoop, tcpLoop.catch(() => {})]);
    await fake.close();
  }
});
