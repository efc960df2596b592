/**
 * `sni-proxy stats`: the running proxy's counters as a table, from its metrics endpoint, or,
 * when it serves none, from the pinned per-CPU maps of the eBPF fast path (via bpftool) of the
 * instance started with the same config file.
 *
 * @module
 */
import type { Config } from "../config/mod.ts";
import { PIN_ROOT, SOCKMAP_MAPS, SOCKMAP_STATS_FIELDS } from "../ebpf/layout.ts";

/** Prints the table; returns the exit code. */
export async function printStats(config: Config): Promise<number> {
  let stats: Record<string, unknown>;
  let source: string;
  if (config.metrics) {
    const url = `http://${config.metrics.address}/stats`;
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(3000) });
      stats = await res.json();
      source = url;
    } catch (e) {
      console.error(
        `sni-proxy stats: cannot read ${url}: ${(e as Error).message} (is the proxy running?)`,
      );
      return 1;
    }
  } else {
    try {
      const pin = `${await instanceDir(config.path)}/${SOCKMAP_MAPS.stats}`;
      stats = { kernel: { sockmap: await readPinnedStats(pin, SOCKMAP_STATS_FIELDS) } };
      source = `${pin} (no metrics.address in ${config.path}: kernel counters only)`;
    } catch (e) {
      console.error(
        `sni-proxy stats: no metrics.address in ${config.path}, and the pinned eBPF maps cannot ` +
          `be read: ${(e as Error).message}`,
      );
      return 1;
    }
  }
  const rows: [string, string][] = [];
  const walk = (prefix: string, value: unknown) => {
    if (value && typeof value === "object") {
      for (const [k, v] of Object.entries(value)) {
        // a histogram's buckets are for /metrics; its count and sum are enough here
        if (k !== "buckets") walk(prefix ? `${prefix}.${k}` : k, v);
      }
    } else rows.push([prefix, String(value)]);
  };
  walk("", stats);
  console.log(`# ${source}`);
  const width = Math.max(...rows.map(([k]) => k.length));
  for (const [k, v] of rows) console.log(`${k.padEnd(width)}  ${v.padStart(14)}`);
  return 0;
}

/**
 * The pin dir of the kernel-mode instance started with `configPath` (each pins under
 * PIN_ROOT/<pid>), or of the only one running; throws when there is none, or several and none
 * (or more than one) was started with that config.
 */
async function instanceDir(configPath: string): Promise<string> {
  const live: number[] = [];
  try {
    for await (const e of Deno.readDir(PIN_ROOT)) {
      // a dir without the sockmap's counters holds other pins (the QUIC steering's) only
      const stats = `${PIN_ROOT}/${e.name}/${SOCKMAP_MAPS.stats}`;
      if (
        /^\d+$/.test(e.name) && (await Deno.stat(`/proc/${e.name}`).catch(() => null)) &&
        (await Deno.lstat(stats).catch(() => null))
      ) {
        live.push(Number(e.name));
      }
    }
  } catch { /* no dir: no instance */ }
  const want = await Deno.realPath(configPath).catch(() => configPath);
  const mine = [];
  for (const pid of live) if ((await configOf(pid)) === want) mine.push(pid);
  const pick = mine.length === 1 ? mine : live;
  if (pick.length === 1) return `${PIN_ROOT}/${pick[0]}`;
  throw new Error(
    live.length
      ? `${live.length} kernel-mode instances run (pids ${live.join(", ")}), none with ` +
        `${configPath} alone: set metrics.address`
      : `no kernel-mode instance pins its maps under ${PIN_ROOT} (is the proxy running in kernel mode, as root?)`,
  );
}

/** The config file process `pid` was started with (its last --config), resolved; or null. */
async function configOf(pid: number): Promise<string | null> {
  try {
    const args = (await Deno.readTextFile(`/proc/${pid}/cmdline`)).split("\0");
    const i = args.lastIndexOf("--config");
    const path = i >= 0 ? args[i + 1] : "config.json";
    const cwd = await Deno.readLink(`/proc/${pid}/cwd`);
    return await Deno.realPath(path.startsWith("/") ? path : `${cwd}/${path}`);
  } catch {
    return null;
  }
}

/** Sums a pinned PERCPU_ARRAY's entry 0 of little-endian u64 fields over CPUs. */
async function readPinnedStats(
  path: string,
  fields: readonly string[],
): Promise<Record<string, number>> {
  let out: Deno.CommandOutput;
  try {
    out = await new Deno.Command("bpftool", {
      args: ["-j", "map", "lookup", "pinned", path, "key", "0", "0", "0", "0"],
      stdin: "null",
    }).output();
  } catch {
    throw new Error("bpftool is not installed (apt-get install bpftool)");
  }
  if (!out.success) {
    const err = new TextDecoder().decode(out.stderr).trim();
    throw new Error(
      `bpftool: ${err || `exit ${out.code}`} (is the proxy running in kernel mode, as root?)`,
    );
  }
  const entry = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    values: { cpu: number; value: string[] }[];
  };
  const sums = new Array<bigint>(fields.length).fill(0n);
  for (const { value } of entry.values) {
    const bytes = value.map((h) => parseInt(h, 16));
    for (let i = 0; i < fields.length; i++) {
      let v = 0n;
      for (let b = 7; b >= 0; b--) v = (v << 8n) | BigInt(bytes[i * 8 + b] ?? 0);
      sums[i] += v;
    }
  }
  return Object.fromEntries(fields.map((f, i) => [f, Number(sums[i])]));
}
