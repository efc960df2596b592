/**
 * The systemd unit in deploy/ is valid and wires reload and stop to the proxy's signals; the
 * README's install steps give a service that runs under the unit's sandbox.
 */
import assert from "node:assert/strict";
import { assertServesBundled, bundledConfig, e2eTest, ROOT, startProxy } from "./harness/mod.ts";

const unit = await Deno.readTextFile(new URL("../deploy/sni-proxy.service", import.meta.url));
const analyze = await new Deno.Command("systemd-analyze", { args: ["--version"] }).output().then(
  () => true,
  () => false,
);
if (!analyze) console.warn("!!! SKIPPING systemd-analyze verify: systemd-analyze is not installed");

Deno.test({
  name: "deploy/sni-proxy.service passes systemd-analyze verify",
  ignore: !analyze,
  fn: async () => {
    // point ExecStart at an executable that exists here; everything else as shipped
    const dir = await Deno.makeTempDir();
    const path = `${dir}/sni-proxy.service`;
    await Deno.writeTextFile(path, unit.replace(/^ExecStart=\S+/m, "ExecStart=/bin/true"));
    const out = await new Deno.Command("systemd-analyze", { args: ["verify", path] }).output();
    const text = new TextDecoder().decode(out.stderr) + new TextDecoder().decode(out.stdout);
    assert.equal(out.code, 0, text);
    assert.equal(text.trim(), "", text);
  },
});

Deno.test("the unit reloads with SIGHUP, drains on SIGTERM and raises the descriptor limit", () => {
  assert.match(unit, /^ExecReload=\/bin\/kill -HUP \$MAINPID$/m);
  assert.match(unit, /^KillSignal=SIGTERM$/m);
  assert.match(unit, /^LimitNOFILE=\d{5,}$/m);
  assert.match(unit, /^AmbientCapabilities=.*CAP_BPF.*CAP_NET_ADMIN/m);
});

// ---------------------------------------------------------------------------------------------
// The README's install steps, run under the unit's sandbox

/** The commands of the README's "### Install" block, comments dropped, `&&` lists split. */
function readmeInstallSteps(readme: string): string[] {
  const section = readme.slice(readme.indexOf("### Install"));
  const block = /```sh\n([\s\S]*?)```/.exec(section)?.[1] ?? "";
  return block.split("\n").map((l) => l.replace(/#.*$/, "").trim()).filter(Boolean)
    .flatMap((l) => l.split("&&").map((c) => c.trim()));
}

/** The `[Service]` settings of a unit file (the last of a repeated key wins). */
function serviceSettings(text: string): Map<string, string> {
  const settings = new Map<string, string>();
  let inService = false;
  for (const line of text.split("\n")) {
    if (/^\[.*\]$/.test(line.trim())) inService = line.trim() === "[Service]";
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (inService && m) settings.set(m[1], m[2]);
  }
  return settings;
}

/** Settings that change what the service sees of the file system; each must be emulated. */
const SANDBOX =
  /^(Protect\w+|Private\w+|ReadWritePaths|ReadOnlyPaths|InaccessiblePaths|ExecPaths|NoExecPaths|TemporaryFileSystem|Bind\w*Paths|\w+Directory|RootDirectory|RootImage|MountFlags)$/;

/**
 * The shell lines that give a process the file-system view `settings` give the service
 * (ProtectSystem, ProtectHome, PrivateTmp, LogsDirectory, RuntimeDirectory, WorkingDirectory),
 * ending in an `exec` of its ExecStart; throws for a sandbox setting it does not know, so none goes untested.
 */
function unitSandbox(settings: Map<string, string>): string[] {
  const lines: string[] = [];
  const env: string[] = [];
  let cwd = "/";
  const yes = (v: string) => /^(yes|true|1|on)$/.test(v);
  for (const [key, value] of settings) {
    if (!SANDBOX.test(key)) continue;
    if (key === "LogsDirectory" || key === "RuntimeDirectory") {
      const [root, name] = key === "LogsDirectory" ? ["/var/log", "LOGS"] : ["/run", "RUNTIME"];
      const dirs = value.split(/\s+/).map((d) => `${root}/${d}`);
      lines.push(`mkdir -p ${dirs.join(" ")}`);
      env.push(`${name}_DIRECTORY=${dirs.join(":")}`);
    } else if (key === "WorkingDirectory") cwd = value;
    else if (key === "ProtectSystem" && (yes(value) || value === "full")) {
      const dirs = ["/usr", "/boot", "/efi", ...(value === "full" ? ["/etc"] : [])];
      // recursively read-only, as systemd makes them (mounts below included)
      lines.push(
        `for d in ${dirs.join(" ")}; do [ -d "$d" ] && mount --rbind "$d" "$d" && ` +
          `findmnt -rn -o TARGET -R "$d" | while read -r m; do ` +
          `mount -o remount,bind,ro "$m"; done; done; true`,
      );
    } else if (key === "ProtectHome" && yes(value)) {
      lines.push(
        "for d in /home /root /run/user; do [ -d $d ] && mount -t tmpfs -o ro,mode=0755 tmpfs $d; done; true",
      );
    } else if (key === "PrivateTmp" && yes(value)) {
      lines.push("mount -t tmpfs tmpfs /tmp", "mount -t tmpfs tmpfs /var/tmp");
    } else {
      throw new Error(`the unit's ${key}=${value} is not emulated by this test: add it here`);
    }
  }
  const exec = settings.get("ExecStart");
  assert.ok(exec, "the unit has an ExecStart");
  return [...lines, `cd ${cwd}`, `exec env ${env.join(" ")} ${exec}`];
}

/** `lines` with the script's arguments (`"$@"`) added to its last line, the exec of ExecStart. */
function withArgs(lines: string[]): string[] {
  return lines.toSpliced(-1, 1, `${lines.at(-1)} "$@"`);
}

const isRoot = Deno.uid() === 0;
const hasUnshare = await new Deno.Command("unshare", { args: ["--version"] }).output().then(
  (o) => o.success,
  () => false,
);
const canSandbox = isRoot && hasUnshare;
if (!canSandbox) {
  console.warn("!!! SKIPPING the README install test: it needs root and unshare (mount namespace)");
}

e2eTest(
  "the README's install steps give a service that starts, serves and logs under the unit's sandbox",
  async (s) => {
    const readme = await Deno.readTextFile(`${ROOT}README.md`);
    const steps = readmeInstallSteps(readme);
    assert.ok(steps.includes("systemctl enable --now sni-proxy"), steps.join("\n"));
    const bundled = await bundledConfig(s);

    // what the install steps read: a checkout, with the config on free ports
    const stage = await Deno.makeTempDir({ prefix: "sni-install-" });
    s.defer(() => Deno.remove(stage, { recursive: true }));
    const checkout = `${stage}/checkout`;
    await Deno.mkdir(`${checkout}/deploy`, { recursive: true });
    await Deno.writeTextFile(`${checkout}/config.json`, JSON.stringify(bundled.config, null, 2));
    await Deno.copyFile(`${ROOT}deploy/sni-proxy.service`, `${checkout}/deploy/sni-proxy.service`);
    // the compiled binary when ./build.sh binary could make one; else a stand-in that runs the
    // same code with deno, from a directory the sandbox leaves visible (set up below)
    const standin = "/usr/local/lib/sni-proxy-standin";
    let binary: string;
    try {
      await Deno.copyFile(`${ROOT}sni-proxy`, `${checkout}/sni-proxy`);
      binary = "the compiled ./sni-proxy";
    } catch {
      await Deno.writeTextFile(
        `${checkout}/sni-proxy`,
        `#!/bin/sh\nDENO_DIR=${standin}/cache exec ${standin}/deno run -A --unstable-net ` +
          `--v8-flags=--max-semi-space-size=4 --config ${standin}/src/deno.json ` +
          `${standin}/src/main.ts "$@"\n`,
      );
      binary = "a stand-in for ./sni-proxy (deno run main.ts: no denort here to compile it)";
    }
    await Deno.chmod(`${checkout}/sni-proxy`, 0o755);
    const denoDir = JSON.parse(
      new TextDecoder().decode(
        (await new Deno.Command(Deno.execPath(), { args: ["info", "--json"] }).output()).stdout,
      ),
    ).denoDir;

    const script = [
      "set -eu",
      // the host is not touched: what the steps write lands in overlays, in the stage
      ...["etc", "usr/local", "var/log"].map((d) =>
        `mkdir -p ${stage}/upper/${d} ${stage}/work/${d} && mount -t overlay overlay ` +
        `-o lowerdir=/${d},upperdir=${stage}/upper/${d},workdir=${stage}/work/${d} /${d}`
      ),
      `cd ${checkout}`,
      ...steps.flatMap((step) => {
        if (step.startsWith("./build.sh")) return []; // `binary` says what stands for its output
        if (step.startsWith("install ")) return [step];
        if (step === "systemctl daemon-reload") return [];
        if (step === "systemctl enable --now sni-proxy") {
          // what the stand-in runs, bound where the sandbox still shows it
          return [
            `mkdir -p ${standin}/src ${standin}/cache && touch ${standin}/deno`,
            `mount --bind ${ROOT} ${standin}/src`,
            `mount --bind ${denoDir} ${standin}/cache`,
            `mount --bind ${Deno.execPath()} ${standin}/deno`,
            // systemctl start: the installed unit's sandbox, then its ExecStart
            ...withArgs(
              unitSandbox(
                serviceSettings(Deno.readTextFileSync(`${checkout}/deploy/sni-proxy.service`)),
              ).toSpliced(-1, 0, "! touch /etc/sni-proxy/probe 2>/dev/null || exit 97"),
            ),
          ];
        }
        throw new Error(`README install step not known to this test: ${step}`);
      }),
    ].join("\n");
    const proxy = await startProxy(s, {}, {
      // the harness's --ready-fd 1 reaches ExecStart as the script's arguments
      command: (
        ready,
      ) => ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", ...ready],
      readyMs: 60_000,
    });
    const out = () => `${binary}; output:\n${proxy.stderr()}`;
    assert.deepEqual(
      proxy.listeners.map((l) => l.port),
      [bundled.ports.tls, bundled.ports.http],
      out(),
    );
    await assertServesBundled(bundled);
    const code = await proxy.stop();
    assert.equal(code, 0, out());
    assert.doesNotMatch(proxy.stderr(), /Read-only|Uncaught|error/i, out());

    // installed where the README says, the logs where the unit puts them, nothing else written
    const written: string[] = [];
    const walk = async (dir: string, rel: string) => {
      for await (const e of Deno.readDir(dir)) {
        if (e.isDirectory) await walk(`${dir}/${e.name}`, `${rel}/${e.name}`);
        else written.push(`${rel}/${e.name}`);
      }
    };
    await walk(`${stage}/upper`, "");
    assert.deepEqual(written.filter((f) => !f.startsWith(standin)).sort(), [
      "/etc/sni-proxy/config.json",
      "/etc/systemd/system/sni-proxy.service",
      "/usr/local/bin/sni-proxy",
      "/var/log/sni-proxy/logs/access.log",
      "/var/log/sni-proxy/logs/sni-proxy.log",
    ], out());
    const log = await Deno.readTextFile(`${stage}/upper/var/log/sni-proxy/logs/sni-proxy.log`);
    assert.match(log, /ready: .*listener/);
    const access = (await Deno.readTextFile(
      `${stage}/upper/var/log/sni-proxy/logs/access.log`,
    )).trim().split("\n").map((l) => JSON.parse(l));
    assert.ok(access.some((e) => e.sni === "localhost" && e.close_reason === "done"), out());
  },
  { ignore: !canSandbox, timeoutMs: 120_000 },
);
