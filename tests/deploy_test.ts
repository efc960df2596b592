/** The systemd unit in deploy/ is valid and wires reload and stop to the proxy's signals. */
import assert from "node:assert/strict";

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
