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
  "while the loop is busy, a timer announced with turnWithin fires about when due; an " +
    "unannounced one waits for the loop's regular turn",
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
    const median = (x: number[]) => x[x.length >> 1];
    const show = (x: number[]) => x.map((v) => v.toFixed(1)).join(" ");
    console.log(`timers late (ms), announced: ${show(told)}; not: ${show(quiet)}`);
    assert.ok(bounces > 10_000, `the loop was not busy: ${bounces} bounces`);
    assert.ok(median(told) <= 4, `announced timers late by ${show(told)} ms`);
    assert.ok(median(told) < median(quiet), `announced ${show(told)}, not ${show(quiet)}`);
  },
);
