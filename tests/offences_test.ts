/**
 * A worker's offence reports to its supervisor (src/run/offences.ts): batched, bounded whatever
 * the flood, drops counted, and counted by the supervisor as if seen in one process. End to end
 * with workers and XDP: tests/proxy_xdp_test.ts.
 */
import assert from "node:assert/strict";
import type { XdpBlock, XdpBlockResult } from "../src/ebpf/xdp.ts";
import { SourceBlocker } from "../src/ebpf/xdpblock.ts";
import { countOffences, type OffenceLine, OffenceReporter } from "../src/run/offences.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A reporter whose lines are kept (and measured as the pipe would carry them). */
function reporter(options: { flushMs?: number; maxSources?: number } = {}) {
  const lines: OffenceLine[] = [];
  const bytes: number[] = [];
  const r = new OffenceReporter({
    ...options,
    send: (line) => {
      lines.push(line);
      bytes.push(JSON.stringify(line).length + 1);
    },
  });
  return { r, lines, bytes };
}

Deno.test("a flood from one source is one entry of one line: its offences counted, not listed", () => {
  const { r, lines } = reporter();
  try {
    for (let i = 0; i < 100_000; i++) r.offence("192.0.2.1", "bad_client_hello");
    r.offence("192.0.2.1", "source_rate");
    assert.equal(lines.length, 0, "nothing is sent before the wait ends");
    assert.equal(r.queued, 1);
    r.flush();
    assert.deepEqual(lines, [{ t: "offences", o: [["192.0.2.1", "source_rate", 100_001]] }]);
    assert.equal(r.reported, 100_001);
    assert.equal(r.dropped, 0);
    r.flush();
    assert.equal(lines.length, 1, "an empty queue sends nothing");
  } finally {
    r.close();
  }
});

Deno.test("the queue holds maxSources sources: offences of more are dropped and counted", () => {
  const { r, lines, bytes } = reporter({ maxSources: 1024 });
  try {
    // the longest text a source can have
    const source = (i: number) => `ffff:ffff:ffff:ffff:ffff:ffff:ffff:${i.toString(16)}`;
    for (let i = 0; i < 50_000; i++) r.offence(source(i), "source_connections");
    for (let i = 0; i < 10; i++) r.offence(source(0), "source_connections"); // queued: counted
    assert.equal(r.queued, 1024);
    assert.equal(r.dropped, 50_000 - 1024);
    assert.deepEqual(r.snapshot(), { offences_dropped: 50_000 - 1024 });
    r.flush();
    assert.equal(lines.length, 1);
    assert.equal(lines[0].o.length, 1024);
    assert.equal(lines[0].o[0][2], 11);
    assert.ok(bytes[0] < 80 * 1024, `one line is bounded: ${bytes[0]} bytes`);
    // the next batch has room again
    r.offence(source(99_999), "bad_client_hello");
    assert.equal(r.queued, 1);
    assert.equal(r.dropped, 50_000 - 1024);
  } finally {
    r.close();
  }
});

Deno.test("a flood lasting many waits sends at most one line per wait, and loses nothing queued", async () => {
  const flushMs = 20;
  const { r, lines } = reporter({ flushMs, maxSources: 64 });
  const started = performance.now();
  let sent = 0;
  try {
    for (let round = 0; round < 25; round++) {
      for (let i = 0; i < 2_000; i++) {
        r.offence(`198.51.100.${i % 100}`, "bad_client_hello");
        sent++;
      }
      await sleep(4);
    }
  } finally {
    r.close();
  }
  const elapsed = performance.now() - started;
  assert.ok(
    lines.length <= Math.ceil(elapsed / flushMs) + 1,
    `${lines.length} lines in ${elapsed.toFixed(0)} ms`,
  );
  assert.ok(lines.length >= 2, "a long flood is sent as it goes, not at the end only");
  assert.ok(lines.every((l) => l.o.length <= 64));
  const carried = lines.flatMap((l) => l.o).reduce((n, [, , c]) => n + c, 0);
  assert.equal(carried, r.reported);
  assert.equal(carried + r.dropped, sent, "every offence is either sent or counted as dropped");
  assert.ok(r.dropped > 0, "100 sources do not fit a queue of 64");
  r.offence("198.51.100.1", "bad_client_hello");
  assert.equal(r.queued, 0, "closed: nothing more is queued");
});

/** A block set in memory. */
class MemorySet {
  readonly entries = new Map<string, number>();
  block(source: string, ms: number): XdpBlockResult {
    const known = this.entries.has(source);
    this.entries.set(source, ms);
    return known ? "extended" : "blocked";
  }
  unblock(source: string): boolean {
    return this.entries.delete(source);
  }
  sweepBlocked(): string[] {
    return [];
  }
  blocked(): XdpBlock[] {
    return [...this.entries.keys()].map((source) => ({ source, expiresInMs: 1000, hits: 0 }));
  }
}

Deno.test("the supervisor counts two workers' lines as one process would: the threshold is shared", () => {
  const set = new MemorySet();
  const blocker = new SourceBlocker(set, {
    after: 5,
    windowMs: 10_000,
    blockMs: 1000,
    maxEntries: 9,
  });
  const one = reporter();
  const two = reporter();
  try {
    for (let i = 0; i < 2; i++) one.r.offence("203.0.113.5", "bad_client_hello");
    for (let i = 0; i < 2; i++) two.r.offence("203.0.113.5", "source_rate");
    one.r.flush();
    two.r.flush();
    for (const line of [...one.lines, ...two.lines]) countOffences(blocker, line);
    assert.equal(set.entries.size, 0, "4 of 5: neither worker alone, nor both, reached it yet");
    two.r.offence("203.0.113.5", "bad_client_hello");
    two.r.flush();
    countOffences(blocker, two.lines[1]);
    assert.deepEqual([...set.entries.keys()], ["203.0.113.5"], "the 5th, from either, blocks");
    assert.equal(blocker.snapshot().offences_total, 5);

    // what a worker sends is checked: malformed entries are skipped, not thrown on
    countOffences(blocker, {
      t: "offences",
      o: [
        ["203.0.113.6", "bogus", 9],
        ["203.0.113.6", "bad_client_hello", -1],
        ["203.0.113.6", "bad_client_hello", 1.5],
        [7, "bad_client_hello", 9],
      ],
    } as unknown as OffenceLine);
    countOffences(blocker, { t: "offences" } as unknown as OffenceLine);
    assert.equal(blocker.snapshot().offences_total, 5);
  } finally {
    one.r.close();
    two.r.close();
    blocker.close();
  }
});
