/**
 * Peer columns: other SNI-routing TCP proxies in front of the same nginx backend, configured
 * like the proxy under test: one worker process or one thread, one route `localhost` → the
 * backend, routing on the ClientHello's SNI without terminating TLS, no logs, the same idle
 * timeout (300 s). Each is skipped with its reason when it is not installed.
 *
 * - `nginx-stream`: nginx's `stream` module with `ssl_preread` (Debian `libnginx-mod-stream`).
 * - `haproxy`: HAProxy in tcp mode, `req.ssl_sni` after `tcp-request inspect-delay`.
 *
 * @module
 */
import { freePort, runNginx, SMALL_PATH, spawnListening } from "./nginx.ts";
import { need, sh, stop } from "./procs.ts";
import { type Backends, type Proxy, routeList } from "./proxy.ts";

/** Where Debian's libnginx-mod-stream installs the module. */
const STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so";
/**
 * Connections a peer is configured for: the idle test's 9,000 with room to spare, within the
 * 20,000 descriptors a process may open here (two per proxied connection).
 */
const MAX_CONNS = 9500;

/** One peer: a column of the table. */
export interface Peer {
  name: "nginx-stream" | "haproxy";
  /** Why it cannot run here (not installed), or null. */
  prepare(): string | null;
  /** Starts it in front of `backends` (on 127.0.0.1); resolves once it routes a request. */
  start(dir: string, backends: Backends): Promise<Proxy>;
}

/** The peers, in table order. */
export const PEERS: Peer[] = [
  {
    name: "nginx-stream",
    prepare: () =>
      missing("nginx", "nginx") ??
        (exists(STREAM_MODULE)
          ? null
          : `${STREAM_MODULE} not found: apt-get install -y libnginx-mod-stream`),
    start: async (dir, backends) => {
      const prefix = `${dir}/nginx-stream`;
      await Deno.mkdir(prefix, { recursive: true });
      const port = freePort();
      const conf = `${prefix}/nginx.conf`;
      await Deno.writeTextFile(conf, nginxStreamConfig(prefix, port, backends));
      const nginx = await runNginx(prefix, conf, port);
      return await routed({ port, pid: nginx.pids[1], pids: nginx.pids, stop: nginx.stop });
    },
  },
  {
    name: "haproxy",
    prepare: () => missing("haproxy", "haproxy"),
    start: async (dir, backends) => {
      const port = freePort();
      const conf = `${dir}/haproxy.cfg`;
      await Deno.writeTextFile(conf, haproxyConfig(port, backends));
      // -db: foreground, one process (no master-worker)
      const proc = await spawnListening("haproxy", ["-f", conf, "-db"], port);
      return await routed({
        port,
        pid: proc.pid,
        pids: [proc.pid],
        stop: () => stop(proc, "SIGTERM"),
      });
    },
  },
];

/**
 * nginx `stream` with `ssl_preread`: each route's name → its backend, any other name has no
 * upstream (the connection is closed, like the proxy's "no route").
 */
function nginxStreamConfig(prefix: string, port: number, backends: Backends): string {
  const routes = routeList(backends);
  const upstreams = routes.map((r, i) => `  upstream b${i} { server 127.0.0.1:${r.port}; }`);
  const names = routes.map((r, i) => `    ${r.name} b${i};`);
  return `load_module ${STREAM_MODULE};
worker_processes 1;
worker_rlimit_nofile 20000;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log crit;
events { worker_connections ${2 * MAX_CONNS}; }
stream {
  access_log off;
${upstreams.join("\n")}
  map $ssl_preread_server_name $route {
${names.join("\n")}
    default "";
  }
  server {
    listen 127.0.0.1:${port};
    ssl_preread on;
    proxy_pass $route;
    proxy_connect_timeout 5s;
    proxy_timeout 300s;
  }
}
`;
}

/** HAProxy in tcp mode, one thread, no logs: each route's name (SNI) → its backend. */
function haproxyConfig(port: number, backends: Backends): string {
  const routes = routeList(backends);
  const rules = routes.map((r, i) => `  use_backend b${i} if { req.ssl_sni -m str ${r.name} }`);
  const servers = routes.map((r, i) => `backend b${i}\n  server b${i} 127.0.0.1:${r.port}\n`);
  return `global
  nbthread 1
  maxconn ${MAX_CONNS}

defaults
  mode tcp
  maxconn ${MAX_CONNS}
  timeout connect 5s
  timeout client 300s
  timeout server 300s

frontend sni
  bind 127.0.0.1:${port}
  tcp-request inspect-delay 5s
  tcp-request content accept if { req.ssl_hello_type 1 }
${rules.join("\n")}

${servers.join("\n")}`;
}

/** Checks that a started peer routes a request to the backend; stops it if not. */
async function routed(peer: Proxy): Promise<Proxy> {
  try {
    await sh("curl", [
      "-sSkf",
      "--max-time",
      "10",
      "-o",
      "/dev/null",
      "--resolve",
      `localhost:${peer.port}:127.0.0.1`,
      `https://localhost:${peer.port}${SMALL_PATH}`,
    ]);
    return peer;
  } catch (e) {
    await peer.stop();
    throw new Error(`it does not route to the backend: ${(e as Error).message}`);
  }
}

/** Why `tool` is unusable (not installed), or null. */
function missing(tool: string, pkg: string): string | null {
  try {
    need(tool, pkg);
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

function exists(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}
