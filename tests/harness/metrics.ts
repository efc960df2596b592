/**
 * The proxy's metrics endpoint in tests: scraping it, checking the exposition format with
 * promtool, and reading histogram series back.
 *
 * @module
 */
import assert from "node:assert/strict";
import type { ProxyProcess } from "./process.ts";

/** The proxy's Prometheus text, from the metrics address in its ready line (`metrics.address`). */
export async function scrapeMetrics(proxy: ProxyProcess): Promise<string> {
  const addr = proxy.ready.metrics;
  assert.ok(addr, `no metrics endpoint in the ready line:\n${proxy.stderr()}`);
  return await fetch(`http://${addr}/metrics`).then((r) => r.text());
}

/** Asserts that `promtool check metrics` accepts `text` (exposition format and naming rules). */
export async function assertPromtoolClean(text: string): Promise<void> {
  const promtool = new Deno.Command("promtool", {
    args: ["check", "metrics"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const w = promtool.stdin.getWriter();
  await w.write(new TextEncoder().encode(text));
  await w.close();
  const checked = await promtool.output();
  const said = new TextDecoder().decode(checked.stdout) + new TextDecoder().decode(checked.stderr);
  assert.equal(checked.code, 0, `promtool: ${said}`);
}

/** One histogram series read back from Prometheus text. */
export interface HistogramSeries {
  /** `[le, cumulative count]` in the order written. */
  buckets: [string, number][];
  sum: number;
  count: number;
}

/**
 * The series of histogram `name` whose labels (but for `le`) are exactly `labels`, as written
 * in `text`; asserts it is there.
 */
export function histogramSeries(
  text: string,
  name: string,
  labels: Record<string, string>,
): HistogramSeries {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`).sort().join(",");
  const series: HistogramSeries = { buckets: [], sum: NaN, count: NaN };
  for (const line of text.split("\n")) {
    const m = /^(\w+)\{([^}]*)\} (\S+)$/.exec(line);
    if (!m || !m[1].startsWith(name + "_")) continue;
    const pairs = m[2].split(",");
    const le = pairs.find((p) => p.startsWith("le="))?.slice(4, -1);
    if (pairs.filter((p) => !p.startsWith("le=")).sort().join(",") !== want) continue;
    const value = Number(m[3]);
    const suffix = m[1].slice(name.length + 1);
    if (suffix === "bucket" && le !== undefined) series.buckets.push([le, value]);
    else if (suffix === "sum") series.sum = value;
    else if (suffix === "count") series.count = value;
  }
  assert.ok(series.buckets.length > 0, `no series ${name}{${want}} in:\n${text}`);
  return series;
}

/** Asserts a histogram series is well formed: cumulative buckets ending in `+Inf` = count. */
export function assertCumulative(s: HistogramSeries): void {
  const counts = s.buckets.map(([, n]) => n);
  assert.deepEqual(counts, [...counts].sort((a, b) => a - b), "buckets are cumulative");
  assert.deepEqual(s.buckets.at(-1), ["+Inf", s.count], "the last bucket is +Inf, = count");
  const bounds = s.buckets.slice(0, -1).map(([le]) => Number(le));
  assert.deepEqual(bounds, [...bounds].sort((a, b) => a - b), "bounds ascend");
}
