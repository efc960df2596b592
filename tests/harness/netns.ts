/**
 * Network namespaces (root) and traffic in them: `ip` commands, and the restart-traffic fixture
 * (an echo backend and client loops) run in a namespace.
 *
 * @module
 */
import { lines } from "../../src/net/bytes.ts";
import { ROOT, type Scope, within } from "./scope.ts";

/** Runs `ip ARGS`; throws with its stderr when it fails. */
export async function ip(...args: string[]): Promise<void> {
  const out = await new Deno.Command("ip", { args, stderr: "piped" }).output();
  if (!out.success) {
    throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
  }
}

/**
 * A network namespace of the running test (`sni-TAG-PID`) with its loopback up, removed when
 * `scope` closes; returns its `ip netns exec` wrapper.
 */
export async function testNamespace(scope: Scope, tag: string): Promise<string[]> {
  const ns = `sni-${tag}-${Deno.pid}`;
  await ip("netns", "del", ns).catch(() => {});
  await ip("netns", "add", ns);
  scope.defer(() => ip("netns", "del", ns));
  await ip("-n", ns, "link", "set", "lo", "up");
  return ["ip", "netns", "exec", ns];
}

/** Runs `cmd` and asserts it succeeds (its stderr in the message); returns its stdout. */
export async function runChecked(cmd: string[]): Promise<string> {
  const out = await new Deno.Command(cmd[0], { args: cmd.slice(1), stderr: "piped" }).output();
  const text = (b: Uint8Array) => new TextDecoder().decode(b);
  if (!out.success) throw new Error(`${cmd.join(" ")}: ${text(out.stderr)}`);
  return text(out.stdout);
}

/**
 * tests/fixtures/restart_traffic.ts run by `wrapper` (`ip netns exec NS`) with `args`: its echo
 * backend (its port, or null) and client loops (`start` them against a proxy, `stop` them for
 * their result). Killed when the scope closes.
 */
export async function traffic(s: Scope, wrapper: string[], args: string[] = []) {
  const child = new Deno.Command(wrapper[0], {
    args: [
      ...wrapper.slice(1),
      Deno.execPath(),
      "run",
      "-A",
      `${ROOT}tests/fixtures/restart_traffic.ts`,
      ...args,
    ],
    cwd: ROOT,
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  s.defer(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
  });
  const output = lines(child.stdout);
  const line = async () => {
    const { value, done } = await output.next();
    if (done) throw new Error("the traffic fixture ended early");
    return JSON.parse(value);
  };
  const stdin = child.stdin.getWriter();
  const send = (v: unknown) => stdin.write(new TextEncoder().encode(JSON.stringify(v) + "\n"));
  const { backend } = await within(20_000, "the traffic fixture's backend", line());
  return {
    backend: backend as number | null,
    start: (proxy: number, host?: string) => send({ proxy, host }),
    stop: async () => {
      await send("stop");
      return await within(30_000, "the traffic fixture's result", line()) as {
        connections: number;
        bytes: number;
        errors: string[];
      };
    },
  };
}

/** One client's outcome from tests/fixtures/refused_clients.ts. */
export interface FixtureClient {
  /** The bytes it read, in hex. */
  got: string;
  /** How its read ended: `eof`, `timeout`, or the error's name. */
  end: string;
  /** When, in ms after connecting. */
  ms: number;
}

/**
 * tests/fixtures/refused_clients.ts run by `wrapper`: `count` clients at once to
 * 127.0.0.1:`port`, each sending a hello for `name` with `extra` bytes behind it (`kind`
 * `grow`: a ~120 KB hello; `http`: a ~120 KB HTTP head); their outcomes.
 */
export async function fixtureClients(
  wrapper: string[],
  port: number,
  o: { count: number; name: string; extra?: number; kind?: "grow" | "http" },
): Promise<FixtureClient[]> {
  const out = await runChecked([
    ...wrapper,
    Deno.execPath(),
    "run",
    "-A",
    `${ROOT}tests/fixtures/refused_clients.ts`,
    "127.0.0.1",
    String(port),
    String(o.count),
    o.name,
    String(o.extra ?? 0),
    ...(o.kind ? [o.kind] : []),
  ]);
  return JSON.parse(out);
}
