/**
 * The runtime admin API: one JSON request line and one JSON reply line per connection on a UNIX
 * socket (`admin.socket`), which only its owner (root) and `admin.group` may open (mode 0660, or
 * 0600 without a group). It lists backends and sessions, drains, disables and enables backends,
 * changes backends' weights, closes sessions, lifts XDP blocks (`ebpf.xdp.block`), reloads the
 * config and shows the config in force. Backend changes live in
 * the running routing tables: a reload (SIGHUP or the API's) or a restart starts from the
 * config file again. `sni-proxy ctl` (src/ops/ctl_cli.ts) is its client.
 *
 * With `workers` above 1 the supervisor serves the socket and asks every worker (each has its
 * own pools and sessions); see {@link mergeResults}. `unblock` it carries out itself: it owns
 * the XDP maps.
 *
 * @module
 */
import { basename, dirname } from "node:path";
import type { BackendPool } from "../route/backend.ts";
import type { Config } from "../config/mod.ts";
import { logger } from "./log.ts";
import { isIpAddress } from "../net/ip.ts";
import type { SourceBlocker } from "../ebpf/xdpblock.ts";
import { LineSplitter, writeAll } from "../net/bytes.ts";
import type { SessionInfo } from "../conn/conn_record.ts";
import type { RoutingTables } from "../route/table.ts";

const log = logger("admin");

/** A request, as sent on the socket. */
export interface AdminRequest {
  cmd: string;
  /** drain / disable / enable / weight: the backend as configured (`127.0.0.1:9443`). */
  backend?: string;
  /** weight: the backend's new weight (1-1000, as `routes[].backends[].weight`). */
  weight?: number;
  /** Narrow a backend change, or a session filter, to one route (`match`) or table. */
  route?: string;
  table?: string;
  /** sessions / close: the client address (`IP:port`) or IP. */
  client?: string;
  /** close: every session. */
  all?: boolean;
  /** unblock: the client IP address whose XDP block to lift. */
  source?: string;
}

/** One backend of one route, as `backends` lists it. */
export interface BackendRow {
  table: string;
  route: string;
  backend: string;
  /** Health checks' and passive health's verdict; `mixed` when workers disagree. */
  health: "up" | "down" | "mixed";
  /** Its weight in force: the config's, or the last `weight` command's. */
  weight: number;
  /** The admin API's hold on it: `drained`, `disabled`, or `enabled` (none). */
  admin: "enabled" | "drained" | "disabled";
  /** Live connections to it. */
  active: number;
  /** Consecutive failed connects or checks. */
  failures: number;
}

/** A backend a change applied to. */
export interface BackendRef {
  table: string;
  route: string;
  backend: string;
}

/** What a process answers (the supervisor merges its workers' answers into one). */
export type AdminResult =
  | { backends: BackendRow[] }
  | { sessions: (SessionInfo & { worker?: number })[] }
  | { changed: BackendRef[]; closed: number }
  | { unblocked: string };

/** A request the API refuses; its message goes back to the client. */
export class AdminError extends Error {}

/** The commands a worker process carries out (the rest are the supervisor's own). */
const LOCAL_COMMANDS = ["backends", "drain", "disable", "enable", "weight", "sessions", "close"];
const HOLDS = { drain: "drained", disable: "disabled", enable: null } as const;

/** The weights a backend may have (as in the config). */
const MIN_WEIGHT = 1;
const MAX_WEIGHT = 1000;

/** A live connection or QUIC flow as the admin API lists and closes it. */
export interface AdminSession {
  info(): SessionInfo;
  stop(reason: "admin"): void;
}

/** What {@link applyLocal} needs of a proxy process. */
export interface AdminHost {
  readonly tables: RoutingTables;
  sessions(): Iterable<AdminSession>;
}

/** Checks a request's shape; throws an AdminError saying what is wrong. */
export function checkRequest(req: AdminRequest): void {
  if (!["reload", "config", "unblock", ...LOCAL_COMMANDS].includes(req.cmd)) {
    throw new AdminError(
      `unknown command "${req.cmd}" (commands: reload, config, unblock, ` +
        `${LOCAL_COMMANDS.join(", ")})`,
    );
  }
  if (req.cmd === "unblock" && !(typeof req.source === "string" && isIpAddress(req.source))) {
    throw new AdminError(`unblock needs one IP address, e.g. 192.0.2.7, not ${req.source}`);
  }
  if ((req.cmd in HOLDS || req.cmd === "weight") && !req.backend) {
    throw new AdminError(`${req.cmd} needs a backend as configured, e.g. 127.0.0.1:9443`);
  }
  if (
    req.cmd === "weight" &&
    !(Number.isInteger(req.weight) && req.weight! >= MIN_WEIGHT && req.weight! <= MAX_WEIGHT)
  ) {
    throw new AdminError(
      `weight needs a whole number from ${MIN_WEIGHT} to ${MAX_WEIGHT}, not ${req.weight}`,
    );
  }
  if (req.cmd === "close" && !req.all && !req.client && !req.route && !req.backend) {
    throw new AdminError("close needs a client, route or backend filter (or all)");
  }
}

/** Carries out a backend or session command in this process. */
export function applyLocal(host: AdminHost, req: AdminRequest): AdminResult {
  checkRequest(req);
  const pools = everyPool(host.tables);
  const inScope = (x: { table: string; route: string | null }) =>
    (!req.route || x.route === req.route) && (!req.table || x.table === req.table);
  if (req.cmd === "backends") {
    const now = Date.now();
    return {
      backends: pools.filter(({ table, pool }) => inScope({ table, route: pool.name })).flatMap((
        { table, pool },
      ) =>
        pool.backends.map((b) => ({
          table,
          route: pool.name,
          backend: b.address.text,
          weight: b.weight,
          health: pool.isUp(b, now) ? "up" as const : "down" as const,
          admin: b.held ?? "enabled",
          active: b.active,
          failures: b.failures,
        }))
      ),
    };
  }
  const sessions = [...host.sessions()].map((s) => ({ s, info: s.info() }));
  if (req.cmd === "sessions" || req.cmd === "close") {
    const client = req.client;
    const picked = sessions.filter(({ info }) =>
      inScope(info) &&
      (!req.backend || info.backend === req.backend || info.backend_config === req.backend) &&
      (!client || info.client === client ||
        (hostOf(client) === client && hostOf(info.client) === client))
    );
    if (req.cmd === "sessions") return { sessions: picked.map(({ info }) => info) };
    for (const { s } of picked) s.stop("admin");
    return { changed: [], closed: picked.length };
  }
  const targets = pools.flatMap(({ table, pool }) =>
    pool.backends.filter((b) => b.address.text === req.backend)
      .map((b) => ({ table, route: pool.name, pool, b }))
  ).filter(inScope);
  if (targets.length === 0) {
    const known = [
      ...new Set(pools.flatMap(({ pool }) => pool.backends.map((b) => b.address.text))),
    ];
    throw new AdminError(
      `no backend ${req.backend}${req.route ? ` in route "${req.route}"` : ""}` +
        `${req.table ? ` of table ${req.table}` : ""} (backends: ${known.join(", ")})`,
    );
  }
  const changed = targets.map(({ table, route, b }) => ({ table, route, backend: b.address.text }));
  if (req.cmd === "weight") {
    for (const t of targets) {
      t.b.weight = req.weight!;
      // smooth round robin starts over, so the new weights hold from the next pick on
      for (const b of t.pool.backends) b.current = 0;
    }
    return { changed, closed: 0 };
  }
  const hold = HOLDS[req.cmd as keyof typeof HOLDS];
  for (const t of targets) t.b.held = hold;
  let closed = 0;
  if (hold === "disabled") {
    for (const { s, info } of sessions) {
      const hit = targets.some((t) =>
        t.table === info.table && t.route === info.route &&
        t.b.address.text === info.backend_config
      );
      if (hit) {
        s.stop("admin");
        closed++;
      }
    }
  }
  return { changed, closed };
}

/** Blocked sources an `unblock` error lists at most. */
const LISTED_BLOCKS = 10;

/**
 * `unblock`: lifts the XDP block of `req.source` in `blocker`, the block set of the process
 * that owns the XDP maps (null: `ebpf.xdp.block` is off or the filter is not attached).
 */
export function applyUnblock(blocker: SourceBlocker | null, req: AdminRequest): AdminResult {
  checkRequest(req);
  if (!blocker) {
    throw new AdminError(
      "no XDP block set: ebpf.xdp.block is off, or the XDP filter is not attached",
    );
  }
  const source = blocker.unblock(req.source!);
  if (source !== null) return { unblocked: source };
  const now = Object.keys(blocker.snapshot().blocked);
  const listed = now.slice(0, LISTED_BLOCKS).join(", ") +
    (now.length > LISTED_BLOCKS ? ` and ${now.length - LISTED_BLOCKS} more` : "");
  throw new AdminError(`${req.source} is not blocked in XDP (blocked now: ${listed || "none"})`);
}

/** Every backend pool of `tables` (each route's, the default backend's) with its table's name. */
export function everyPool(tables: RoutingTables): { table: string; pool: BackendPool }[] {
  return [...tables.byName.values()].flatMap((t) =>
    [...t.router.routes.map((r) => r.target), ...(t.defaultPool ? [t.defaultPool] : [])]
      .map((pool) => ({ table: t.name, pool }))
  );
}

/** `IP` of `IP:port` / `[IPv6]:port`; the text itself when it has no port. */
function hostOf(address: string): string {
  const m = /^\[(.*)\]:\d+$/.exec(address) ?? /^([^:]*):\d+$/.exec(address);
  return m ? m[1] : address;
}

/**
 * The supervisor's answer from its workers' (null: a worker that did not answer): backends
 * merged by table, route and backend (connections summed, health `mixed` when workers
 * disagree), sessions listed with their worker, changes and closed sessions summed.
 */
export function mergeResults(
  req: AdminRequest,
  results: (AdminResult | { error: string } | null)[],
): AdminResult {
  const answered = results.flatMap((r, i) => r ? [{ r, worker: i + 1 }] : []);
  const failed = answered.find(({ r }) => "error" in r);
  if (failed) throw new AdminError((failed.r as { error: string }).error);
  const ok = answered as { r: AdminResult; worker: number }[];
  if (ok.length === 0) throw new AdminError("no worker answered");
  if (req.cmd === "backends") {
    const rows = new Map<string, BackendRow>();
    for (const { r } of ok) {
      for (const b of (r as { backends: BackendRow[] }).backends) {
        const key = `${b.table}\n${b.route}\n${b.backend}`;
        const seen = rows.get(key);
        if (!seen) rows.set(key, { ...b });
        else {
          seen.active += b.active;
          seen.failures = Math.max(seen.failures, b.failures);
          if (seen.health !== b.health) seen.health = "mixed";
        }
      }
    }
    return { backends: [...rows.values()] };
  }
  if (req.cmd === "sessions") {
    return {
      sessions: ok.flatMap(({ r, worker }) =>
        (r as { sessions: SessionInfo[] }).sessions.map((s) => ({ ...s, worker }))
      ),
    };
  }
  const changes = ok.map(({ r }) => r as { changed: BackendRef[]; closed: number });
  return {
    changed: changes[0].changed,
    closed: changes.reduce((n, c) => n + c.closed, 0),
  };
}

/** The line a change is logged with and answered by. */
export function changeMessage(
  req: AdminRequest,
  result: { changed: BackendRef[]; closed: number },
): string {
  const closed = `${result.closed} session(s) closed`;
  if (req.cmd === "close") {
    const filters = (["client", "route", "table", "backend"] as const)
      .flatMap((k) => req[k] ? [`${k} ${req[k]}`] : []);
    return `${closed} (${req.all ? "all" : filters.join(", ")})`;
  }
  const which = result.changed.map((c) => `route "${c.route}" (table ${c.table})`).join(", ");
  const what = {
    weight: `weight ${req.weight}: its share of the route's new connections follows`,
    drain: "drained: no new connections, live ones finish",
    disable: `disabled: no new connections, ${closed}`,
    enable: "enabled: back in rotation (health checks permitting)",
  }[req.cmd as "weight" | "drain" | "disable" | "enable"];
  return `backend ${req.backend} of ${which} ${what}. This lasts until the next reload ` +
    `or restart: it is not written to the config`;
}

/** What the admin socket serves. */
export interface AdminTarget {
  /** Backend and session commands (the supervisor asks its workers). */
  admin(req: AdminRequest): AdminResult | Promise<AdminResult>;
  /** The config in force: the file's as last (re)loaded, restart-only fields as started. */
  readonly effectiveConfig: Config;
}

/** The outcome of a reload asked for on the socket: null when applied, else why not. */
export type ReloadNow = () => Promise<string[] | null>;

/** Answers one request (never throws: errors are `{ ok: false, error }`). */
async function answer(
  target: AdminTarget,
  reload: ReloadNow,
  req: AdminRequest,
): Promise<Record<string, unknown>> {
  try {
    checkRequest(req);
    if (req.cmd === "reload") {
      log.info("reload asked for on the admin socket");
      const errors = await reload();
      return errors
        ? { ok: false, error: `reload failed, keeping the running config: ${errors.join("; ")}` }
        : { ok: true, message: `reloaded ${target.effectiveConfig.path}` };
    }
    if (req.cmd === "config") {
      const c = target.effectiveConfig;
      return { ok: true, path: c.path, config: c.source };
    }
    const result = await target.admin(req);
    if ("unblocked" in result) {
      const message = `${result.unblocked} unblocked in XDP by the admin API: its packets pass ` +
        `again and its offences count from zero`;
      log.info(message);
      return { ok: true, message, ...result };
    }
    if ("changed" in result) {
      const message = changeMessage(req, result);
      log.info(message);
      return { ok: true, message, ...result };
    }
    return { ok: true, ...result };
  } catch (e) {
    if (!(e instanceof AdminError)) log.error(`${req.cmd} failed: ${e}`);
    return { ok: false, error: (e as Error).message };
  }
}

/** The admin socket, serving. */
export interface AdminServer {
  path: string;
  close(): Promise<void>;
}

/** A request line is at most this many characters. */
const MAX_REQUEST = 64 * 1024;
const REQUEST_TIMEOUT_MS = 5_000;

/**
 * Binds the admin socket at `admin.socket` (its directory is created when missing) and serves
 * it. The socket gets its mode and group in a private directory before it is moved into place,
 * so nobody else can open it in between; an existing socket at the path (an older process,
 * during a restart) is replaced.
 */
export async function serveAdmin(
  admin: NonNullable<Config["admin"]>,
  target: AdminTarget,
  reload: ReloadNow,
): Promise<AdminServer> {
  const path = admin.socket;
  const gid = admin.group === null ? null : await groupId(admin.group);
  await Deno.mkdir(dirname(path), { recursive: true, mode: 0o755 });
  const staging = await Deno.makeTempDir({ dir: dirname(path), prefix: ".sni-proxy-admin-" });
  let listener: Deno.UnixListener;
  try {
    const tmp = `${staging}/${basename(path)}`;
    listener = Deno.listen({ transport: "unix", path: tmp });
    try {
      await Deno.chmod(tmp, gid === null ? 0o600 : 0o660);
      if (gid !== null) await Deno.chown(tmp, null, gid);
      const takeover = await answers(path);
      await Deno.rename(tmp, path);
      // logged once the path is ours: an older process told to stop after this line leaves it
      if (takeover) {
        log.warn(`admin.socket ${path}: another process served it; this one takes it over`);
      }
    } catch (e) {
      listener.close();
      throw e;
    }
  } catch (e) {
    throw new Error(`admin.socket: cannot serve ${path}: ${(e as Error).message}`);
  } finally {
    await Deno.remove(staging, { recursive: true }).catch(() => {});
  }
  const ino = (await Deno.stat(path)).ino;
  const loop = (async () => {
    for await (const conn of listener) {
      serveOne(conn, target, reload).catch((e) => log.debug(`admin connection: ${e}`));
    }
  })().catch(() => {});
  log.info(`admin API on ${path}${gid === null ? " (owner only)" : ` (group ${admin.group})`}`);
  return {
    path,
    close: async () => {
      listener.close();
      await loop;
      // a newer process may have taken the path over: leave its socket alone
      const now = await Deno.stat(path).catch(() => null);
      if (now?.ino === ino) await Deno.remove(path).catch(() => {});
    },
  };
}

async function serveOne(conn: Deno.Conn, target: AdminTarget, reload: ReloadNow): Promise<void> {
  try {
    const line = await readLine(conn, AbortSignal.timeout(REQUEST_TIMEOUT_MS), MAX_REQUEST);
    let reply: Record<string, unknown>;
    try {
      reply = await answer(target, reload, JSON.parse(line) as AdminRequest);
    } catch {
      reply = { ok: false, error: "expected one JSON object on one line" };
    }
    await writeAll(conn, new TextEncoder().encode(JSON.stringify(reply) + "\n"));
  } finally {
    try {
      conn.close();
    } catch {
      // closed already
    }
  }
}

/** Whether something accepts connections on the UNIX socket at `path`. */
async function answers(path: string): Promise<boolean> {
  try {
    (await Deno.connect({ transport: "unix", path })).close();
    return true;
  } catch {
    return false;
  }
}

/** A group name's gid from /etc/group (or the number given). */
async function groupId(group: string | number): Promise<number> {
  if (typeof group === "number") return group;
  const text = await Deno.readTextFile("/etc/group").catch(() => "");
  for (const line of text.split("\n")) {
    const [name, , gid] = line.split(":");
    if (name === group && /^\d+$/.test(gid ?? "")) return Number(gid);
  }
  throw new Error(`admin.group: no group "${group}" in /etc/group`);
}

/** Reads up to the first newline (or EOF) of at most `max` characters; closes at `signal`. */
async function readLine(conn: Deno.Conn, signal: AbortSignal, max: number): Promise<string> {
  const lines = new LineSplitter();
  const buf = new Uint8Array(16 * 1024);
  const timeUp = () => conn.close();
  signal.addEventListener("abort", timeUp, { once: true });
  try {
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) return lines.rest;
      lines.push(buf.subarray(0, n));
      const line = lines.shift();
      if (line !== null) return line;
      if (lines.rest.length > max) throw new Error("request too long");
    }
  } finally {
    signal.removeEventListener("abort", timeUp);
  }
}

/** Sends one request to the admin socket at `path` and returns its reply. */
export async function adminRequest(
  path: string,
  req: AdminRequest,
): Promise<Record<string, unknown>> {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    await writeAll(conn, new TextEncoder().encode(JSON.stringify(req) + "\n"));
    const line = await readLine(conn, AbortSignal.timeout(30_000), Infinity);
    return JSON.parse(line);
  } finally {
    try {
      conn.close();
    } catch {
      // closed already
    }
  }
}
