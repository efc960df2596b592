/**
 * `sni-proxy stats`: the running proxy's counters as a table, from its metrics endpoint, or,
 * when it serves none, from the pinned per-CPU maps of the eBPF fast path (via bpftool).
 *
 * @module
 */
import type { Config } from "../config/mod.ts";
import { PIN_DIR, SOCKMAP_MAPS, SOCKMAP_STATS_FIELDS } from "../ebpf/layout.ts";

/** struct sni_stats: the counters the table shows (all but sockets_closed), in map order. */
const SOCKMAP_STATS = SOCKMAP_STATS_FIELDS.filter((f) => f !== "sockets_closed");
const STATS_PIN = `${PIN_DIR}/${SOCKMAP_MAPS.stats}`;

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
      stats = { kernel: { sockmap: await readPinnedStats(STATS_PIN, SOCKMAP_STATS) } };
      source = `${STATS_PIN} (no metrics.address in ${config.path}: kernel counters only)`;
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
