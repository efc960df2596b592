/**
 * Reading a config: JSON validated against the schema and the checks, then resolved. Every
 * error carries the JSON path of the bad field, and one run lists them all.
 *
 * @module
 */
import { semanticErrors } from "./checks.ts";
import { type Config, type PathBase, resolveSections } from "./resolve.ts";
import { configSchema } from "./schema.ts";
import { formatPath } from "./address.ts";

/** Raised when a config cannot be used; `errors` lists every problem, each with its path. */
export class ConfigError extends Error {
  readonly errors: string[];
  constructor(source: string, errors: string[]) {
    super(`${source}: ${errors.length} error(s):\n  ${errors.join("\n  ")}`);
    this.name = "ConfigError";
    this.errors = errors;
  }
}

/**
 * Validates a parsed JSON value and resolves it. `path` is the file it came from: relative
 * paths in it resolve against its directory (log paths against `base.logsDirectory` when set).
 * Throws ConfigError listing every problem.
 */
export function resolveConfig(raw: unknown, path: string, base: PathBase = {}): Config {
  const parsed = configSchema.safeParse(raw);
  const errors = parsed.success
    ? []
    : parsed.error.issues.map((i) => `${formatPath(i.path)}: ${i.message}`);
  for (const e of semanticErrors(raw)) if (!errors.includes(e)) errors.push(e);
  if (!parsed.success || errors.length > 0) throw new ConfigError(path, errors);
  return resolveSections(parsed.data, path, base);
}

/** Reads, parses and resolves a config file. Throws ConfigError (also for I/O and JSON errors). */
export async function loadConfig(path: string): Promise<Config> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new ConfigError(path, [`cannot read file: ${(e as Error).message}`]);
  }
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(path, [`not valid JSON: ${(e as Error).message}`]);
  }
  // systemd's LogsDirectory= / RuntimeDirectory= set them (several are separated by colons)
  const systemdDir = (name: string) => Deno.env.get(name)?.split(":")[0] || null;
  return resolveConfig(raw, path, {
    logsDirectory: systemdDir("LOGS_DIRECTORY"),
    runtimeDirectory: systemdDir("RUNTIME_DIRECTORY"),
  });
}
