/**
 * A process's life around whatever serves: start, SIGHUP reloads, SIGTERM/SIGINT drain and stop.
 * Shared by the single-process proxy, the supervisor and each worker.
 *
 * @module
 */
import type { Logger } from "@logtape/logtape";
import { type Config, ConfigError, loadConfig } from "../config/mod.ts";
import { closeLogging } from "../ops/log.ts";

/** What runs until stopped: the proxy itself, or the supervisor of its workers. */
export interface Running {
  reload(config: Config): void;
  shutdown(): Promise<void>;
}

/** How {@link runUntilStopped} starts and reloads. */
export interface LifecycleOptions<R extends Running = Running> {
  start: () => Promise<R>;
  /** The config file SIGHUP reloads. */
  configPath: string;
  /** Applied to every reloaded config before it is used (a worker's share of limits). */
  adapt?: (config: Config) => Config;
  log: Logger;
  /**
   * Runs once started and serving (listeners and `serve`): announces readiness, and may stop the
   * process later (a worker whose supervisor is gone).
   */
  onStarted?: (stop: (why: string) => void, running: R) => void;
  /**
   * Starts what else serves once started (the admin socket), given a reload that reports its
   * outcome (null: applied, else the errors); closed after the shutdown. A failure to start it
   * stops the process (exit 1).
   */
  serve?: (
    running: R,
    reload: () => Promise<string[] | null>,
  ) => Promise<{ close(): Promise<void> } | null>;
}

/**
 * Starts, then serves until SIGTERM/SIGINT has drained it; resolves with the exit code (1 when
 * the start fails). Signals are handled from before the start: one that arrives while starting
 * is acted on once started, never left to kill the process.
 */
export async function runUntilStopped<R extends Running>(
  opts: LifecycleOptions<R>,
): Promise<number> {
  const { log } = opts;
  let running: R | null = null;
  let stopRequested: string | null = null;
  let stopping = false;
  let reloadRequested = false;
  const stopped = Promise.withResolvers<void>();
  const stop = (why: string) => {
    if (!running) {
      stopRequested ??= why;
      return;
    }
    if (stopping) return;
    stopping = true;
    log.info(`${why}: stopping`);
    running.shutdown().then(stopped.resolve, stopped.reject);
  };
  const reload = async (): Promise<string[] | null> => {
    if (!running) {
      reloadRequested = true;
      return null;
    }
    try {
      const config = await loadConfig(opts.configPath);
      running.reload(opts.adapt ? opts.adapt(config) : config);
      return null;
    } catch (e) {
      const lines = e instanceof ConfigError ? e.errors : [(e as Error).message];
      log.error(`reload failed, keeping the running config: ${lines.join("; ")}`);
      return lines;
    }
  };
  Deno.addSignalListener("SIGTERM", () => stop("SIGTERM"));
  Deno.addSignalListener("SIGINT", () => stop("SIGINT"));
  Deno.addSignalListener("SIGHUP", reload);
  try {
    running = await opts.start();
  } catch (e) {
    log.error(`cannot start: ${(e as Error).message}`);
    await closeLogging();
    return 1;
  }
  let served: { close(): Promise<void> } | null = null;
  try {
    served = (await opts.serve?.(running, reload)) ?? null;
  } catch (e) {
    log.error(`cannot start: ${(e as Error).message}`);
    await running.shutdown();
    await closeLogging();
    return 1;
  }
  opts.onStarted?.(stop, running);
  if (stopRequested) stop(stopRequested);
  else if (reloadRequested) await reload();
  await stopped.promise;
  await served?.close();
  await closeLogging();
  return 0;
}
