/**
 * Configs for tests: dynamic (`$sni`) routes, free ports, and the repository's bundled
 * config.json moved to free ports with identity backends behind it.
 *
 * @module
 */
import assert from "node:assert/strict";
import { identityBackend } from "./backends.ts";
import { curl, whoAnswers } from "./clients.ts";
import { ROOT, type Scope } from "./scope.ts";

/**
 * A route with a dynamic backend: names matching `match` are connected to themselves on `port`
 * (`$sni:PORT`), allowed by `match` itself unless `extra` says otherwise. Test names resolve to
 * loopback, which a `$sni` route dials only with an opt-in in `extra` (`allow_private: true`).
 */
export function sniRoute(
  match: string,
  port: number,
  extra: Record<string, unknown> = {},
): Record<string, unknown> {
  return { match, backends: [`$sni:${port}`], allow: [match], ...extra };
}

/** A TCP port on 127.0.0.1 with nothing listening (bound, then released). */
export function unusedPort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** The bundled config.json, moved to free ports, and the backends it routes to. */
export interface BundledConfig {
  /** The file's content as shipped, but for its loopback addresses. */
  config: Record<string, unknown>;
  /** The free ports its TLS and its HTTP listener got. */
  ports: { tls: number; http: number };
}

/**
 * The repository's config.json as shipped, with every loopback address moved to a free port,
 * and an identity backend at each backend address: TLS for the tables of its TLS listener,
 * plain for those of its HTTP listener. Each backend is named after the address in the file,
 * e.g. `tls-127.0.0.1:9443` and `http-127.0.0.1:9080`.
 */
export async function bundledConfig(scope: Scope): Promise<BundledConfig> {
  type Listener = { address: string; protocol: string; table?: string };
  type Routes = { backends: string[] }[];
  const bundled = JSON.parse(await Deno.readTextFile(`${ROOT}config.json`));
  const tables: Record<string, Routes> = { default: bundled.routes };
  for (const [name, t] of Object.entries(bundled.tables ?? {})) {
    tables[name] = (t as { routes: Routes }).routes;
  }
  const moved = new Map<string, string>();
  const ports = { tls: 0, http: 0 };
  for (const l of bundled.listeners as Listener[]) {
    const port = unusedPort();
    if (l.protocol === "tls" || l.protocol === "http") ports[l.protocol] = port;
    moved.set(l.address, l.address.replace(/:\d+$/, `:${port}`));
    const tls = l.protocol !== "http";
    for (const address of tables[l.table ?? "default"].flatMap((r) => r.backends)) {
      if (moved.has(address)) continue;
      const hostname = address.slice(0, address.lastIndexOf(":")).replace(/^\[|\]$/g, "");
      const b = await identityBackend(scope, `${tls ? "tls" : "http"}-${address}`, {
        hostname,
        tls,
      });
      moved.set(address, b.address);
    }
  }
  const config = JSON.parse(
    JSON.stringify(bundled).replace(
      /"((?:127\.0\.0\.1|\[::1\]):\d+)"/g,
      (text, address) => moved.has(address) ? JSON.stringify(moved.get(address)) : text,
    ),
  );
  return { config, ports };
}

/**
 * Asserts that a proxy on {@linkcode bundledConfig} serves as the file says: `localhost` over
 * TLS (Deno's client and curl) to the TLS backend, and over plain HTTP (curl) to the HTTP one.
 */
export async function assertServesBundled(bundled: BundledConfig): Promise<void> {
  const { tls, http } = bundled.ports;
  assert.equal(await whoAnswers(tls, "localhost"), "tls-127.0.0.1:9443");
  const viaTls = await curl(tls, "localhost");
  assert.equal(viaTls.stdout, "tls-127.0.0.1:9443\nstatus=200", viaTls.stderr);
  const viaHttp = await curl(http, "localhost", { http: true });
  assert.equal(viaHttp.stdout, "http-127.0.0.1:9080\nstatus=200", viaHttp.stderr);
  const wildcard = await curl(http, "www.example.test", { http: true });
  assert.match(wildcard.stdout, /^http-127\.0\.0\.1:908[01]\nstatus=200$/, wildcard.stderr);
}
