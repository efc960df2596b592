/**
 * What a new connection costs the proxy in syscalls, against the real proxy (started as the
 * benchmark starts it), the benchmark's nginx behind it and wrk in front: 20 clients each making
 * one HTTPS request per connection (`Connection: close`) for 3 s, with `strace -c -f` attached to
 * every thread of the proxy. The syscalls per request must stay within the bound each mode
 * reached (nginx stream, measured the same way: 21.1), so that a change that adds a syscall to
 * every connection fails here rather than in the next benchmark.
 *
 * @module
 */
import assert from "node:assert/strict";
import { startNginx } from "../bench/nginx.ts";
import { PROXY_MODES, startProxy } from "../bench/proxy.ts";
import { e2eTest, kernelSkipReason, type Scope, straceDuring } from "./harness/mod.ts";

const KERNEL_SKIP = await kernelSkipReason();
if (KERNEL_SKIP) {
  console.warn(
    `\n!!! SKIPPING the kernel-mode case of tests/syscalls_per_conn_test.ts: ${KERNEL_SKIP}\n`,
  );
}

/**
 * The most syscalls a request on a new connection may cost, all threads (measured under strace
 * on the 2-core machine: userspace 21.6–22.0, kernel 21.7–22.1; before this bound 22.7 and 22.9,
 * the yields to Deno's loop every 2 ms and a V8 that woke its GC threads for every scavenge).
 */
const BOUND: Record<string, number> = { userspace: 22.4, kernel: 22.4 };

/** One wrk run of new connections against `port`; the requests it completed. */
async function wrk(port: number, seconds: number): Promise<number> {
  const out = await new Deno.Command("wrk", {
    args: [
      "-t1",
      "-c20",
      `-d${seconds}s`,
      "-H",
      "Connection: close",
      `https://localhost:${port}/small`,
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  const m = /(\d+) requests in/.exec(text);
  assert.ok(out.success && m, `wrk failed:\n${text}${new TextDecoder().decode(out.stderr)}`);
  assert.doesNotMatch(text, /Non-2xx/, `wrk saw errors:\n${text}`);
  return Number(m[1]);
}

/** strace -c's table: calls per syscall, and the total. */
function callCounts(table: string): { total: number; by: Map<string, number> } {
  const by = new Map<string, number>();
  let total = 0;
  for (const line of table.split("\n")) {
    // "  31.05    0.123456          12     10234      3412 recvfrom" (errors may be blank)
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$/.exec(line);
    if (!m) continue;
    if (m[2] === "total") total = Number(m[1]);
    else by.set(m[2], Number(m[1]));
  }
  return { total, by };
}

/** Starts nginx and the proxy in `mode`, then counts the syscalls per request of a wrk run. */
async function perRequest(scope: Scope, mode: string): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "sni-syscalls-" });
  scope.defer(() => Deno.remove(dir, { recursive: true }).catch(() => {}));
  const nginx = await startNginx(dir, 1 << 20);
  scope.defer(() => nginx.stop());
  const proxy = await startProxy(
    dir,
    { port: nginx.port },
    PROXY_MODES.find((m) => m.name === mode)!,
  );
  scope.defer(() => proxy.stop());
  await wrk(proxy.port, 1); // warm: JIT, connection slots, the backend's workers
  let requests = 0;
  const table = await straceDuring(scope, proxy.pid, ["-c"], async () => {
    requests = await wrk(proxy.port, 3);
  });
  const { total, by } = callCounts(table);
  const per = total / requests;
  const top = [...by].sort((a, b) => b[1] - a[1]).slice(0, 14)
    .map(([name, n]) => `${name} ${(n / requests).toFixed(2)}`).join(", ");
  console.log(`${mode}: ${requests} requests, ${per.toFixed(2)} syscalls each (${top})`);
  assert.ok(requests >= 200, `only ${requests} requests`);
  assert.ok(
    per <= BOUND[mode],
    `${per.toFixed(2)} syscalls per request (bound ${BOUND[mode]}): ${top}`,
  );
}

e2eTest(
  `userspace mode: a request on a new connection costs at most ${BOUND.userspace} syscalls ` +
    "(wrk -c20 Connection: close, strace -c of every thread)",
  (scope) => perRequest(scope, "userspace"),
  { timeoutMs: 90_000 },
);

e2eTest(
  `kernel mode (pipes): a request on a new connection costs at most ${BOUND.kernel} syscalls ` +
    "(wrk -c20 Connection: close, strace -c of every thread)",
  (scope) => perRequest(scope, "kernel"),
  { timeoutMs: 90_000, ignore: KERNEL_SKIP !== null },
);
