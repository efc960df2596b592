/**
 * Idle timeouts swept by one interval (src/io/idle.ts): when they fire, what postpones them,
 * and that the sweep stops once none is watched.
 */
import assert from "node:assert/strict";
import { IdleSweep, IdleTimeout } from "../src/io/idle.ts";
import { sleep } from "./harness/mod.ts";

Deno.test("an idle timeout fires once, between idleMs and idleMs plus the sweep's tick", async () => {
  const sweep = new IdleSweep();
  const t0 = Date.now();
  const fired: number[] = [];
  const t = new IdleTimeout(200, () => fired.push(Date.now() - t0), null, sweep);
  t.start();
  assert.equal(sweep.tickMs, 25, "an eighth of the shortest timeout");
  await sleep(500);
  assert.equal(fired.length, 1, "fired once");
  assert.ok(fired[0] >= 200 && fired[0] < 200 + 25 + 60, `fired after ${fired[0]} ms`);
  assert.equal(sweep.size, 0, "no longer watched");
});

Deno.test("touch() and bytes moved elsewhere postpone an idle timeout; clear() stops it", async () => {
  const sweep = new IdleSweep();
  let idle = 0;
  const touched = new IdleTimeout(150, () => idle++, null, sweep);
  let moved = 0;
  const spliced = new IdleTimeout(150, () => idle++, () => moved, sweep);
  const cleared = new IdleTimeout(150, () => idle += 100, null, sweep);
  touched.start();
  spliced.start();
  cleared.start();
  cleared.clear();
  for (let i = 0; i < 6; i++) {
    await sleep(60);
    touched.touch();
    moved++;
  }
  assert.equal(idle, 0, "nothing fired while activity went on (360 ms, timeouts of 150)");
  await sleep(400);
  assert.equal(idle, 2, "both fired once activity stopped; the cleared one never");
  assert.equal(sweep.size, 0);
});

Deno.test("10,000 idle timeouts share one sweep and all fire in time", async () => {
  const sweep = new IdleSweep();
  let fired = 0;
  const t0 = Date.now();
  let last = 0;
  for (let i = 0; i < 10_000; i++) {
    new IdleTimeout(
      300,
      () => {
        fired++;
        last = Date.now() - t0;
      },
      null,
      sweep,
    ).start();
  }
  assert.equal(sweep.size, 10_000);
  await sleep(600);
  assert.equal(fired, 10_000);
  assert.ok(last < 300 + 37 + 150, `the last fired after ${last} ms`);
  assert.equal(sweep.size, 0, "the sweep's interval is gone with the last timeout");
});
