/**
 * What the bench can put between the clients and nginx: this project's proxy in each of its
 * {@link PROXY_MODES} and the {@link PEERS}; one table column each, after `direct`.
 *
 * @module
 */
import { PEERS } from "./peers.ts";
import { type Backends, type Proxy, PROXY_MODES, startProxy } from "./proxy.ts";

/** Something in the path between the clients and nginx: a column other than direct. */
export interface Subject {
  name: string;
  /** a peer proxy (nginx stream, HAProxy), not this project's */
  peer: boolean;
  /** whether the idle test applies (its RSS is one proxy's; not the workers column) */
  idle: boolean;
  /** Why it cannot run here, or null. */
  prepare(): Promise<string | null>;
  start(dir: string, backends: Backends): Promise<Proxy>;
}

/** Every subject, in table order: the proxy modes, then the peers. */
export const SUBJECTS: Subject[] = [
  ...PROXY_MODES.map((m) => ({
    name: m.name,
    peer: false,
    idle: (m.workers ?? 1) === 1,
    prepare: async () => (await m.prepare?.()) ?? null,
    start: (dir: string, backends: Backends) => startProxy(dir, backends, m),
  })),
  ...PEERS.map((p) => ({
    name: p.name,
    peer: true,
    idle: true,
    prepare: () => Promise.resolve(p.prepare()),
    start: p.start,
  })),
];

/** Columns of a plain `deno task bench` (workers only on request: the machine has 2 cores). */
export const DEFAULT_COLUMNS = [
  "direct",
  ...SUBJECTS.map((s) => s.name).filter((n) => n !== "workers"),
];

/** Columns whose failure skips them (with the reason) instead of failing the run. */
export function optional(name: string): boolean {
  return name === "kernel" || name === "sockmap" || PEERS.some((p) => p.name === name);
}

/** Position of a column in the table: direct, the proxy modes, then the peers. */
export function columnOrder(name: string): number {
  return ["direct", ...SUBJECTS.map((s) => s.name)].indexOf(name);
}
