/**
 * The loop's fairness under load: while 200 connections carry bulk both ways through the proxy
 * (userspace mode; the load in processes of its own, bench/duplex.ts), a new connection gets its
 * backend's answer, an idle connection's idle timeout still fires and the admin API (served by
 * Deno's loop, which the socket engine lets run only between its rounds) answers, each in time;
 * the delays are printed.
 *
 * @module
 */
import assert from "node:assert/strict";
import { e2eTest, rawBackend, rawSpliced, readOutcome, sleep, startProxy } from "./harness/mod.ts";
import { DUPLEX_NAME, startDuplexServer } from "../bench/starve.ts";

const BULK = 200;
/**
 * The probes' idle timeout. Not 200 ms: under this load the probe's backend answer itself takes
 * longer than that to pass the proxy (it took up to 4 s before rounds had a time budget), and the probe
 * would be cut before it could start its idle time.
 */
const IDLE_MS = 1000;
/**
 * How late the idle timeout may fire. Measured on the shared 2-core machine with the load
 * generators competing for CPU: 0–101 ms; 3–2125 ms while one round of the loop moved every
 * relay's share of bytes before Deno's timers got a turn.
 */
const MAX_LATE_MS = 500;
/** How long a probe may wait for its backend's answer: measured 21–75 ms (before: 0.2–4.3 s). */
const MAX_ANSWER_MS = 1500;
/**
 * How long an admin request may wait for its reply under the load: 7-173 ms as a rule, once
 * 1.7 s in a full test run on the loaded 2-core host (cause not found; the proxy's loop gives
 * Deno's loop a turn every 2 ms).
 */
const MAX_ADMIN_MS = 2500;

/** One admin API request on the socket at `path`: the reply's delay (ms) and its text. */
async function adminRequest(path: string): Promise<{ ms: number; reply: string }> {
  const t0 = performance.now();
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    await conn.write(new TextEncoder().encode(`{"cmd":"backends"}\n`));
    let reply = "";
    const buf = new Uint8Array(64 * 1024);
    while (!reply.includes("\n")) {
      const n = await conn.read(buf);
      if (n === null) break;
      reply += new TextDecoder().decode(buf.subarray(0, n));
    }
    return { ms: performance.now() - t0, reply };
  } finally {
    conn.close();
  }
}

e2eTest(
  `userspace mode: under ${BULK} duplex bulk transfers a new connection is answered within ` +
    `${MAX_ANSWER_MS} ms, a ${IDLE_MS} ms idle timeout fires within ${MAX_LATE_MS} ms of its ` +
    `time and the admin API answers within ${MAX_ADMIN_MS} ms`,
  async (scope) => {
    const dir = await Deno.makeTempDir({ prefix: "sni-fairness-" });
    scope.defer(() => Deno.remove(dir, { recursive: true }).catch(() => {}));
    const admin = `${dir}/admin.sock`;
    const server = await startDuplexServer();
    scope.defer(() => server.stop());
    const quiet = rawBackend(scope);
    const proxy = await startProxy(scope, {
      listeners: [{ address: "127.0.0.1:0", protocol: "tls" }],
      routes: [
        { match: DUPLEX_NAME, backends: [`127.0.0.1:${server.port}`] },
        { match: "idle.test", backends: [quiet.address] },
      ],
      timeouts: { idle_ms: IDLE_MS },
      ebpf: { enabled: false },
      admin: { socket: admin },
    });
    const load = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--unstable-net",
        new URL("../bench/duplex.ts", import.meta.url).pathname,
        "client",
        String(proxy.port()),
        String(BULK),
        DUPLEX_NAME,
      ],
      stdout: "null",
      stderr: "null",
    }).spawn();
    scope.defer(async () => {
      load.kill("SIGKILL");
      await load.status;
    });
    await sleep(2000);
    const lateness: number[] = [];
    const answers: number[] = [];
    for (let i = 0; i < 10; i++) {
      const s0 = performance.now();
      const { conn } = await rawSpliced(proxy.port(), "idle.test");
      const t0 = performance.now();
      answers.push(t0 - s0);
      const outcome = await readOutcome(conn);
      lateness.push(performance.now() - t0 - IDLE_MS);
      conn.close();
      assert.equal(outcome.kind, "error", JSON.stringify(outcome));
    }
    const adminMs: number[] = [];
    for (let i = 0; i < 10; i++) {
      const { ms, reply } = await adminRequest(admin);
      adminMs.push(ms);
      assert.match(reply, /"backends"/, `admin reply: ${reply}`);
      await sleep(50);
    }
    const adminShown = adminMs.map((x) => x.toFixed(0)).join(" ");
    console.log(`under load: admin request to reply (ms) ${adminShown}`);
    assert.ok(Math.max(...adminMs) <= MAX_ADMIN_MS, `admin replies ${adminShown} ms`);
    const shown = lateness.map((x) => x.toFixed(0)).join(" ");
    const answered = answers.map((x) => x.toFixed(0)).join(" ");
    console.log(`under load: hello to answer (ms) ${answered}; idle timeout late (ms) ${shown}`);
    assert.ok(Math.max(...answers) <= MAX_ANSWER_MS, `hello to answer ${answered} ms`);
    assert.ok(Math.max(...lateness) <= MAX_LATE_MS, `lateness ${shown} ms`);
  },
  { timeoutMs: 120_000 },
);
