/**
 * The proxy's access log in tests: reading it back, and waiting for entries.
 *
 * @module
 */
import type { AccessEntry as LoggedAccessEntry } from "../../src/ops/log.ts";
import { sleep } from "./scope.ts";

/** One access-log entry as read back from the file (src/ops/log.ts writes it). */
export type AccessEntry = LoggedAccessEntry & Record<string, unknown>;

/** What the access log functions read: anything with the entries written so far. */
export interface AccessLogged {
  access(): Promise<AccessEntry[]>;
}

/** The complete entries in the access log at `path` (none when it is not there yet). */
export async function readAccessLog(path: string): Promise<AccessEntry[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch {
    return [];
  }
  // a line may be half-written while we read: only complete lines count
  return text.split("\n").slice(0, -1).filter(Boolean).map((l) => JSON.parse(l));
}

/** Polls `p`'s access log until an entry matches `pred` (fails after `ms`). */
export async function waitAccess(
  p: AccessLogged,
  pred: (e: AccessEntry) => boolean,
  ms = 8000,
): Promise<AccessEntry> {
  const deadline = Date.now() + ms;
  for (;;) {
    const entries = await p.access();
    const hit = entries.find(pred);
    if (hit) return hit;
    if (Date.now() > deadline) {
      throw new Error(
        `no matching access-log entry within ${ms} ms; entries:\n` +
          entries.map((e) => JSON.stringify(e)).join("\n"),
      );
    }
    await sleep(50);
  }
}

/** Waits (up to `ms`) until `p`'s access log holds `n` entries. */
export async function served(p: AccessLogged, n: number, ms = 15_000): Promise<void> {
  const deadline = Date.now() + ms;
  while ((await p.access()).length < n) {
    if (Date.now() > deadline) throw new Error(`fewer than ${n} connections served`);
    await sleep(50);
  }
}

/** Access-log entries (so far) of connections that went to `backend`. */
export async function entriesFor(p: AccessLogged, backend: string): Promise<AccessEntry[]> {
  return (await p.access()).filter((e) => e.backend === backend);
}

/** Polls until the access log has at least `n` entries for `backend` (fails after `ms`). */
export async function entriesAtLeast(
  p: AccessLogged,
  backend: string,
  n: number,
  ms = 10_000,
): Promise<AccessEntry[]> {
  const deadline = Date.now() + ms;
  for (;;) {
    const e = await entriesFor(p, backend);
    if (e.length >= n) return e;
    if (Date.now() > deadline) {
      throw new Error(`${e.length} of ${n} access entries for ${backend} after ${ms} ms`);
    }
    await sleep(50);
  }
}
