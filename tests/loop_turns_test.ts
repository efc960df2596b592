/**
 * A sleep on the socket engine's own clock (a kernel relay's drain poll): ends when due while
 * the loop is busy (kept busy by two engine sockets passing a byte back and forth), sooner than
 * a timer of Deno's loop, and while it is idle, not after its idle wait.
 *
 * @module
 */
import assert from "node:assert/strict";
import { enginePair, engineTest, until } from "./harness/engine.ts";

engineTest(
  "while the loop is busy, a sleep on the loop's clock ends when due, sooner than a timer",
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
    const slept: number[] = [];
    for (let i = 0; i < 30; i++) {
      const t0 = performance.now();
      await loop.sleep(2);
      slept.push(performance.now() - t0 - 2);
    }
    slept.sort((x, y) => x - y);
    const timers: number[] = [];
    for (let i = 0; i < 30; i++) {
      const t0 = performance.now();
      await new Promise((r) => setTimeout(r, 2));
      timers.push(performance.now() - t0 - 2);
    }
    timers.sort((x, y) => x - y);
    const median = (x: number[]) => x[x.length >> 1];
    const show = (x: number[]) => x.map((v) => v.toFixed(1)).join(" ");
    console.log(`late (ms): sleeps on the loop's clock ${show(slept)}; timers ${show(timers)}`);
    // a timer fires on the millisecond tick after it is due, at a turn of Deno's loop
    assert.ok(median(slept) < 0.8, `sleeps late by ${show(slept)} ms`);
    assert.ok(median(slept) < median(timers), `sleeps ${show(slept)}, timers ${show(timers)}`);
    assert.ok(bounces > 10_000, `the loop was not busy: ${bounces} bounces`);
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
