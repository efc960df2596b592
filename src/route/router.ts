/**
 * Route table: maps a requested server name to the first route whose pattern matches.
 *
 * @module
 */

/** A compiled name pattern: exact, wildcard (`*.example.com`), regex (`~...`) or `*`. */
export interface NamePattern {
  /** The pattern as written in the config. */
  text: string;
  /** Tests an already normalized name (lower case, no trailing dot). */
  test(name: string): boolean;
}

/** Lower-cases and drops one trailing dot, the form every pattern compares against. */
export function normalizeName(name: string): string {
  const lower = name.toLowerCase();
  return lower.endsWith(".") ? lower.slice(0, -1) : lower;
}

/** Compiles a pattern; throws an Error whose message says what is wrong. */
export function compilePattern(text: string): NamePattern {
  if (text === "*") return { text, test: () => true };
  if (text.startsWith("~")) {
    let re: RegExp;
    try {
      re = new RegExp(text.slice(1), "i");
    } catch (e) {
      throw new Error(`bad regular expression: ${(e as Error).message}`);
    }
    return { text, test: (name) => re.test(name) };
  }
  if (text.startsWith("*.")) {
    const suffix = normalizeName(text.slice(1)); // ".example.com"
    if (suffix.length < 2 || suffix.includes("*")) throw new Error(`bad wildcard "${text}"`);
    return { text, test: (name) => name.length > suffix.length && name.endsWith(suffix) };
  }
  if (text === "" || text.includes("*") || /[^a-zA-Z0-9._-]/.test(text)) {
    throw new Error(
      `"${text}" is not a name, "*.name", "~regex" or "*"`,
    );
  }
  const exact = normalizeName(text);
  return { text, test: (name) => name === exact };
}

/** A route as the router sees it; `T` is what the caller attaches (e.g. a backend pool). */
export interface Route<T> {
  pattern: NamePattern;
  /**
   * ALPN protocols of which the client must offer one for the route to match; null: any hello,
   * with or without ALPN.
   */
  alpn: readonly string[] | null;
  /** Names a dynamic (`$sni`) route may connect to; null when the route is not dynamic. */
  allow: NamePattern[] | null;
  target: T;
}

/** Result of a lookup. */
export type RouteResult<T> =
  | { kind: "route"; route: Route<T> }
  | { kind: "not_allowed"; route: Route<T> }
  | { kind: "none" };

/** Ordered first-match route table. */
export class Router<T> {
  readonly routes: readonly Route<T>[];

  constructor(routes: Route<T>[]) {
    this.routes = routes;
  }

  /**
   * Finds the first route for `name` (any case, optional trailing dot) whose ALPN condition the
   * offered protocols `alpn` meet; a null name never matches.
   */
  lookup(name: string | null, alpn: readonly string[] = NO_ALPN): RouteResult<T> {
    if (name === null || name === "") return { kind: "none" };
    const normal = normalizeName(name);
    for (const route of this.routes) {
      if (route.alpn && !offersAny(alpn, route.alpn)) continue;
      if (!route.pattern.test(normal)) continue;
      if (route.allow && !route.allow.some((p) => p.test(normal))) {
        return { kind: "not_allowed", route };
      }
      return { kind: "route", route };
    }
    return { kind: "none" };
  }
}

/** What a lookup without offered protocols compares against (one array, not one per call). */
const NO_ALPN: readonly string[] = [];

/** Whether `offered` holds one of `wanted` (both a handful of entries: no set needed). */
function offersAny(offered: readonly string[], wanted: readonly string[]): boolean {
  for (const p of offered) if (wanted.includes(p)) return true;
  return false;
}
