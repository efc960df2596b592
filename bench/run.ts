/**
 * Benchmark (not a test): on loopback, an nginx TLS backend measured directly, through the proxy
 * in userspace mode and through the proxy in kernel mode (eBPF sockmap), in one run.
 *
 *   deno task bench            all columns (kernel mode needs root + clang; skipped otherwise)
 *   deno task bench --quick    shorter runs
 *
 * Reports bulk MB/s (curl TLS download), requests/s with keep-alive and with a new connection
 * per request (wrk), p50/p99 latency, whole-machine CPU seconds per GiB of bulk transfer (from
 * /proc/stat: spliced bytes cost kernel time, not process time) and proxy RSS per idle proxied
 * connection at N connections. Writes bench/out/results.{json,md}.
 */
import { parseArgs } from "node:util";

const ROOT = new URL("..", import.meta.url).pathname;
const args = parseArgs({
  args: Deno.args,
  options: {
    quick: { type: "boolean", default: false },
    idle: { type: "string", default: "5000" },
    modes: { type: "string", default: "direct,userspace,kernel" },
    "idle-only": { type: "boolean", default: false },
  },
}).values;
const DURATION = args.quick ? "3s" : "8s";
const IDLE_CONNS = Number(args.idle);
const BIG_MIB = args.quick ? 256 : 1024;
const BULK_RUNS = args.quick ? 2 : 3;

/** The backend's self-signed certificate, trusted by the idle-connection client. */
let backendCert = "";

type Mode = "direct" | "userspace" | "kernel";
interface Row {
  bulkMBs: number;
  cpuSecPerGiB: number;
  /** Machine CPU per GiB above the direct run: what the proxy itself costs. */
  proxyCpuSecPerGiB: number | null;
  keepAliveRps: number;
  keepAliveP50ms: number;
  keepAliveP99ms: number;
  newConnRps: number;
  newConnP99ms: number;
  idleKiBPerConn: number | null;
}

async function sh(cmd: string, argv: string[], opts: { cwd?: string } = {}): Promise<string> {
  const o = await new Deno.Command(cmd, { args: argv, cwd: opts.cwd, stdin: "null" }).output();
  const out = new TextDecoder().decode(o.stdout) + new TextDecoder().decode(o.stderr);
  if (!o.success) throw new Error(`${cmd} ${argv.join(" ")} failed (${o.code}):\n${out}`);
  return out;
}

function need(tool: string, pkg: string) {
  try {
    new Deno.Command(tool, { args: ["--version"], stdout: "null", stderr: "null" }).outputSync();
  } catch {
    throw new Error(`${tool} is missing: apt-get install -y ${pkg}`);
  }
}

function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const p = (l.addr as Deno.NetAddr).port;
  l.close();
  return p;
}

/** Busy jiffies of the whole machine (user+nice+system+irq+softirq), in seconds. */
function machineCpuSeconds(): number {
  const line = Deno.readTextFileSync("/proc/stat").split("\n")[0].trim().split(/\s+/);
  const [user, nice, system, , , irq, softirq] = line.slice(1).map(Number);
  return (user + nice + system + irq + softirq) / 100;
}

async function startNginx(dir: string): Promise<{ port: number; proc: Deno.ChildProcess }> {
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
  backendCert = await Deno.readTextFile(`${dir}/cert.pem`);
  await Deno.mkdir(`${dir}/www`);
  const f = await Deno.open(`${dir}/www/big`, { create: true, write: true });
  await f.truncate(BIG_MIB << 20);
  f.close();
  // nginx workers run as an unprivileged user: they must be able to read the file
  await Deno.chmod(dir, 0o755);
  await Deno.chmod(`${dir}/www`, 0o755);
  await Deno.chmod(`${dir}/www/big`, 0o644);
  const port = freePort();
  await Deno.writeTextFile(
    `${dir}/nginx.conf`,
    `worker_processes 1;
worker_rlimit_nofile 20000;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log warn;
events { worker_connections 12000; }
http {
  access_log off;
  client_body_temp_path ${dir}/tmp; proxy_temp_path ${dir}/tmp; fastcgi_temp_path ${dir}/tmp;
  uwsgi_temp_path ${dir}/tmp; scgi_temp_path ${dir}/tmp;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  sendfile on;
  server {
    listen 127.0.0.1:${port} ssl;
    ssl_certificate ${dir}/cert.pem;
    ssl_certificate_key ${dir}/key.pem;
    root ${dir}/www;
    location = /small { default_type text/plain; return 200 "${"x".repeat(1024)}"; }
  }
}
`,
  );
  await Deno.mkdir(`${dir}/tmp`);
  const proc = new Deno.Command("nginx", {
    args: ["-c", `${dir}/nginx.conf`, "-p", dir, "-g", "daemon off;"],
    stdin: "null",
    stdout: "null",
    stderr: "inherit",
  }).spawn();
  await waitTcp(port);
  return { port, proc };
}

async function waitTcp(port: number) {
  for (let i = 0; i < 100; i++) {
    try {
      (await Deno.connect({ hostname: "127.0.0.1", port })).close();
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  throw new Error(`nothing listening on ${port}`);
}

interface Proxy {
  port: number;
  pid: number;
  stop(): Promise<void>;
}

async function startProxy(dir: string, backendPort: number, kernel: boolean): Promise<Proxy> {
  const config = {
    listeners: [{ address: "127.0.0.1:0" }],
    routes: [{ match: "localhost", backends: [`127.0.0.1:${backendPort}`] }],
    limits: { max_connections: 20000 },
    log: { level: "info", file: false, access_log: false },
    ebpf: { enabled: kernel, sockmap_enabled: kernel },
  };
  const path = `${dir}/proxy-${kernel ? "kernel" : "userspace"}.json`;
  await Deno.writeTextFile(path, JSON.stringify(config));
  const proc = new Deno.Command(Deno.execPath(), {
    // the same flags as `deno task start` (a small young generation keeps idle RSS down)
    args: [
      "run",
      "-A",
      "--unstable-net",
      "--v8-flags=--max-semi-space-size=4",
      `${ROOT}main.ts`,
      "--config",
      path,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let text = "";
  const reader = proc.stderr.pipeThrough(new TextDecoderStream()).getReader();
  while (!text.includes("sni-proxy·proxy: ready: ")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`proxy exited:\n${text}`);
    text += value;
  }
  if (kernel && !text.includes("mode kernel")) {
    proc.kill("SIGKILL");
    throw new Error(`kernel mode unavailable:\n${text}`);
  }
  // keep draining stderr so the proxy never blocks on a full pipe; keep warnings for the report
  (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      for (const line of value.split("\n")) {
        if (/\[(WRN|ERR|FTL)\]/.test(line)) console.error(`    proxy: ${line}`);
      }
    }
  })().catch(() => {});
  const port = Number(/listening on 127\.0\.0\.1:(\d+)/.exec(text)![1]);
  return {
    port,
    pid: proc.pid,
    stop: async () => {
      proc.kill("SIGTERM");
      await proc.status;
    },
  };
}

async function bulk(port: number): Promise<{ mbs: number; cpuPerGiB: number }> {
  const speeds: number[] = [];
  let cpu = 0;
  for (let i = 0; i < BULK_RUNS; i++) {
    const c0 = machineCpuSeconds();
    const out = await sh("curl", [
      "-sSkf",
      "-o",
      "/dev/null",
      "--resolve",
      `localhost:${port}:127.0.0.1`,
      "-w",
      "%{speed_download} %{size_download}",
      `https://localhost:${port}/big`,
    ]);
    cpu += machineCpuSeconds() - c0;
    const [speed, size] = out.trim().split(" ").map(Number);
    if (size !== BIG_MIB << 20) {
      throw new Error(`bulk download got ${size} bytes, not ${BIG_MIB} MiB`);
    }
    speeds.push(speed / 1e6);
  }
  speeds.sort((a, b) => a - b);
  return {
    mbs: speeds[Math.floor(speeds.length / 2)],
    cpuPerGiB: cpu / (BULK_RUNS * BIG_MIB / 1024),
  };
}

function parseLatency(text: string, pct: string): number {
  const m = new RegExp(`^\\s*${pct}%\\s+([0-9.]+)(us|ms|s)`, "m").exec(text);
  if (!m) return NaN;
  const v = Number(m[1]);
  return m[2] === "us" ? v / 1000 : m[2] === "s" ? v * 1000 : v;
}

async function wrk(port: number, close: boolean) {
  const out = await sh("wrk", [
    "-t1",
    "-c50",
    `-d${DURATION}`,
    "--latency",
    ...(close ? ["-H", "Connection: close"] : []),
    `https://localhost:${port}/small`,
  ]);
  const rps = Number(/Requests\/sec:\s+([0-9.]+)/.exec(out)?.[1] ?? NaN);
  const errors = /Socket errors: (.*)/.exec(out)?.[1];
  if (errors) console.error(`    wrk socket errors: ${errors}`);
  return { rps, p50: parseLatency(out, "50"), p99: parseLatency(out, "99") };
}

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  return Number(m![1]);
}

/** Opens N TLS connections through the proxy and keeps them idle; returns KiB of proxy RSS per connection. */
async function idleRss(port: number, pid: number, n: number): Promise<number> {
  const conns: Deno.TlsConn[] = [];
  await new Promise((r) => setTimeout(r, 500));
  const before = rssKiB(pid);
  try {
    let failed = 0;
    let firstError = "";
    for (let i = 0; i < n; i += 100) {
      const batch = await Promise.allSettled(
        Array.from({ length: Math.min(100, n - i) }, async () => {
          const raw = await Deno.connect({ hostname: "127.0.0.1", port });
          const tls = await Deno.startTls(raw, { hostname: "localhost", caCerts: [backendCert] });
          conns.push(tls);
          await tls.handshake();
        }),
      );
      for (const r of batch) {
        if (r.status === "rejected") {
          failed++;
          firstError ||= `${r.reason} (after ${conns.length} connections)`;
        }
      }
    }
    if (failed) throw new Error(`${failed} of ${n} idle connections failed: ${firstError}`);
    await new Promise((r) => setTimeout(r, 1500));
    return (rssKiB(pid) - before) / n;
  } finally {
    for (const c of conns) {
      try {
        c.close();
      } catch { /* closed */ }
    }
  }
}

async function measure(mode: Mode, dir: string, nginxPort: number): Promise<Row> {
  let proxy: Proxy | null = null;
  if (mode !== "direct") proxy = await startProxy(dir, nginxPort, mode === "kernel");
  const port = proxy?.port ?? nginxPort;
  try {
    if (args["idle-only"]) {
      if (!proxy) throw new Error("--idle-only needs a proxy mode");
      const idle = await idleRss(port, proxy.pid, IDLE_CONNS);
      console.log(`  ${mode}: ${idle.toFixed(1)} KiB per idle connection at ${IDLE_CONNS}`);
      return { idleKiBPerConn: idle } as Row;
    }
    console.log(`  ${mode}: bulk...`);
    const b = await bulk(port);
    console.log(`  ${mode}: wrk keep-alive...`);
    const ka = await wrk(port, false);
    console.log(`  ${mode}: wrk new connection per request...`);
    const nc = await wrk(port, true);
    let idle: number | null = null;
    if (proxy) {
      console.log(`  ${mode}: ${IDLE_CONNS} idle connections...`);
      idle = await idleRss(port, proxy.pid, IDLE_CONNS);
    }
    return {
      bulkMBs: b.mbs,
      cpuSecPerGiB: b.cpuPerGiB,
      proxyCpuSecPerGiB: null,
      keepAliveRps: ka.rps,
      keepAliveP50ms: ka.p50,
      keepAliveP99ms: ka.p99,
      newConnRps: nc.rps,
      newConnP99ms: nc.p99,
      idleKiBPerConn: idle,
    };
  } finally {
    await proxy?.stop();
  }
}

function table(results: Partial<Record<Mode, Row>>, skipped: Record<string, string>): string {
  const modes = Object.keys(results) as Mode[];
  const fmt = (v: number | null | undefined, digits = 1) =>
    v === null || v === undefined || Number.isNaN(v) ? "–" : v.toFixed(digits);
  const metrics: [keyof Row, string, number][] = [
    ["bulkMBs", "bulk download MB/s", 0],
    ["cpuSecPerGiB", "machine CPU s per GiB (bulk)", 2],
    ["proxyCpuSecPerGiB", "proxy's share: CPU s per GiB above direct", 2],
    ["keepAliveRps", "keep-alive requests/s", 0],
    ["keepAliveP50ms", "keep-alive p50 ms", 2],
    ["keepAliveP99ms", "keep-alive p99 ms", 2],
    ["newConnRps", "new-connection requests/s", 0],
    ["newConnP99ms", "new-connection p99 ms", 2],
    ["idleKiBPerConn", `proxy RSS KiB per idle conn (${IDLE_CONNS})`, 1],
  ];
  const ratios: [Mode, Mode][] = [["userspace", "direct"], ["kernel", "direct"], [
    "kernel",
    "userspace",
  ]]
    .filter(([a, b]) => results[a as Mode] && results[b as Mode]) as [Mode, Mode][];
  const head = ["metric", ...modes, ...ratios.map(([a, b]) => `${a}/${b}`)];
  const rows = metrics.map(([k, label, d]) => [
    label,
    ...modes.map((m) => fmt(results[m]![k] as number | null, d)),
    ...ratios.map(([a, b]) => {
      const x = results[a]![k] as number | null;
      const y = results[b]![k] as number | null;
      return x === null || y === null || !y ? "–" : `${(x / y).toFixed(2)}x`;
    }),
  ]);
  const lines = [
    `| ${head.join(" | ")} |`,
    `| ${head.map(() => "---").join(" | ")} |`,
    ...rows.map((r) => `| ${r.join(" | ")} |`),
  ];
  for (const [m, why] of Object.entries(skipped)) lines.push(`\n${m} mode skipped: ${why}`);
  return lines.join("\n");
}

async function main() {
  need("nginx", "nginx");
  need("wrk", "wrk");
  need("curl", "curl");
  const dir = await Deno.makeTempDir({ prefix: "sni-bench-" });
  const nginx = await startNginx(dir);
  const results: Partial<Record<Mode, Row>> = {};
  const skipped: Record<string, string> = {};
  try {
    for (const mode of args.modes.split(",") as Mode[]) {
      if (mode === "kernel") {
        try {
          await Deno.stat(`${ROOT}bpf/sockmap.bpf.o`).catch(() => sh("bash", [`${ROOT}build.sh`]));
        } catch (e) {
          skipped.kernel = `cannot build the BPF object: ${(e as Error).message.split("\n")[0]}`;
          continue;
        }
      }
      console.log(`${mode}:`);
      try {
        results[mode] = await measure(mode, dir, nginx.port);
      } catch (e) {
        if (mode !== "kernel") throw e;
        skipped.kernel = (e as Error).message.split("\n").slice(0, 3).join(" ");
      }
    }
  } finally {
    const errors = await Deno.readTextFile(`${dir}/error.log`).catch(() => "");
    if (errors.trim()) {
      console.error(
        `nginx error.log (last lines):\n${errors.trim().split("\n").slice(-5).join("\n")}`,
      );
    }
    nginx.proc.kill("SIGTERM");
    await nginx.proc.status;
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
  const direct = results.direct;
  for (const row of Object.values(results)) {
    if (direct && row !== direct) row.proxyCpuSecPerGiB = row.cpuSecPerGiB - direct.cpuSecPerGiB;
  }
  const md = table(results, skipped);
  const cpuInfo = (await Deno.readTextFile("/proc/cpuinfo")).match(/model name\s*:\s*(.*)/)?.[1];
  const header =
    `sni-proxy bench ${new Date().toISOString()} — ${navigator.hardwareConcurrency} CPUs ` +
    `(${cpuInfo}), kernel ${Deno.osRelease()}, deno ${Deno.version.deno}; ` +
    `bulk: ${BIG_MIB} MiB x${BULK_RUNS} (curl), wrk -t1 -c50 -d${DURATION}, 1 KiB responses, nginx 1 worker`;
  console.log(`\n${header}\n\n${md}`);
  await Deno.mkdir(`${ROOT}bench/out`, { recursive: true });
  await Deno.writeTextFile(`${ROOT}bench/out/results.md`, `${header}\n\n${md}\n`);
  await Deno.writeTextFile(
    `${ROOT}bench/out/results.json`,
    JSON.stringify({ header, results, skipped }, null, 2),
  );
}

await main();
