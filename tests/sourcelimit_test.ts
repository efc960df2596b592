import assert from "node:assert/strict";
import { resolveConfig } from "../src/config/mod.ts";
import { SourceLimiter } from "../src/conn/sourcelimit.ts";
import { workerConfig } from "../src/run/worker.ts";

Deno.test("per-source live connections: refused at the limit, admitted again on release", () => {
  const s = new SourceLimiter();
  const limits = { maxConnections: 2, newPerSecond: null, burst: 1 };
  assert.equal(s.admit("10.0.0.1", limits), null);
  assert.equal(s.admit("10.0.0.1", limits), null);
  assert.equal(s.admit("10.0.0.1", limits), "source_connections");
  assert.equal(s.admit("10.0.0.2", limits), null, "another source has its own count");
  s.release("10.0.0.1");
  assert.equal(s.admit("10.0.0.1", limits), null);
  for (const ip of ["10.0.0.1", "10.0.0.1", "10.0.0.2"]) s.release(ip);
  assert.equal(s.size, 0, "without a rate limit an idle source is forgotten at once");
  s.close();
});

Deno.test("per-source new connections: a burst, then the rate; refusals take no token", () => {
  const s = new SourceLimiter();
  const limits = { maxConnections: null, newPerSecond: 2, burst: 3 };
  let t = 1000;
  const admit = () => {
    const r = s.admit("192.0.2.7", limits, t);
    if (r === null) s.release("192.0.2.7");
    return r;
  };
  assert.deepEqual([admit(), admit(), admit(), admit()], [null, null, null, "source_rate"]);
  t += 499;
  assert.equal(admit(), "source_rate", "0.998 tokens after 499 ms at 2/s");
  t += 1;
  assert.equal(admit(), null, "one token after 500 ms");
  t += 10_000;
  assert.deepEqual([admit(), admit(), admit(), admit()], [null, null, null, "source_rate"]);
  s.close();
});

Deno.test("the sweep forgets sources whose bucket refilled and that hold no connection", () => {
  const s = new SourceLimiter();
  const limits = { maxConnections: 5, newPerSecond: 1, burst: 2 };
  assert.equal(s.admit("a", limits, 0), null);
  assert.equal(s.admit("b", limits, 0), null);
  s.release("b");
  s.sweep(999);
  assert.equal(s.size, 2, "b's bucket is not full yet; a holds a connection");
  s.sweep(1000);
  assert.equal(s.size, 1, "b forgotten");
  s.release("a");
  s.sweep(5000);
  assert.equal(s.size, 0);
});

Deno.test("with several workers each takes its share of the per-source limits", () => {
  const config = resolveConfig({
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [],
    limits: { per_source: { max_connections: 5, new_per_second: 3, burst: 7 } },
  }, "/c.json");
  const worker = workerConfig(config, { index: 1, count: 2, kernel: null, ports: [8443] });
  assert.deepEqual(worker.limits.perSource, { maxConnections: 3, newPerSecond: 1.5, burst: 4 });
  const connectionsOnly = resolveConfig({
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [],
    limits: { per_source: { max_connections: 5 } },
  }, "/c.json");
  assert.deepEqual(
    workerConfig(connectionsOnly, { index: 1, count: 2, kernel: null, ports: [8443] }).limits
      .perSource,
    { maxConnections: 3, newPerSecond: null, burst: 1 },
  );
});
