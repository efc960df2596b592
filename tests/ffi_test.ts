/**
 * The libbpf FFI binding and address handling without privileges: library version, log
 * rendering through libc vsnprintf, typed errors, and 4-tuple parsing as the kernel programs
 * key sockets. Skipped (loudly) when libbpf.so.1 or the BPF object cannot be had.
 */

import assert from "node:assert/strict";
import {
  BpfError,
  BpfMapFd,
  BpfMapType,
  BpfObject,
  type LibbpfLogLevel,
  libbpfVersion,
  setLibbpfLogger,
} from "../ffi/libbpf.ts";
import { socketTuple } from "../src/ebpf/sockmap.ts";
import { ipv4Value, parseIp } from "../src/net/ip.ts";
import {
  KEY_ZERO,
  LPM_V4,
  LPM_V6,
  PAIR,
  PORT_VALUE,
  portKey,
  QUIC_FLOW,
  QUIC_KEY,
  QUIC_MAPS,
  QUIC_STATS_SIZE,
  SOCK_KEY,
  SOCKHASH_VALUE_SIZE,
  SOCKMAP_MAPS,
  SOCKMAP_STATS_SIZE,
  TRIE_VALUE,
  XDP_CONFIG,
  XDP_STATS_MAP,
  XDP_STATS_SIZE,
} from "../src/ebpf/layout.ts";

const OBJECT = new URL("../bpf/sockmap.bpf.o", import.meta.url);
const XDP_OBJECT = new URL("../bpf/xdp.bpf.o", import.meta.url);
const QUIC_OBJECT = new URL("../bpf/quic.bpf.o", import.meta.url);

async function skipReason(): Promise<string | null> {
  try {
    libbpfVersion();
  } catch (e) {
    return (e as Error).message;
  }
  try {
    await Deno.stat(OBJECT);
    await Deno.stat(XDP_OBJECT);
    await Deno.stat(QUIC_OBJECT);
  } catch {
    const build = await new Deno.Command("bash", {
      args: [new URL("../build.sh", import.meta.url).pathname, "bpf"],
      stderr: "piped",
    }).output().catch((e) => ({ success: false, stderr: new TextEncoder().encode(String(e)) }));
    if (!build.success) {
      return `bpf/sockmap.bpf.o, bpf/xdp.bpf.o or bpf/quic.bpf.o missing and build.sh failed: ${
        new TextDecoder().decode(build.stderr)
      }`;
    }
  }
  return null;
}

const SKIP = await skipReason();
if (SKIP) console.warn(`\n!!! SKIPPING libbpf tests in tests/ffi_test.ts: ${SKIP}\n`);

Deno.test({
  name: "ffi: libbpf.so.1 is libbpf 1.x and reports its version",
  ignore: !!SKIP,
  fn() {
    const v = libbpfVersion();
    assert.ok(v.major >= 1);
    assert.equal(v.text, `v${v.major}.${v.minor}`);
  },
});

Deno.test({
  name: "ffi: libbpf's printf-style log reaches the logger rendered (vsnprintf over va_list)",
  ignore: !!SKIP,
  fn() {
    const lines: [LibbpfLogLevel, string][] = [];
    setLibbpfLogger((level, message) => lines.push([level, message]));
    try {
      using obj = BpfObject.openMem(Deno.readFileSync(OBJECT), "render_me");
      assert.ok(obj);
    } finally {
      setLibbpfLogger(null);
    }
    // "libbpf: loading object '%s' from buffer" and "... found max_entries = %u."
    assert.ok(
      lines.some(([l, m]) =>
        l === "debug" && m === "libbpf: loading object 'render_me' from buffer"
      ),
      JSON.stringify(lines.slice(0, 5)),
    );
    assert.ok(lines.some(([, m]) => /map 'sni_pairs': found max_entries = 65536\./.test(m)));
    assert.ok(lines.every(([, m]) => !m.endsWith("\n")));
  },
});

Deno.test({
  name: "ffi: a missing program or a malformed object is a BpfError naming the operation",
  ignore: !!SKIP,
  fn() {
    using obj = BpfObject.openMem(Deno.readFileSync(OBJECT), "named");
    assert.throws(
      () => obj.program("no_such_prog"),
      (e) =>
        e instanceof BpfError && e.errnoName === "ENOENT" &&
        e.op === "find program no_such_prog in named",
    );
    assert.throws(
      () => BpfObject.openMem(new TextEncoder().encode("garbage"), "garbage"),
      (e) => e instanceof BpfError && e.op === "bpf_object__open_mem(garbage)" && e.errno > 0,
    );
  },
});

Deno.test("ffi: a dotted quad is scanned to its 32-bit value; anything else is -1", () => {
  assert.equal(ipv4Value("10.1.2.3"), 0x0a010203);
  assert.equal(ipv4Value("255.255.255.255"), 0xffffffff);
  assert.equal(ipv4Value("0.0.0.0"), 0);
  assert.equal(ipv4Value("001.02.3.4"), 0x01020304);
  for (
    const bad of [
      "",
      "1.2.3",
      "1.2.3.4.",
      ".1.2.3.4",
      "1..2.3",
      "1.2.3.4.5",
      "256.1.1.1",
      "1.2.3.1000",
      "1.2.3.-4",
      " 1.2.3.4",
      "1.2.3.4 ",
      "a.b.c.d",
      "::1",
      "1.2.3.4/8",
    ]
  ) assert.equal(ipv4Value(bad), -1, bad);
});

Deno.test("ffi: IP literals parse to network-order bytes; IPv4-mapped IPv6 becomes IPv4", () => {
  assert.deepEqual(parseIp("10.1.2.3"), {
    family: 2,
    bytes: new Uint8Array([10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
  });
  assert.deepEqual(parseIp("::ffff:127.0.0.1"), parseIp("127.0.0.1"));
  assert.deepEqual(parseIp("::FFFF:7f00:1"), parseIp("127.0.0.1"));
  assert.deepEqual(parseIp("::1")?.bytes, new Uint8Array([...Array(15).fill(0), 1]));
  assert.deepEqual(
    parseIp("[2001:db8::a:b]")?.bytes,
    new Uint8Array([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0a, 0, 0x0b]),
  );
  assert.equal(parseIp("fe80::1%eth0")?.family, 10);
  assert.equal(parseIp("::")?.family, 10);
  for (const bad of ["", "1.2.3", "256.1.1.1", "1:2:3:4:5:6:7:8:9", "1::2::3", "example.com"]) {
    assert.equal(parseIp(bad), null, bad);
  }
});

Deno.test("ffi: socketTuple takes Deno addresses and refuses names, mixed families, bad ports", () => {
  const t = socketTuple({
    local: { hostname: "::ffff:127.0.0.1", port: 8443 },
    remote: { hostname: "127.0.0.2", port: 50000 },
  });
  assert.equal(t.family, 2);
  assert.equal(t.localPort, 8443);
  assert.deepEqual(t.remoteIp.subarray(0, 4), new Uint8Array([127, 0, 0, 2]));
  assert.throws(() =>
    socketTuple({ local: { hostname: "host", port: 1 }, remote: { hostname: "::1", port: 2 } })
  );
  assert.throws(() =>
    socketTuple({ local: { hostname: "::1", port: 1 }, remote: { hostname: "1.2.3.4", port: 2 } })
  );
  assert.throws(() =>
    socketTuple({ local: { hostname: "::1", port: 0 }, remote: { hostname: "::1", port: 2 } })
  );
});

Deno.test({
  name: "ffi: the maps of the BPF objects have the key and value sizes src/ebpf/layout.ts mirrors",
  ignore: !!SKIP,
  fn() {
    const want: [URL, Record<string, [number, number]>][] = [
      [OBJECT, {
        [SOCKMAP_MAPS.sockhash]: [SOCK_KEY.size, SOCKHASH_VALUE_SIZE],
        [SOCKMAP_MAPS.pairs]: [SOCK_KEY.size, PAIR.size],
        [SOCKMAP_MAPS.stats]: [KEY_ZERO.length, SOCKMAP_STATS_SIZE],
      }],
      [XDP_OBJECT, {
        deny_v4: [LPM_V4.size, TRIE_VALUE.length],
        deny_v6: [LPM_V6.size, TRIE_VALUE.length],
        allow_v4: [LPM_V4.size, TRIE_VALUE.length],
        allow_v6: [LPM_V6.size, TRIE_VALUE.length],
        ports: [portKey(1).length, PORT_VALUE.length],
        xdp_config: [KEY_ZERO.length, XDP_CONFIG.size],
        [XDP_STATS_MAP]: [KEY_ZERO.length, XDP_STATS_SIZE],
      }],
      [QUIC_OBJECT, {
        [QUIC_MAPS.flows]: [QUIC_KEY.size, QUIC_FLOW.size],
        [QUIC_MAPS.stats]: [KEY_ZERO.length, QUIC_STATS_SIZE],
      }],
    ];
    for (const [url, maps] of want) {
      using obj = BpfObject.openMem(Deno.readFileSync(url), "layout");
      for (const [name, [key, value]] of Object.entries(maps)) {
        const m = obj.map(name);
        assert.deepEqual([m.keySize, m.valueSize], [key, value], `${url.pathname}: ${name}`);
      }
    }
  },
});

Deno.test({
  name: "ffi: a batch writes and deletes several hash entries in one call; a full map refuses " +
    "the element past its size, and a delete stops at the first absent key and says how many",
  ignore: !!SKIP,
  fn() {
    using map = BpfMapFd.create({
      type: BpfMapType.HASH,
      name: "batch_test",
      keySize: 4,
      valueSize: 8,
      maxEntries: 2,
    });
    const keys = (...ks: number[]) => new Uint8Array(new Uint32Array(ks).buffer);
    const values = (...vs: number[]) => new Uint8Array(new BigUint64Array(vs.map(BigInt)).buffer);
    const value = (k: number) => {
      const out = new Uint8Array(8);
      return map.lookup(keys(k), out) ? Number(new BigUint64Array(out.buffer)[0]) : null;
    };
    map.updateBatch(keys(1, 2), values(10, 20), 2);
    assert.deepEqual([value(1), value(2)], [10, 20]);
    map.updateBatch(keys(1, 2), values(11, 21), 2);
    assert.deepEqual([value(1), value(2)], [11, 21], "a batch replaces entries (BPF_ANY)");
    assert.throws(
      () => map.updateBatch(keys(1, 3), values(12, 30), 2),
      (e) => e instanceof BpfError && e.errno === 7, // E2BIG: the map is full
    );
    assert.deepEqual([value(1), value(3)], [12, null], "the elements before the failure stay");
    assert.equal(map.deleteBatch(keys(3, 1), 2), 0, "stops at the absent key");
    assert.equal(value(1), 12, "and deletes nothing past it");
    assert.equal(map.deleteBatch(keys(1, 3), 2), 1);
    assert.equal(map.deleteBatch(keys(2), 1), 1);
    assert.deepEqual([value(1), value(2)], [null, null]);
    assert.throws(() => map.deleteBatch(keys(1, 2), 3), BpfError, "keys must match the count");
  },
});
