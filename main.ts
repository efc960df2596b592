/**
 * sni-proxy command line: parses flags, loads the config, starts the proxy and wires signals.
 *
 * @module
 */
import { parseArgs } from "node:util";
import { type Config, ConfigError, loadConfig } from "./src/config.ts";
import { closeLogging, logger, setupLogging } from "./src/log.ts";
import { Proxy } from "./src/proxy.ts";
import { printStats } from "./src/stats_cli.ts";
import { runWorker, Supervisor, workerSpec } from "./src/workers.ts";

/** The release this source tree is. */
export const VERSION = "0.1.0";

const USAGE = `sni-proxy ${VERSION}: route TLS (by SNI) and HTTP (by Host) to backends

Usage: sni-proxy [--config PATH] [--check] [--version] [--help]
       sni-proxy stats [--config PATH]

  --config PATH  config file (default: config.json)
  --check        validate the config, print every error (or "config OK"), exit 0/1
  --version      print the version
  --help         print this help

  stats          print the running proxy's counters (from its metrics.address endpoint)

With "workers" above 1 (default: one per CPU) this process supervises that many worker
processes sharing the listeners.

Signals: SIGHUP reloads the config; SIGTERM/SIGINT drain and exit.`;

/** What main drives: the proxy itself (one process) or the supervisor of its workers. */
interface Running {
  reload(config: Config): void;
  shutdown(): Promise<void>;
}

async function main(args: string[]): Promise<number> {
  let parsed;
  try {
    parsed = parseArgs({
      args,
      options: {
        config: { type: "string", default: "config.json" },
        check: { type: "boolean", default: false },
        version: { type: "boolean", default: false },
        help: { type: "boolean", default: false },
      },
      strict: true,
      allowPositionals: true,
    });
  } catch (e) {
    console.error(`sni-proxy: ${(e as Error).message}\n\n${USAGE}`);
    return 2;
  }
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
    console.log("config OK");
    return 0;
  }
  if (command === "stats") return await printStats(config);

  await setupLogging(config.log);
  const log = logger("main");
  // signals are handled from before the first connection: one that arrives while the proxy
  // starts is acted on once it has started, never left to kill the process
  let proxy: Running | null = null;
  let stopRequested: string | null = null;
  let reloadRequested = false;
  const stopped = Promise.withResolvers<void>();
  const stop = (signal: string) => {
    if (!proxy) {
      stopRequested = signal;
      return;
    }
    log.info(`${signal}: stopping`);
    proxy.shutdown().then(stopped.resolve, stopped.reject);
  };
  const reload = async () => {
    if (!proxy) {
      reloadRequested = true;
      return;
    }
    try {
      proxy.reload(await loadConfig(flags.config));
    } catch (e) {
      const lines = e instanceof ConfigError ? e.errors : [(e as Error).message];
      log.error(`reload failed, keeping the running config: ${lines.join("; ")}`);
    }
  };
  Deno.addSignalListener("SIGTERM", () => stop("SIGTERM"));
  Deno.addSignalListener("SIGINT", () => stop("SIGINT"));
  Deno.addSignalListener("SIGHUP", reload);
  try {
    proxy = config.workers > 1 ? await Supervisor.start(config) : await Proxy.start(config);
  } catch (e) {
    log.error(`cannot start: ${(e as Error).message}`);
    await closeLogging();
    return 1;
  }
  if (stopRequested) stop(stopRequested);
  else if (reloadRequested) await reload();
  await stopped.promise;
  await closeLogging();
  return 0;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
