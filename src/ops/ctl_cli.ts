/**
 * `sni-proxy ctl`: the admin API's client (see src/ops/admin.ts). Finds the socket from the config
 * (`admin.socket`), sends one request and prints the answer: tables for lists, the message for
 * changes, JSON with `--json` (and for `config`).
 *
 * @module
 */
import { dirname, resolve } from "node:path";
import { parseArgs, type ParseArgsOptionsConfig } from "node:util";
import { type AdminRequest, adminRequest } from "./admin.ts";
import { ConfigError, DEFAULT_ADMIN_SOCKET, loadConfig } from "../config/mod.ts";

const USAGE = `Usage: sni-proxy ctl [--config PATH] [--json] COMMAND

Operates the running proxy through its admin socket (admin.socket in the config).

  backends [--route R] [--table T]        backends: weight, health, admin state, live connections
  drain BACKEND [--route R] [--table T]   no new connections to BACKEND; live ones finish
  disable BACKEND [--route R] [--table T] no new connections, and close its live ones
  enable BACKEND [--route R] [--table T]  back in rotation
  weight BACKEND N [--route R] [--table T]   BACKEND's weight (1-1000) for new connections
  sessions [--client C] [--route R] [--backend B]   live connections
  close (--client C | --route R | --backend B | --all)   close live connections
  unblock ADDRESS                         lift ADDRESS's XDP block now (ebpf.xdp.block)
  reload                                  reload the config file (as SIGHUP), report errors
  config                                  the config in force, as JSON

BACKEND is as written in the config (127.0.0.1:9443, $sni:443); without --route/--table a change
applies to it in every route. Changes last until the next reload or restart: write them to the
config to keep them.`;

/** The flags every command takes. */
const COMMON = {
  config: { type: "string", default: "config.json" },
  help: { type: "boolean", default: false },
} as const;

/**
 * Parses a command line (strict: unknown flags are errors) with `--config` and `--help` and
 * `options`; prints the error and `usage` and returns null when it is wrong (exit 2).
 */
export function parseCommandLine<T extends ParseArgsOptionsConfig>(
  args: string[],
  options: T,
  who: string,
  usage: string,
) {
  try {
    return parseArgs({
      args,
      options: { ...COMMON, ...options },
      strict: true,
      allowPositionals: true,
    });
  } catch (e) {
    console.error(`${who}: ${(e as Error).message}\n\n${usage}`);
    return null;
  }
}

/** The columns of `ctl sessions`, in order. */
const SESSION_COLUMNS = [
  "state",
  "client",
  "route",
  "backend",
  "age_ms",
  "bytes_up",
  "bytes_down",
  "mode",
];

/** Runs `sni-proxy ctl ARGS`; returns the exit code (2: usage, 1: refused or unreachable). */
export async function runCtl(args: string[]): Promise<number> {
  const parsed = parseCommandLine(
    args,
    {
      json: { type: "boolean", default: false },
      route: { type: "string" },
      table: { type: "string" },
      client: { type: "string" },
      backend: { type: "string" },
      all: { type: "boolean", default: false },
    },
    "sni-proxy ctl",
    USAGE,
  );
  if (!parsed) return 2;
  const f = parsed.values;
  const [cmd, operand, ...extra] = parsed.positionals;
  if (f.help) {
    console.log(USAGE);
    return 0;
  }
  const takesBackend = ["drain", "disable", "enable", "weight"].includes(cmd);
  const weight = cmd === "weight" ? extra.shift() : undefined;
  if (
    !cmd || extra.length > 0 || (operand !== undefined && !takesBackend && cmd !== "unblock") ||
    (cmd === "weight" && !/^\d+$/.test(weight ?? "")) || (cmd === "unblock" && !operand)
  ) {
    const what = cmd === "weight"
      ? "weight BACKEND N (a whole number)"
      : cmd === "unblock"
      ? "unblock ADDRESS"
      : "one command";
    console.error(`sni-proxy ctl: expected ${what}\n\n${USAGE}`);
    return 2;
  }
  const socket = await adminSocket(f.config);
  if (!socket) return 1;
  const req: AdminRequest = {
    cmd,
    backend: takesBackend ? operand : f.backend,
    weight: weight === undefined ? undefined : Number(weight),
    route: f.route,
    table: f.table,
    client: f.client,
    all: f.all || undefined,
    source: cmd === "unblock" ? operand : undefined,
  };
  let reply: Record<string, unknown>;
  try {
    reply = await adminRequest(socket, req);
  } catch (e) {
    console.error(
      `sni-proxy ctl: cannot reach ${socket}: ${(e as Error).message} ` +
        `(is the proxy running, and may this user open the socket: root or admin.group?)`,
    );
    return 1;
  }
  if (!reply.ok) {
    console.error(`sni-proxy ctl: ${reply.error}`);
    return 1;
  }
  delete reply.ok;
  if (f.json || cmd === "config") console.log(JSON.stringify(reply, null, 2));
  else if (Array.isArray(reply.backends)) {
    const columns = ["table", "route", "backend", "weight", "health", "admin", "active"];
    printTable(reply.backends, columns);
  } else if (Array.isArray(reply.sessions)) {
    const columns = [...SESSION_COLUMNS];
    if (reply.sessions.some((s) => "worker" in s)) columns.push("worker");
    printTable(reply.sessions, columns);
  } else console.log(reply.message);
  return 0;
}

/**
 * The admin socket the config names, or null (said why). A config with errors still names it
 * (the errors are warned about): `ctl reload` is how an operator sees them in the running proxy.
 */
async function adminSocket(path: string): Promise<string | null> {
  let config;
  try {
    config = await loadConfig(path);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    const raw = await Deno.readTextFile(path).then(JSON.parse).catch(() => null);
    const socket = raw?.admin?.socket ?? (raw?.admin ? DEFAULT_ADMIN_SOCKET : null);
    if (typeof socket !== "string") {
      for (const line of e.errors) console.error(`${path}: ${line}`);
      return null;
    }
    console.error(`${path}: warning: the file has errors; its admin.socket is used all the same`);
    const dir = Deno.env.get("RUNTIME_DIRECTORY")?.split(":")[0] || dirname(resolve(path));
    return resolve(dir, socket);
  }
  if (!config.admin) {
    console.error(`sni-proxy ctl: no admin section in ${config.path}: the admin API is off`);
    return null;
  }
  return config.admin.socket;
}

/** Prints `rows` as aligned columns under a header. */
function printTable(rows: Record<string, unknown>[], columns: string[]): void {
  const cells = [columns, ...rows.map((r) => columns.map((c) => String(r[c] ?? "-")))];
  const widths = columns.map((_, i) => Math.max(...cells.map((row) => row[i].length)));
  for (const row of cells) {
    console.log(row.map((cell, i) => cell.padEnd(widths[i])).join("  ").trimEnd());
  }
}
