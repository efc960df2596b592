/**
 * The README's quick start: on a checkout without Deno, `./run start` and `./run test` install
 * what they need and run; `.ci/run` uses the same test command.
 */
import assert from "node:assert/strict";
import { e2eTest, ROOT } from "./harness/mod.ts";

const decoder = new TextDecoder();

/** The commands of the README's quick-start block (comments dropped). */
async function quickStart(): Promise<string[]> {
  const readme = await Deno.readTextFile(`${ROOT}README.md`);
  const section = readme.slice(readme.indexOf("## Quick start"));
  const block = /```sh\n([\s\S]*?)```/.exec(section)?.[1] ?? "";
  return block.split("\n").map((l) => l.replace(/#.*$/, "").trim()).filter(Boolean);
}

Deno.test("the quick start is two commands, and CI runs its test command", async () => {
  const commands = await quickStart();
  assert.deepEqual(commands, ["./run start", "./run test"]);
  const ci = await Deno.readTextFile(`${ROOT}.ci/run`);
  assert.match(ci, /^NO_COLOR=1 \.\/run test 2>&1 \| tee "\$log"/m);
  // and the last line it prints stays the plain summary
  assert.match(
    ci,
    /echo "\$\(count passed\) passed, \$\(count failed\) failed"\nexit "\$status"\n$/,
  );
});

/** Runs `cmd` in `cwd` with `env` (nothing else inherited but the npm cache's HOME). */
async function run(cmd: string[], cwd: string, env: Record<string, string>) {
  const o = await new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    cwd,
    env,
    clearEnv: true,
    stdin: "null",
  }).output();
  return { code: o.code, out: decoder.decode(o.stdout) + decoder.decode(o.stderr) };
}

e2eTest(
  "on a checkout without deno, `./run start` and `./run test` install it into .tools/ and run",
  async (s) => {
    const commands = await quickStart();
    // a fresh checkout: the tracked files only, no .tools/ or node_modules/
    const dir = await Deno.makeTempDir({ prefix: "sni-checkout-" });
    s.defer(() => Deno.remove(dir, { recursive: true }));
    const files = decoder.decode(
      (await new Deno.Command("git", { args: ["-C", ROOT, "ls-files", "-z"] }).output()).stdout,
    ).split("\0").filter(Boolean);
    assert.ok(files.includes("run"), "./run is tracked");
    for (const f of files) {
      await Deno.mkdir(`${dir}/${f}`.replace(/\/[^/]*$/, ""), { recursive: true });
      await Deno.copyFile(`${ROOT}${f}`, `${dir}/${f}`);
    }
    // no deno on PATH: only the system's directories
    const env = {
      PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
      HOME: Deno.env.get("HOME") ?? "/root",
      NO_COLOR: "1",
    };
    const which = await run(["sh", "-c", "command -v deno || echo none"], dir, env);
    assert.equal(which.out.trim(), "none", "this test needs a PATH without deno");

    // the start command, with --check so that it ends: it installs deno and reads config.json
    const start = await run([...commands[0].split(" "), "--check"], dir, env);
    assert.equal(start.code, 0, start.out);
    assert.match(start.out, /installing deno 2\.9 from npm into \.tools\//);
    assert.match(start.out, /config OK/);
    const deno = await run([`${dir}/.tools/node_modules/.bin/deno`, "--version"], dir, env);
    assert.match(deno.out, /^deno 2\.9\./);

    // the test command (on one file: the whole suite runs this test), with the deno it installed
    const test = await run([...commands[1].split(" "), "tests/router_test.ts"], dir, env);
    assert.equal(test.code, 0, test.out);
    assert.doesNotMatch(test.out, /installing deno/);
    assert.match(test.out, /ok \| \d+ passed \| 0 failed/);
  },
  { timeoutMs: 300_000 },
);
