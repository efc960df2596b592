/**
 * The offence counting of ebpf.xdp.block (src/ebpf/xdpblock.ts) against a block set in memory: the
 * kernel side is tested in tests/proxy_xdp_test.ts.
 */
import assert from "node:assert/strict";
import type { XdpBlock, XdpBlockResult } from "../src/ebpf/xdp.ts";
import { SourceBlocker } from "../src/ebpf/xdpblock.ts";

/** A block set in memory with a capacity; `now` is moved by hand. */
class FakeSet {
  readonly entries = new Map<string, number>();
  readonly calls: [string, number][] = [];
  now = 0;
  constructor(readonly capacity = 10) {}
  block(source: string, ms: number): XdpBlockResult {
    this.calls.push([source, ms]);
    const known = this.entries.has(source);
    if (!known && this.entries.size >= this.capacity) return "full";
    this.entries.set(source, this.now + ms);
    return known ? "extended" : "blocked";
  }
  unblock(source: string): boolean {
    return this.entries.delete(source);
  }
  sweepBlocked(): string[] {
    const gone = [...this.entries].filter(([, until]) => until <= this.now).map(([s]) => s);
    for (const s of gone) this.entries.delete(s);
    return gone;
  }
  blocked(): XdpBlock[] {
    return [...this.entries].map(([source, until]) => ({
      source,
      expiresInMs: Math.max(0, until - this.now),
      hits: 0,
    }));
  }
}

const settings = { after: 3, windowMs: 1000, blockMs: 5000, maxEntries: 10 };

Deno.test("the after-th offence within the window blocks the source once, for block_ms", () => {
  const set = new FakeSet();
  const b = new SourceBlocker(set, settings);
  try {
    assert.equal(b.offence("192.0.2.1", "bad_client_hello", 0), false);
    assert.equal(b.offence("192.0.2.1", "source_rate", 100), false);
    assert.equal(b.offence("192.0.2.2", "source_rate", 150), false, "another source counts apart");
    assert.equal(b.offence("192.0.2.1", "source_connections", 200), true);
    assert.deepEqual(set.calls, [["192.0.2.1", 5000]]);
    // offences from a blocked source (connections accepted before the block) change nothing
    for (let i = 0; i < 5; i++) {
      assert.equal(b.offence("192.0.2.1", "bad_client_hello", 300), false);
    }
    assert.equal(set.calls.length, 1);
    const snap = b.snapshot();
    assert.equal(snap.blocked_total, 1);
    assert.equal(snap.blocked_sources, 1);
    assert.deepEqual(snap.blocked["192.0.2.1"], { seconds_left: 5, hits: 0 });

    // expiry: the sweep lifts it, and counting starts over
    set.now = 5000;
    b.sweep(5200);
    assert.equal(b.snapshot().blocked_sources, 0);
    assert.equal(b.offence("192.0.2.1", "bad_client_hello", 5300), false);
    assert.equal(b.snapshot().blocked_total, 1);
  } finally {
    b.close();
  }
});

Deno.test("offences spread wider than window_ms never block; stale counts are swept", () => {
  const set = new FakeSet();
  const b = new SourceBlocker(set, settings);
  try {
    for (let t = 0; t < 10_000; t += 600) b.offence("2001:db8::1", "source_rate", t);
    assert.equal(set.calls.length, 0);
    assert.equal(b.tracked, 1);
    b.sweep(20_000);
    assert.equal(b.tracked, 0, "a count older than the window is dropped by the sweep");
  } finally {
    b.close();
  }
});

Deno.test("a full block set is not overrun: the source stays unblocked and counted later", () => {
  const set = new FakeSet(1);
  const b = new SourceBlocker(set, { ...settings, after: 1 });
  try {
    assert.equal(b.offence("192.0.2.1", "source_rate", 0), true);
    assert.equal(b.offence("192.0.2.2", "source_rate", 0), false, "no room");
    assert.equal(b.snapshot().blocked_total, 1);
    assert.deepEqual(Object.keys(b.snapshot().blocked), ["192.0.2.1"]);
  } finally {
    b.close();
  }
});

Deno.test("offences reported in batches add up to the same threshold as one by one", () => {
  const set = new FakeSet();
  const b = new SourceBlocker(set, settings);
  try {
    // two workers' lines: 2 offences, then 1 more
    assert.equal(b.offence("192.0.2.1", "bad_client_hello", 0, 2), false);
    assert.equal(b.offence("192.0.2.1", "source_rate", 10, 1), true);
    assert.equal(b.offence("192.0.2.2", "bad_client_hello", 10, 5), true, "one line past after");
    assert.deepEqual(set.calls.map(([s]) => s), ["192.0.2.1", "192.0.2.2"]);
    assert.equal(b.offence("192.0.2.1", "bad_client_hello", 20, 7), false, "blocked already");
    assert.equal(b.snapshot().offences_total, 15, "every reported offence is counted");
  } finally {
    b.close();
  }
});

Deno.test("unblock lifts a block at once (any spelling of the address) and resets its count", () => {
  const set = new FakeSet();
  const b = new SourceBlocker(set, settings);
  try {
    for (let i = 0; i < 3; i++) b.offence("2001:db8::7", "bad_client_hello", i);
    b.offence("192.0.2.1", "bad_client_hello", 0, 3);
    assert.equal(b.snapshot().blocked_sources, 2);
    assert.equal(b.unblock("192.0.2.9"), null, "not blocked");
    assert.equal(b.unblock("not an address"), null);
    assert.equal(b.unblock("2001:0db8:0:0::7"), "2001:db8::7");
    assert.equal(b.unblock("::ffff:192.0.2.1"), "192.0.2.1", "IPv4-mapped IPv6 is the same");
    assert.deepEqual(b.snapshot().blocked, {});
    assert.equal(set.entries.size, 0, "gone from the block set");
    assert.equal(b.unblock("192.0.2.1"), null, "once");
    // counting starts over: two offences do not block again
    assert.equal(b.offence("192.0.2.1", "bad_client_hello", 100, 2), false);
    assert.equal(b.offence("192.0.2.1", "bad_client_hello", 110), true);
    assert.equal(b.snapshot().blocked_total, 3);
  } finally {
    b.close();
  }
});
