/**
 * What a running process applies of a reloaded config: most of it, but not the fields that need
 * a restart (they keep their running values and are named in one warning).
 *
 * @module
 */
import { formatPath } from "./address.ts";
import { ConfigError } from "./load.ts";
import type { Config, ListenerConfig } from "./resolve.ts";

/** Fields a running process keeps until a restart; the rest of a reload applies. */
const RESTART_ONLY = ["workers", "listeners", "log", "metrics", "admin", "ebpf"] as const;
/** Fields inside those that a reload does apply. */
const RELOADABLE =
  /^(listeners\[\d+\]\.table|ebpf\.(dns_cache_enabled|drain_timeout_ms|detach_spliced))$/;

/** The JSON paths under `path` where `a` and `b` differ, skipping reloadable fields. */
function changedPaths(a: unknown, b: unknown, path: PropertyKey[], out: string[]): void {
  const where = formatPath(path);
  if (RELOADABLE.test(where)) return;
  const isObj = (v: unknown): v is Record<string, unknown> =>
    v !== null && typeof v === "object" && !Array.isArray(v);
  if (isObj(a) && isObj(b)) {
    for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
      changedPaths(a[k], b[k], [...path, k], out);
    }
  } else if (Array.isArray(a) && Array.isArray(b) && a.length === b.length) {
    a.forEach((x, i) => changedPaths(x, b[i], [...path, i], out));
  } else if (JSON.stringify(a) !== JSON.stringify(b)) {
    out.push(where);
  }
}

/**
 * The running listeners with the tables `next` gives them: each takes its `table` from the
 * listener of `next` with the same address and protocol (the one in the same place first).
 * Throws a ConfigError when one would be left with a table `next` does not define.
 */
function relistened(running: Config, next: Config): ListenerConfig[] {
  // the listener in the same place, else the first with its address (ports 0 repeat)
  const listeners = running.listeners.map((l, i) => {
    const same = (n?: ListenerConfig) => n?.address === l.address && n.protocol === l.protocol;
    const match = same(next.listeners[i]) ? next.listeners[i] : next.listeners.find(same);
    return match ? { ...l, table: match.table } : l;
  });
  const orphans = listeners.filter((l) => !(l.table in next.tables)).map((l) =>
    `listeners: the running listener ${l.address} serves table "${l.table}", which ` +
    `${next.path} no longer defines (a changed listener needs a restart)`
  );
  if (orphans.length > 0) throw new ConfigError(next.path, orphans);
  return listeners;
}

/**
 * What a process running `running` applies of a reloaded `next`: `next`, except that the
 * fields needing a restart (workers, listeners, log, metrics, admin, most of ebpf) keep their
 * running values; `ignored` names (as JSON paths) those of them that `next` changes, and `warnings`
 * has the lines to log: one naming them all, then `next`'s own warnings. A running listener
 * takes its `table` from the listener of `next` with the same address and protocol (the one
 * in the same place first). Throws a
 * ConfigError when a running listener would be left with a table `next` does not define.
 */
export function reloadable(
  running: Config,
  next: Config,
): { config: Config; ignored: string[]; warnings: string[] } {
  const ignored: string[] = [];
  for (const key of RESTART_ONLY) {
    if (key === "workers") {
      if (running.workers !== next.workers) ignored.push("workers");
    } else changedPaths(running.source[key], next.source[key], [key], ignored);
  }
  const listeners = relistened(running, next);
  const source = { ...next.source };
  for (const key of ["workers", "listeners", "log", "metrics", "admin"] as const) {
    (source as Record<string, unknown>)[key] = running.source[key];
  }
  const { dns_cache_enabled, drain_timeout_ms, detach_spliced } = next.source.ebpf;
  source.ebpf = { ...running.source.ebpf, dns_cache_enabled, drain_timeout_ms, detach_spliced };
  const config: Config = {
    ...next,
    source,
    workers: running.workers,
    listeners,
    log: running.log,
    metrics: running.metrics,
    admin: running.admin,
    ebpf: {
      ...running.ebpf,
      dnsCacheEnabled: next.ebpf.dnsCacheEnabled,
      drainTimeoutMs: next.ebpf.drainTimeoutMs,
    },
  };
  const warnings = ignored.length > 0
    ? [`reload: these changes need a restart and were not applied: ${ignored.join(", ")}`]
    : [];
  return { config, ignored, warnings: [...warnings, ...next.warnings] };
}
