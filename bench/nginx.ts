/**
 * The benchmark's TLS backend: nginx from the system, started in the foreground with a
 * generated self-signed certificate (CN and SAN `localhost`) and a generated config in a
 * temporary directory.
 *
 * One worker: on a 2-core machine the direct run is then wrk + one nginx worker, and the proxy
 * runs add one more process competing for the same two cores — the question is what the proxy
 * costs, not how fast nginx can go on all cores.
 *
 * @module
 */
import { adopt, childPids, killAdopted, need, sh, sleep, spawn, stop } from "./procs.ts";

/** Path of the small response. */
export const SMALL_PATH = "/small";
/** Path of the large file. */
export const BIG_PATH = "/big";
/**
 * Path of the large file sent at a limited rate: `PACED_PATH?rate=1m` (nginx `limit_rate`, per
 * connection).
 */
export const PACED_PATH = "/paced";
/** Size of the small response body in bytes. */
export const SMALL_BYTES = 1024;

/** A running nginx. */
export interface Nginx extends NginxProcess {
  port: number;
  /** PEM of the self-signed certificate (for clients that verify). */
  certPem: string;
}

/** Starts nginx on 127.0.0.1 serving a `bigBytes` file at `/big` and 1 KiB at `/small`. */
export async function startNginx(dir: string, bigBytes: number): Promise<Nginx> {
  await sh("openssl", [
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
    "-days",
    "1",
    "-subj",
    "/CN=localhost",
    "-addext",
    "subjectAltName=DNS:localhost",
    "-addext",
    "basicConstraints=critical,CA:FALSE",
    "-keyout",
    `${dir}/key.pem`,
    "-out",
    `${dir}/cert.pem`,
  ]);
  const certPem = await Deno.readTextFile(`${dir}/cert.pem`);
  await Deno.mkdir(`${dir}/www`);
  await Deno.mkdir(`${dir}/tmp`);
  // a sparse file: no disk writes, and reads come from the page cache like a hot file would
  const f = await Deno.open(`${dir}/www${BIG_PATH}`, { create: true, write: true });
  await f.truncate(bigBytes);
  f.close();
  await readThrough(`${dir}/www${BIG_PATH}`);
  // nginx workers run as an unprivileged user: they must be able to read the files
  await Deno.chmod(dir, 0o755);
  await Deno.chmod(`${dir}/www`, 0o755);
  await Deno.chmod(`${dir}/www${BIG_PATH}`, 0o644);
  const port = freePort();
  const conf = `${dir}/nginx.conf`;
  await Deno.writeTextFile(conf, nginxConfig(dir, port));
  const run = await runNginx(dir, conf, port);
  return { port, certPem, ...run };
}

/** A running nginx master and its worker. */
export interface NginxProcess {
  /** Master and worker pids (for CPU accounting). */
  pids: number[];
  /** Stops nginx and prints the tail of its error log if it has one. */
  stop(): Promise<void>;
}

/**
 * Runs nginx in the foreground with config `conf` and prefix `prefix` (whose `error.log` the
 * config must name); resolves once `port` accepts connections and the worker is running.
 */
export async function runNginx(prefix: string, conf: string, port: number): Promise<NginxProcess> {
  const proc = await spawnListening(
    "nginx",
    ["-c", conf, "-p", prefix, "-g", "daemon off;"],
    port,
    () => errorLog(prefix),
  );
  // the master listens before it forks the worker: wait for the worker too
  let workers = childPids(proc.pid);
  for (let i = 0; i < 40 && workers.length === 0; i++) {
    await sleep(50);
    workers = childPids(proc.pid);
  }
  if (workers.length === 0) {
    await stop(proc);
    throw new Error(`nginx started no worker process\n${await errorLog(prefix)}`);
  }
  workers.forEach(adopt);
  return {
    pids: [proc.pid, ...workers],
    stop: async () => {
      await stop(proc, "SIGTERM");
      killAdopted(workers);
      const log = await errorLog(prefix);
      if (log) console.error(`nginx error.log (last lines):\n${log}`);
    },
  };
}

/**
 * The nginx config. Sized for the idle test: up to 10,000 connections from a proxy in front,
 * with room to spare; keep-alive without limits so wrk's connections stay.
 */
function nginxConfig(dir: string, port: number): string {
  return `worker_processes 1;
worker_rlimit_nofile 20000;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 12000; }
http {
  access_log off;
  client_body_temp_path ${dir}/tmp; proxy_temp_path ${dir}/tmp; fastcgi_temp_path ${dir}/tmp;
  uwsgi_temp_path ${dir}/tmp; scgi_temp_path ${dir}/tmp;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  sendfile on;
  server {
    listen 127.0.0.1:${port} ssl;
    ssl_certificate ${dir}/cert.pem;
    ssl_certificate_key ${dir}/key.pem;
    root ${dir}/www;
    location = ${SMALL_PATH} { default_type text/plain; return 200 "${"x".repeat(SMALL_BYTES)}"; }
    location = ${PACED_PATH} { alias ${dir}/www${BIG_PATH}; limit_rate $arg_rate; }
  }
}
`;
}

/** Reads a file once so that the first measured download does not pay for filling the page cache. */
async function readThrough(path: string): Promise<void> {
  using f = await Deno.open(path);
  const buf = new Uint8Array(1 << 20);
  while (await f.read(buf) !== null) { /* discard */ }
}

async function errorLog(dir: string): Promise<string> {
  const text = await Deno.readTextFile(`${dir}/error.log`).catch(() => "");
  return text.trim().split("\n").filter(Boolean).slice(-5).join("\n");
}

/** A port free right now on 127.0.0.1. */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/**
 * Starts the server `tool` (a foreground process) and waits until it accepts connections on
 * 127.0.0.1:`port`; if it does not, stops it and throws, with `detail()` (e.g. its error log).
 */
export async function spawnListening(
  tool: string,
  args: string[],
  port: number,
  detail: () => Promise<string> = () => Promise.resolve(""),
): Promise<Deno.ChildProcess> {
  const proc = spawn(need(tool, tool), { args, stdout: "null", stderr: "inherit" });
  try {
    await waitTcp(port, proc);
  } catch (e) {
    await stop(proc);
    throw new Error(`${tool} did not start: ${(e as Error).message}\n${await detail()}`);
  }
  return proc;
}

/** Waits until 127.0.0.1:`port` accepts a connection; throws if `proc` exits first. */
async function waitTcp(port: number, proc: Deno.ChildProcess): Promise<void> {
  let exited = false;
  proc.status.then(() => exited = true);
  for (let i = 0; i < 100 && !exited; i++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return;
    } catch {
      await sleep(50);
    }
  }
  throw new Error(exited ? "it exited" : `nothing listening on 127.0.0.1:${port} after 5 s`);
}
