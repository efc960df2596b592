/**
 * The shared deadline queues behind the sessions' hello and connect timeouts
 * (src/io/deadlines.ts): they fire in time and in order, a cancelled one never fires, and a
 * queue with nothing live holds no entry and keeps no process alive.
 */
import assert from "node:assert/strict";
import { DeadlineQueue } from "../src/io/deadlines.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

Deno.test("deadlines fire in the order they were set, not before their time", async () => {
  const q = new DeadlineQueue(40);
  const fired: [number, number][] = [];
  const t0 = performance.now();
  for (let i = 0; i < 5; i++) {
    q.add(() => fired.push([i, performance.now() - t0]));
    await sleep(5);
  }
  await sleep(120);
  assert.deepEqual(fired.map(([i]) => i), [0, 1, 2, 3, 4]);
  for (const [i, at] of fired) assert(at >= 40 + i * 5 - 1, `deadline ${i} fired at ${at} ms`);
  assert.deepEqual(q.live, 0);
  assert.deepEqual(q.held, 0);
});

Deno.test("a cancelled deadline never fires; the others still do", async () => {
  const q = new DeadlineQueue(20);
  const fired: number[] = [];
  const ds = [0, 1, 2, 3].map((i) => q.add(() => fired.push(i)));
  ds[0].cancel();
  ds[2].cancel();
  ds[2].cancel(); // twice is harmless
  assert.deepEqual(q.live, 2);
  await sleep(60);
  assert.deepEqual(fired, [1, 3]);
  assert(!ds[1].live);
});

Deno.test("with every deadline cancelled the queue holds nothing and keeps no process alive", () => {
  // the test's sanitizer fails it when a timer that keeps the process alive is left behind
  const q = new DeadlineQueue(60_000);
  const ds = Array.from({ length: 10_000 }, () => q.add(() => {}));
  assert.deepEqual(q.held, 10_000);
  for (const d of ds) d.cancel();
  assert.deepEqual(q.live, 0);
  assert.deepEqual(q.held, 0);
});

Deno.test("a deadline set by a firing one is kept in order and fires in its time", async () => {
  const q = new DeadlineQueue(20);
  const fired: string[] = [];
  q.add(() => {
    fired.push("first");
    q.add(() => fired.push("set by first"));
  });
  q.add(() => fired.push("second"));
  await sleep(30);
  assert.deepEqual(fired, ["first", "second"]);
  await sleep(40);
  assert.deepEqual(fired, ["first", "second", "set by first"]);
});

Deno.test("a deadline that throws does not stop the others", async () => {
  const q = new DeadlineQueue(10);
  const fired: number[] = [];
  const error = console.error;
  console.error = () => {};
  try {
    q.add(() => {
      throw new Error("boom");
    });
    q.add(() => fired.push(2));
    await sleep(40);
  } finally {
    console.error = error;
  }
  assert.deepEqual(fired, [2]);
});

Deno.test("cancelled deadlines are dropped once they outnumber the live ones; the rest fire in order", async () => {
  const q = new DeadlineQueue(30);
  const fired: number[] = [];
  const ds = Array.from({ length: 5000 }, (_, i) => q.add(() => fired.push(i)));
  // an idle timeout is mostly cancelled long before it is due: a connection ended
  const keep = new Set([0, 7, 1234, 2500, 4999]);
  for (let i = 4999; i >= 0; i--) if (!keep.has(i)) ds[i].cancel();
  assert.equal(q.live, keep.size);
  assert.ok(q.held <= 1024, `held ${q.held}`);
  await sleep(80);
  assert.deepEqual(fired, [...keep].sort((a, b) => a - b));
  assert.equal(q.held, 0);
});

Deno.test("a queue emptied and used again fires the new deadline in its own time, not the old one's", async () => {
  const q = new DeadlineQueue(50);
  q.add(() => assert.fail("cancelled deadline fired")).cancel();
  await sleep(30);
  // the first deadline's timer (due in 20 ms) is still armed: it must not fire this one early
  const t0 = performance.now();
  let firedAt = -1;
  q.add(() => firedAt = performance.now() - t0);
  await sleep(35);
  assert.equal(firedAt, -1, "fired at the emptied queue's old time");
  await sleep(40);
  assert(firedAt >= 49, `fired after ${firedAt} ms`);
  assert.deepEqual([q.live, q.held], [0, 0]);
});
