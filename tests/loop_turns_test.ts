/**
 * When the socket engine's loop lets Deno's loop run while it is busy: at its regular turn
 * (every 10 ms), and when a timer the data path waits on is due (`turnWithin`, e.g. a kernel
 * relay's drain poll), which must not wait for the regular turn. The loop is kept busy by two
 * engine sockets passing a byte back and forth.
 *
 * @module
 */
import assert from "node:assert/strict";
import type { EventLoop } from "../src/io/loop.ts";
import { enginePair, engineTest, until } from "./harness/engine.ts";

/** How late (ms) each of `n` 2 ms timers fires on `loop`; `announce`: told via turnWithin. */
async function lateness(loop: EventLoop, n: number, announce: boolean): Promise<number[]> {
  const late: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = performance.now();
    if (announce) loop.turnWithin(2);
    await new Promise((r) => setTimeout(r, 2));
    late.push(performance.now() - t0 - 2);
  }
  return late.sort((a, b) => a - b);
}

engineTest(
  "while the loop is busy, a timer announced with turnWithin fires about when due, an " +
    "unannounced one waits for the loop's regular turn, and a sleep on the loop's clock ends " +
    "when due without a turn of Deno's loop",
  async (rig) => {
    const loop = rig.loop;
    const { a, b } = await enginePair(rig);
    const one = new Uint8Array(1);
    let bounces = 0;
    let stop = false;
    // each end sends back the byte it reads: an event every few µs, the loop never idles
    const bounce = (sock: typeof a) => () => {
      while (sock.readable && !stop) {
        const n = sock.recv(one);
        if (n <= 0) return;
        bounces++;
        sock.send(one);
      }
    };
    a.setHandler(bounce(a));
    b.setHandler(bounce(b));
    rig.defer(() => {
      stop = true;
    });
    a.send(one);
    await until("the byte bounces", () => bounces > 1000);
    const quiet = await lateness(loop, 30, false);
    const told = await lateness(loop, 30, true);
    const slept: number[] = [];
    const waits = loop.stats.waits;
    for (let i = 0; i < 30; i++) {
      const t0 = performance.now();
      await loop.sleep(2);
      slept.push(performance.now() - t0 - 2);
    }
    slept.sort((x, y) => x - y);
    const turns = loop.stats.waits - waits;
    const median = (x: number[]) => x[x.length >> 1];
    const show = (x: number[]) => x.map((v) => v.toFixed(1)).join(" ");
    console.log(`timers late (ms), announced: ${show(told)}; not: ${show(quiet)}`);
    console.log(`sleeps on the loop's clock late (ms): ${show(slept)}; turns meanwhile ${turns}`);
    assert.ok(median(slept) <= 1.5, `sleeps late by ${show(slept)} ms`);
    // 30 sleeps of 2 ms: about 60 ms, six regular turns, none for the sleeps
    assert.ok(turns <= 12, `${turns} turns of Deno's loop for 30 sleeps`);
    assert.ok(bounces > 10_000, `the loop was not busy: ${bounces} bounces`);
    assert.ok(median(told) <= 4, `announced timers late by ${show(told)} ms`);
    assert.ok(median(told) < median(quiet), `announced ${show(told)}, not ${show(quiet)}`);
  },
);

engineTest(
  "a sleep on the loop's clock while the loop is idle ends when due, not after the idle wait",
  async (rig) => {
    const { a } = await enginePair(rig); // watched: the loop runs
    a.setHandler(() => {});
    await until("the loop waits off-thread", () => rig.loop.stats.waits > 0);
    for (const ms of [1, 5, 20]) {
      const t0 = performance.now();
      await rig.loop.sleep(ms);
      const took = performance.now() - t0;
      assert.ok(took >= ms - 0.5 && took < ms + 50, `sleep(${ms}) took ${took.toFixed(1)} ms`);
    }
  },
);
