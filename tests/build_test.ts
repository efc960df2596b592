/**
 * build.sh: the toolchain check, the BPF objects, and the single binary. The binary needs
 * `deno compile`'s denort runtime, which these machines cannot download: with DENORT_BIN set
 * (or network) the compiled program is run and compared with `deno run`; otherwise the test
 * says loudly that it skipped, and checks that build.sh fails with a message naming DENORT_BIN.
 * A DENORT_BIN that is no denort runtime (the deno CLI, a missing or non-executable file) is
 * refused by name, and leaves ./sni-proxy as it was.
 */
import assert from "node:assert/strict";

const ROOT = new URL("..", import.meta.url).pathname;

async function build(...args: string[]) {
  return await buildWith({}, ...args);
}

async function buildWith(env: Record<string, string>, ...args: string[]) {
  const out = await new Deno.Command("bash", {
    args: [`${ROOT}build.sh`, ...args],
    cwd: ROOT,
    stdin: "null",
    env,
  }).output();
  return {
    code: out.code,
    text: new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr),
  };
}

Deno.test("build.sh --check verifies the toolchain; build.sh builds every BPF object", async () => {
  const check = await build("--check");
  assert.equal(check.code, 0, check.text);
  assert.match(check.text, /toolchain OK/);
  const bpf = await build("bpf");
  assert.equal(bpf.code, 0, bpf.text);
  for (const obj of ["sockmap.bpf.o", "xdp.bpf.o"]) {
    const info = await Deno.stat(`${ROOT}bpf/${obj}`);
    assert.ok(info.size > 1000, `${obj} built`);
  }
});

Deno.test("build.sh binary compiles ./sni-proxy, or fails naming DENORT_BIN when denort is missing", async () => {
  const r = await build("binary");
  if (r.code !== 0) {
    assert.match(r.text, /DENORT_BIN/, r.text);
    console.warn(
      "!!! SKIPPING the compiled-binary run: deno compile could not get its denort runtime " +
        "(no network here); set DENORT_BIN=/path/to/denort to run it",
    );
    return;
  }
  const bin = `${ROOT}sni-proxy`;
  const v = await new Deno.Command(bin, { args: ["--version"] }).output();
  assert.equal(v.code, 0);
  const check = await new Deno.Command(bin, { args: ["--check", "--config", `${ROOT}config.json`] })
    .output();
  assert.equal(check.code, 0, new TextDecoder().decode(check.stderr));
  // the embedded BPF object is found the same way as under deno run
  const dir = await Deno.makeTempDir();
  await Deno.writeTextFile(
    `${dir}/c.json`,
    JSON.stringify({
      listeners: [{ address: "127.0.0.1:0" }],
      routes: [{ match: "a.test", backends: ["127.0.0.1:9"] }],
      log: { file: false, access_log: false },
      ebpf: { enabled: true, sockmap_enabled: true, splice_mode: "sockmap" },
    }),
  );
  const p = new Deno.Command(bin, { args: ["--config", `${dir}/c.json`], stderr: "piped" }).spawn();
  const reader = p.stderr.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("ready: ")) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  p.kill("SIGTERM");
  await p.status;
  if (Deno.uid() === 0) assert.match(text, /mode kernel/, text);
  assert.doesNotMatch(text, /no_object|cannot read/, text);
});

/** What ./sni-proxy is now (absent, or its inode and mtime): build.sh must not change it on failure. */
async function binaryState(): Promise<string> {
  try {
    const st = await Deno.lstat(`${ROOT}sni-proxy`);
    return `inode ${st.ino} mtime ${st.mtime?.getTime()} size ${st.size}`;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return "absent";
    throw e;
  }
}

async function assertNoScratch() {
  await assert.rejects(Deno.lstat(`${ROOT}.sni-proxy.build`), Deno.errors.NotFound);
}

Deno.test("build.sh binary refuses the deno CLI as DENORT_BIN and leaves no ./sni-proxy behind", async () => {
  // the real deno binary (the .bin entry is a symlink to it), as an operator would point at it
  const cli = await Deno.realPath(Deno.execPath());
  const before = await binaryState();
  const r = await buildWith({ DENORT_BIN: cli }, "binary");
  assert.notEqual(r.code, 0, r.text);
  assert.ok(r.text.includes(`DENORT_BIN=${cli} is the deno CLI, not denort`), r.text);
  assert.doesNotMatch(r.text, /built \.\/sni-proxy/, r.text);
  assert.equal(await binaryState(), before, "./sni-proxy unchanged");
  await assertNoScratch();
});

Deno.test("build.sh binary names a missing or non-executable DENORT_BIN before compiling", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const before = await binaryState();
    const missing = await buildWith({ DENORT_BIN: `${dir}/denort` }, "binary");
    assert.notEqual(missing.code, 0, missing.text);
    assert.match(missing.text, new RegExp(`DENORT_BIN=${dir}/denort does not exist`), missing.text);
    await Deno.writeFile(`${dir}/denort`, new Uint8Array([0x7f, 0x45, 0x4c, 0x46]), {
      mode: 0o644,
    });
    const notExec = await buildWith({ DENORT_BIN: `${dir}/denort` }, "binary");
    assert.notEqual(notExec.code, 0, notExec.text);
    assert.match(
      notExec.text,
      new RegExp(`DENORT_BIN=${dir}/denort is not executable`),
      notExec.text,
    );
    const isDir = await buildWith({ DENORT_BIN: dir }, "binary");
    assert.notEqual(isDir.code, 0, isDir.text);
    assert.match(isDir.text, new RegExp(`DENORT_BIN=${dir} is not a file`), isDir.text);
    for (const r of [missing, notExec, isDir]) {
      assert.doesNotMatch(r.text, /Compile|built \.\/sni-proxy/);
    }
    assert.equal(await binaryState(), before, "./sni-proxy unchanged");
    await assertNoScratch();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
