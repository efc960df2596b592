/**
 * sni-proxy command line: parses flags, loads the config, starts the proxy and wires signals.
 *
 * @module
 */
import { serveAdmin } from "./src/ops/admin.ts";
import { type Config, ConfigError, loadConfig } from "./src/config/mod.ts";
import { parseCommandLine, runCtl } from "./src/ops/ctl_cli.ts";
import { runUntilStopped } from "./src/run/lifecycle.ts";
import { logger, LogSetupError, setupLogging } from "./src/ops/log.ts";
import { Proxy } from "./src/run/proxy.ts";
import { notifySystemd, ReadyFd, ReadyFdError, readyLine } from "./src/run/ready.ts";
import type { Supervisor } from "./src/run/supervisor.ts";
import { runWorker, workerSpec } from "./src/run/worker.ts";

/** The release this source tree is. */
export const VERSION = "0.1.0";

const USAGE = `sni-proxy ${VERSION}: route TLS (by SNI) and HTTP (by Host) to backends

Usage: sni-proxy [--config PATH] [--ready-fd N] [--check] [--version] [--help]
       sni-proxy stats [--config PATH]
       sni-proxy ctl [--config PATH] [--json] COMMAND ...   (sni-proxy ctl --help)

  --config PATH  config file (default: config.json)
  --ready-fd N   once every listener serves, write one line of JSON to descriptor N and close
                 it: {"ready":true,"pid":...,"listeners":[{"address","port","protocol","table"}],
                 "metrics":"host:port"|null,"admin":"path"|null}. Not written if the start fails
  --check        validate the config, print every error (or "config OK"), exit 0/1
  --version      print the version
  --help         print this help

  stats          print the running proxy's counters (from its metrics.address endpoint)
  ctl            operate the running proxy through its admin socket (admin.socket)

With "workers" above 1 (default: one per CPU) this process supervises that many worker
processes sharing the listeners.

Signals: SIGHUP reloads the config; SIGTERM/SIGINT drain and exit.`;

async function main(args: string[]): Promise<number> {
  if (args[0] === "ctl") return await runCtl(args.slice(1));
  const parsed = parseCommandLine(
    args,
    {
      check: { type: "boolean", default: false },
      version: { type: "boolean", default: false },
      "ready-fd": { type: "string" },
    },
    "sni-proxy",
    USAGE,
  );
  if (!parsed) return 2;
  const flags = parsed.values;
  const command = parsed.positionals[0];
  if (parsed.positionals.length > 1 || (command !== undefined && command !== "stats")) {
    console.error(`sni-proxy: unknown command "${parsed.positionals.join(" ")}"\n\n${USAGE}`);
    return 2;
  }
  if (flags.help) {
    console.log(USAGE);
    return 0;
  }
  if (flags.version) {
    console.log(`sni-proxy ${VERSION} (deno ${Deno.version.deno})`);
    return 0;
  }

  const spec = command === undefined && !flags.check ? workerSpec() : null;
  if (spec) return await runWorker(spec, flags.config);

  let config;
  try {
    config = await loadConfig(flags.config);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    for (const line of e.errors) console.error(`${flags.config}: ${line}`);
    return 1;
  }
  if (flags.check) {
    for (const w of config.warnings) console.error(`${flags.config}: warning: ${w}`);
    console.log("config OK");
    return 0;
  }
  if (command === "stats") return await (await import("./src/ops/stats_cli.ts")).printStats(config);

  let readyFd: ReadyFd | null = null;
  if (flags["ready-fd"] !== undefined) {
    try {
      readyFd = ReadyFd.open(flags["ready-fd"]);
    } catch (e) {
      if (!(e instanceof ReadyFdError)) throw e;
      console.error(`sni-proxy: ${e.message}\n\n${USAGE}`);
      return 2;
    }
  }

  try {
    await setupLogging(config.log);
  } catch (e) {
    if (!(e instanceof LogSetupError)) throw e;
    console.error(`${flags.config}: ${e.message}`);
    return 1;
  }
  const proxyConfig = config;
  return await runUntilStopped({
    start: () => startProxy(proxyConfig),
    configPath: flags.config,
    log: logger("main"),
    serve: async (running, reload) =>
      proxyConfig.admin ? await serveAdmin(proxyConfig.admin, running, reload) : null,
    onStarted: (_stop, running) => {
      readyFd?.announce(readyLine(running, proxyConfig.admin?.socket ?? null));
      const failed = notifySystemd();
      if (failed) logger("main").warn(`cannot tell systemd the proxy is ready: ${failed}`);
    },
  });
}

/** The proxy, or with workers their supervisor (whose modules only such a process loads). */
async function startProxy(config: Config): Promise<Proxy | Supervisor> {
  if (config.workers <= 1) return await Proxy.start(config);
  return await (await import("./src/run/supervisor.ts")).Supervisor.start(config);
}

if (import.meta.main) {
  // whatever fails, the operator gets one line and a non-zero exit, not a stack trace
  Deno.exit(
    await main(Deno.args).catch((e) => {
      console.error(`sni-proxy: ${e instanceof Error ? e.message : String(e)}`);
      return 1;
    }),
  );
}
