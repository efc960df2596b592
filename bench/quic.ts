/**
 * The QUIC test: HTTP/3 downloads (Debian's gtlsclient, ngtcp2) from a gtlsserver backend,
 * directly and through a `quic` listener of the proxy forwarding in userspace and in the kernel
 * (`ebpf.quic` on `lo`: a tc program forwards a routed flow's datagrams).
 *
 * Per column: the handshake (the client's first Initial sent to the server's first flight in,
 * from its syscall trace) and the wall time of a tiny download (untraced);
 * MB/s of big downloads, one at a time, with the machine's and the proxy process's CPU and
 * the datagrams the process forwarded (its /metrics) against those the kernel forwarded; the
 * proxy's CPU per new flow over many tiny downloads, a few at a time. The proxy runs with
 * `workers: 1`: its CPU is one process's utime + stime.
 *
 * @module
 */
import { median } from "./load.ts";
import {
  exitedChildrenCpuSeconds,
  machineCpuSeconds,
  machineIrqSeconds,
  sh,
  sleep,
  spawn,
  stop,
  threadsCpuSeconds,
} from "./procs.ts";
import { launchProxy, needBpfObject, type Proxy, type ProxyMode } from "./proxy.ts";

/** How much the QUIC test does per column (see settings.ts). */
export interface QuicOptions {
  /** tiny downloads (each a new flow) for the CPU per new flow; 0: no QUIC test */
  flows: number;
  /** big downloads, one at a time */
  downloads: number;
  /** size of one big download */
  fileBytes: number;
  /** tiny downloads timed one at a time for the handshake */
  handshakes: number;
}

/** What the QUIC test measured in one column. */
export interface QuicResult {
  /** median, first Initial sent to handshake completed, client side */
  handshakeMs: number;
  /** median wall time of a tiny download (process start to exit) */
  tinyMs: number;
  /** median MB/s (10^6 bytes) of the big downloads */
  mbs: number;
  /** over all big downloads: bytes, CPU seconds, datagrams */
  bulk: {
    bytes: number;
    /** the whole machine's (other programs on a shared machine included) */
    machineCpuS: number;
    /** the client's, the server's and the proxy's, and the machine's irq and softirq time */
    ownCpuS: number;
    proxyCpuS: number;
    /** datagrams the proxy process forwarded (both ways) */
    processDatagrams: number;
    /** datagrams the kernel program forwarded (both ways) */
    kernelDatagrams: number;
  };
  /** the tiny downloads for the CPU per flow: how many, proxy CPU seconds, wall seconds */
  flows: { count: number; proxyCpuS: number; seconds: number };
}

/** The columns of the QUIC test, in table order. */
export const QUIC_COLUMNS = ["direct", "userspace", "kernel"] as const;

/** The proxy's `ebpf` section per QUIC column (the TCP relay mode stays userspace). */
const QUIC_MODES: Record<string, ProxyMode> = {
  userspace: { name: "userspace", ebpf: { enabled: false } },
  kernel: {
    name: "kernel",
    reports: "userspace",
    ebpf: { enabled: true, quic: { interfaces: ["lo"] } },
    prepare: () => needBpfObject("quic.bpf.o"),
  },
};

/** The name every download asks for: its SNI and route (the host's /etc/hosts resolves it). */
const NAME = "localhost";
/** Tiny downloads running at once in the per-flow test. */
export const FLOW_CONCURRENCY = 4;
/** Seconds one gtlsclient run may take. */
const CLIENT_TIMEOUT_S = 30;

/** A gtlsserver serving `big` and `small` on 127.0.0.1 (UDP). */
export interface QuicServer {
  port: number;
  pid: number;
  stop(): Promise<void>;
}

/** A free UDP port on 127.0.0.1 (bound, then released). */
function freeUdpPort(): number {
  const s = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (s.addr as Deno.NetAddr).port;
  s.close();
  return port;
}

/**
 * Starts gtlsserver in `dir` with a self-signed certificate for {@link NAME}: `big` (a sparse
 * file of `bytes`) and `small` (2 bytes).
 */
export async function startQuicServer(dir: string, bytes: number): Promise<QuicServer> {
  await Deno.mkdir(`${dir}/www`, { recursive: true });
  await sh("openssl", [
    ...["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"],
    ...["-subj", `/CN=${NAME}`, "-addext", `subjectAltName=DNS:${NAME}`, "-days", "2"],
    ...["-keyout", `${dir}/key.pem`, "-out", `${dir}/cert.pem`],
  ]);
  const big = await Deno.open(`${dir}/www/big`, { create: true, write: true });
  await big.truncate(bytes);
  big.close();
  await Deno.writeTextFile(`${dir}/www/small`, "q\n");
  const port = freeUdpPort();
  const child = spawn("gtlsserver", {
    args: [
      ...["-q", "--handshake-timeout=60s", "-d", `${dir}/www`, "127.0.0.1", String(port)],
      ...[`${dir}/key.pem`, `${dir}/cert.pem`],
    ],
    stdout: "null",
    stderr: "null",
  });
  for (let i = 0;; i++) {
    if ((await sh("ss", ["-Huln", `sport = :${port}`])).trim()) break;
    if (i > 100) throw new Error(`gtlsserver did not bind udp ${port}`);
    await sleep(20);
  }
  return { port, pid: child.pid, stop: () => stop(child, "SIGKILL") };
}

/** One gtlsclient download of `path` via 127.0.0.1:`port` into `out`; its wall seconds. */
async function download(port: number, path: string, out: string, bytes: number) {
  await Deno.mkdir(out, { recursive: true });
  const t0 = performance.now();
  const child = spawn("timeout", {
    args: [
      ...[String(CLIENT_TIMEOUT_S), "gtlsclient", "-q", "--exit-on-first-stream-close"],
      ...["--handshake-timeout=10s", "--timeout=10s", `--download=${out}`],
      ...[NAME, String(port), `https://${NAME}/${path}`],
    ],
    stdout: "null",
    stderr: "null",
  });
  const status = await child.status;
  const seconds = (performance.now() - t0) / 1000;
  const got = (await Deno.stat(`${out}/${path}`).catch(() => null))?.size ?? 0;
  await Deno.remove(`${out}/${path}`).catch(() => {});
  if (!status.success || got !== bytes) {
    throw new Error(`gtlsclient ${path}: exit ${status.code}, ${got} of ${bytes} bytes`);
  }
  return seconds;
}

/**
 * The handshake in a client's syscall trace (`strace -ttt`, µs): from its first UDP datagram
 * sent (the Initial) to the last one received before it sends again (its Finished, once the
 * server's whole first flight is in). Milliseconds, or undefined when the trace has neither.
 */
export function handshakeFromTrace(trace: string): number | undefined {
  let sent: number | undefined;
  let received: number | undefined;
  for (const line of trace.split("\n")) {
    const m = /^(\d+\.\d+) (send|recv)m?msg\(\d+, \{msg_name=\{sa_family=AF_INET6?,.* = (\d+)$/
      .exec(line);
    if (!m) continue;
    const t = Number(m[1]) * 1000;
    if (m[2] === "send") {
      if (sent !== undefined && received !== undefined) return received - sent;
      sent ??= t;
    } else if (sent !== undefined && Number(m[3]) > 0) received = t;
  }
  return undefined;
}

/** A tiny download traced with strace: its handshake in ms (see handshakeFromTrace). */
export async function timedHandshake(port: number, out: string) {
  await Deno.mkdir(out, { recursive: true });
  const trace = `${out}/trace`;
  const child = spawn("timeout", {
    args: [
      ...[String(CLIENT_TIMEOUT_S), "strace", "-ttt", "-o", trace, "-e"],
      ...["trace=sendmsg,recvmsg,sendmmsg,recvmmsg", "gtlsclient", "-q"],
      ...["--exit-on-first-stream-close", "--handshake-timeout=10s", `--download=${out}`],
      ...[NAME, String(port), `https://${NAME}/small`],
    ],
    stdout: "null",
    stderr: "null",
  });
  const status = await child.status;
  const handshakeMs = handshakeFromTrace(await Deno.readTextFile(trace).catch(() => ""));
  if (!status.success || handshakeMs === undefined) {
    throw new Error(`gtlsclient small (traced): exit ${status.code}, no handshake in the trace`);
  }
  return handshakeMs;
}

/** The value of a sample of a metrics text (0 when absent). */
function sample(text: string, name: string, labels = ""): number {
  const line = text.split("\n").find((l) => l.startsWith(`${name}${labels} `));
  return line ? Number(line.split(" ")[1]) : 0;
}

/** Datagrams the proxy process and its kernel program have forwarded so far (both ways). */
async function datagrams(proxy: Proxy | null): Promise<{ process: number; kernel: number }> {
  if (!proxy?.metrics) return { process: 0, kernel: 0 };
  const m = await (await fetch(`http://${proxy.metrics}/metrics`)).text();
  const p = "sni_proxy_";
  return {
    process: sample(m, `${p}quic_datagrams_total`, '{direction="up"}') +
      sample(m, `${p}quic_datagrams_total`, '{direction="down"}'),
    kernel: sample(m, `${p}kernel_quic_to_backend_packets_total`) +
      sample(m, `${p}kernel_quic_to_client_packets_total`),
  };
}

/** The proxy's CPU seconds so far (0 without a proxy), to the nanosecond. */
const proxyCpu = (proxy: Proxy | null) => proxy ? threadsCpuSeconds(proxy.pid) : 0;

/** CPU seconds so far: the machine's; the proxy's; the server's + exited clients' + irq. */
function cpuNow(server: QuicServer, proxy: Proxy | null) {
  const p = proxyCpu(proxy);
  const own = threadsCpuSeconds(server.pid) + exitedChildrenCpuSeconds() + machineIrqSeconds();
  return { machine: machineCpuSeconds(), proxy: p, own: own + p };
}

/** The big downloads, one at a time: MB/s of each, CPU and datagrams over all of them. */
async function bulk(server: QuicServer, c: Column, o: QuicOptions) {
  const d0 = await datagrams(c.proxy);
  const c0 = cpuNow(server, c.proxy);
  const mbs: number[] = [];
  for (let i = 0; i < o.downloads; i++) {
    mbs.push(o.fileBytes / 1e6 / await download(c.port, "big", c.out, o.fileBytes));
  }
  const c1 = cpuNow(server, c.proxy);
  const d1 = await datagrams(c.proxy);
  return {
    mbs: median(mbs),
    bulk: {
      bytes: o.fileBytes * o.downloads,
      machineCpuS: c1.machine - c0.machine,
      ownCpuS: c1.own - c0.own,
      proxyCpuS: c1.proxy - c0.proxy,
      processDatagrams: d1.process - d0.process,
      kernelDatagrams: d1.kernel - d0.kernel,
    },
  };
}

/** `count` tiny downloads, {@link FLOW_CONCURRENCY} at a time: the proxy's CPU over them. */
async function flows(port: number, proxy: Proxy | null, count: number, out: string) {
  const [t0, p0] = [performance.now(), proxyCpu(proxy)];
  let next = 0;
  await Promise.all(Array.from({ length: FLOW_CONCURRENCY }, async (_, w) => {
    while (next < count) {
      next++;
      await download(port, "small", `${out}/flow${w}`, 2);
    }
  }));
  return { count, proxyCpuS: proxyCpu(proxy) - p0, seconds: (performance.now() - t0) / 1000 };
}

/** Where a column's clients go: the server's port or the proxy's; their download directory. */
interface Column {
  port: number;
  proxy: Proxy | null;
  out: string;
}

/** Every measurement of one column. */
async function measureColumn(server: QuicServer, c: Column, o: QuicOptions): Promise<QuicResult> {
  await download(c.port, "small", c.out, 2); // warm-up: the first run loads the client's libraries
  const hs: number[] = [];
  const tiny: number[] = [];
  for (let i = 0; i < o.handshakes; i++) {
    hs.push(await timedHandshake(c.port, c.out));
    tiny.push(await download(c.port, "small", c.out, 2) * 1000);
  }
  const b = await bulk(server, c, o);
  return {
    handshakeMs: median(hs),
    tinyMs: median(tiny),
    ...b,
    flows: await flows(c.port, c.proxy, o.flows, c.out),
  };
}

/** Writes the QUIC proxy config of `mode` in front of `backendPort`; starts the proxy. */
async function startQuicProxy(dir: string, backendPort: number, mode: ProxyMode) {
  const config = {
    workers: 1,
    listeners: [{ address: "127.0.0.1:0", protocol: "quic" }],
    routes: [{ match: NAME, backends: [`127.0.0.1:${backendPort}`] }],
    metrics: { address: "127.0.0.1:0" },
    timeouts: { drain_ms: 1000 },
    log: { level: "info", file: false, access_log: false },
    ebpf: mode.ebpf,
  };
  const path = `${dir}/proxy-quic-${mode.name}.json`;
  await Deno.writeTextFile(path, JSON.stringify(config, null, 2));
  const proxy = await launchProxy(path, mode);
  const why = /QUIC kernel forwarding unavailable[^\n]*/.exec(proxy.log?.() ?? "")?.[0];
  if (mode.name === "kernel" && why) {
    await proxy.stop();
    throw new Error(why);
  }
  return proxy;
}

/** Where the QUIC test runs and what it does; it records into `results` and `skipped`. */
export interface QuicTestOptions {
  dir: string;
  /** the columns asked for: those of {@link QUIC_COLUMNS} among them run */
  columns: string[];
  options: QuicOptions;
  /** per column: its result */
  record(column: string, proxied: boolean, r: QuicResult): void;
  /** a column that could not run, and why */
  skip(column: string, why: string): void;
}

/**
 * Runs the QUIC test in each column asked for; a column that fails (no gtlsclient, kernel
 * forwarding unavailable) is skipped with the reason.
 */
export async function measureQuic(t: QuicTestOptions): Promise<void> {
  const dir = `${t.dir}/quic`;
  const server = await startQuicServer(dir, t.options.fileBytes);
  try {
    for (const column of QUIC_COLUMNS.filter((c) => t.columns.includes(c))) {
      const t0 = performance.now();
      let proxy: Proxy | null = null;
      try {
        const why = await QUIC_MODES[column]?.prepare?.();
        if (why) throw new Error(why);
        if (column !== "direct") proxy = await startQuicProxy(dir, server.port, QUIC_MODES[column]);
        const c = { port: proxy?.port ?? server.port, proxy, out: `${dir}/dl` };
        t.record(column, proxy !== null, await measureColumn(server, c, t.options));
        console.log(`  QUIC ${column}: ${((performance.now() - t0) / 1000).toFixed(1)} s`);
      } catch (e) {
        const why = (e instanceof Error ? e.message : String(e)).split("\n")[0];
        console.log(`  QUIC ${column}: skipped: ${why}`);
        t.skip(column, why);
      } finally {
        await proxy?.stop();
      }
    }
  } finally {
    await server.stop();
  }
}
