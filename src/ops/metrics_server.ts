/**
 * The metrics endpoint: `GET /metrics` (Prometheus text), `GET /stats` (JSON), `GET /healthz`.
 *
 * @module
 */
import { logger } from "./log.ts";
import { type MetricsSnapshot, renderPrometheus } from "./metrics.ts";

const log = logger("metrics");

/** A running metrics HTTP server. */
export interface MetricsServer {
  /** Bound address, e.g. `127.0.0.1:9090`. */
  address: string;
  /** The same, as host and port. */
  addr: Deno.NetAddr;
  close(): Promise<void>;
}

/**
 * Serves the counters `snapshot` returns (this process's, or the sum over worker processes)
 * on `hostname:port`; resolves once listening.
 */
export async function serveMetrics(
  snapshot: () => MetricsSnapshot | Promise<MetricsSnapshot>,
  hostname: string,
  port: number,
  healthy: () => boolean,
): Promise<MetricsServer> {
  const listening = Promise.withResolvers<Deno.NetAddr>();
  const server = Deno.serve({
    hostname,
    port,
    // a new process starting on the same address before the old one stops (see Listener)
    reusePort: true,
    onListen: (addr) => listening.resolve(addr as Deno.NetAddr),
    onError: (e) => {
      log.warn(`metrics request failed: ${e}`);
      return new Response("internal error\n", { status: 500 });
    },
  }, async (req) => {
    const path = new URL(req.url).pathname;
    if (req.method !== "GET" && req.method !== "HEAD") {
      return new Response("method not allowed\n", { status: 405, headers: { allow: "GET" } });
    }
    switch (path) {
      case "/metrics":
        return new Response(renderPrometheus(await snapshot()), {
          headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8" },
        });
      case "/stats":
        return Response.json(await snapshot());
      case "/healthz":
        return healthy() ? new Response("ok\n") : new Response("stopping\n", { status: 503 });
      default:
        return new Response("not found: try /metrics, /stats or /healthz\n", { status: 404 });
    }
  });
  const addr = await Promise.race([
    listening.promise,
    server.finished.then(() => {
      throw new Error(`cannot serve metrics on ${hostname}:${port}`);
    }),
  ]);
  const address = addr.hostname.includes(":")
    ? `[${addr.hostname}]:${addr.port}`
    : `${addr.hostname}:${addr.port}`;
  log.info(`metrics on http://${address}/metrics`);
  return { address, addr, close: () => server.shutdown() };
}
