/**
 * Real QUIC servers and clients for end-to-end tests: Debian's gtlsserver (ngtcp2) serving a
 * directory over HTTP/3 as a backend, and gtlsclient downloads by server name.
 *
 * ngtcp2 0.12's gtlsclient sends its HOST argument as the SNI (its --sni is not used), and
 * resolves it: each batch of clients runs in a private mount namespace whose /etc/hosts maps
 * the test names to 127.0.0.1 (the host's /etc/hosts is never touched). A batch is one shell
 * that starts every client at once and records each one's exit code.
 *
 * @module
 */
import { type Scope, sleep } from "./scope.ts";
import { testCerts } from "./certs.ts";

/** A gtlsserver serving `dir` on 127.0.0.1:`port` (UDP). */
export interface QuicBackend {
  port: number;
  dir: string;
  /** Its stderr so far (the request log, without -q). */
  log(): string;
}

/** Whether a UDP socket is bound to `port` (asked of `ss`: Deno reads /proc/net/udp short). */
async function udpBound(port: number): Promise<boolean> {
  const r = await new Deno.Command("ss", { args: ["-Huln", `sport = :${port}`] }).output();
  return new TextDecoder().decode(r.stdout).trim().length > 0;
}

/** A free UDP port on 127.0.0.1 (bound, then released). */
export function unusedUdpPort(): number {
  const s = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (s.addr as Deno.NetAddr).port;
  s.close();
  return port;
}

/**
 * Starts gtlsserver on a free UDP port serving `files` (name → content) with the test leaf
 * certificate (valid for the test names), with `extraArgs` (e.g. `-V`: a Retry first);
 * stopped when the scope closes.
 */
export async function quicBackend(
  s: Scope,
  files: Record<string, Uint8Array | string>,
  extraArgs: string[] = [],
): Promise<QuicBackend> {
  const certs = await testCerts();
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-h3-" });
  s.defer(() => Deno.remove(dir, { recursive: true }).catch(() => {}));
  const www = `${dir}/www`;
  await Deno.mkdir(www);
  for (const [name, body] of Object.entries(files)) {
    if (typeof body === "string") await Deno.writeTextFile(`${www}/${name}`, body);
    else await Deno.writeFile(`${www}/${name}`, body);
  }
  await Deno.writeTextFile(`${dir}/key.pem`, certs.keyPem);
  await Deno.writeTextFile(`${dir}/cert.pem`, certs.certPem);
  const port = unusedUdpPort();
  const child = new Deno.Command("gtlsserver", {
    args: [
      "-q",
      // a loaded 2-core machine may take seconds per handshake: do not give up on one
      "--handshake-timeout=60s",
      ...extraArgs,
      "-d",
      www,
      "127.0.0.1",
      String(port),
      `${dir}/key.pem`,
      `${dir}/cert.pem`,
    ],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let err = "";
  (async () => {
    const dec = new TextDecoder();
    for await (const c of child.stderr) err += dec.decode(c);
  })().catch(() => {});
  s.defer(async () => {
    try {
      child.kill("SIGKILL");
    } catch { /* gone */ }
    await child.status;
  });
  for (let i = 0; !(await udpBound(port)); i++) {
    if (i > 100) throw new Error(`gtlsserver did not bind udp ${port}: ${err}`);
    await sleep(20);
  }
  return { port, dir: www, log: () => err };
}

/** One download of a batch. */
export interface QuicGet {
  /** The server name (sent as SNI; resolves to 127.0.0.1). */
  name: string;
  /** The path on the server, without the leading slash. */
  path: string;
  /** More gtlsclient options (e.g. `--change-local-addr=100ms`). */
  args?: string[];
}

/** What one download gave. */
export interface QuicGot {
  code: number;
  /** The downloaded file, or null when none was written. */
  body: Uint8Array | null;
}

/** The names the private /etc/hosts maps to 127.0.0.1. */
const NAMES = ["localhost", "a.test", "b.test", "other.test", "nomatch.test"];

/**
 * Runs every download of `gets` at once through `ip`:`port` (the test names resolve to `ip`),
 * each within `timeoutS` seconds; their exit codes and files, in order.
 */
export async function quicDownloads(
  port: number,
  gets: QuicGet[],
  timeoutS = 20,
  ip = "127.0.0.1",
): Promise<QuicGot[]> {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-h3get-" });
  try {
    await Deno.writeTextFile(`${dir}/hosts`, `${ip} ${NAMES.join(" ")}\n`);
    const lines = gets.map((g, i) => {
      const out = `${dir}/${i}`;
      const args = [
        "-q",
        "--exit-on-first-stream-close",
        "--handshake-timeout=30s",
        "--timeout=10s",
        `--download=${out}`,
        ...(g.args ?? []),
        g.name,
        String(port),
        `https://${g.name}/${g.path}`,
      ];
      return `(mkdir -p ${out}; timeout ${timeoutS} gtlsclient ${args.join(" ")} ` +
        `>/dev/null 2>&1; echo $? > ${out}.rc) &`;
    });
    const script = `mount --bind ${dir}/hosts /etc/hosts || exit 99\n${lines.join("\n")}\nwait\n`;
    const r = await new Deno.Command("unshare", {
      args: ["-m", "--propagation", "private", "sh", "-c", script],
      stdout: "null",
      stderr: "piped",
    }).output();
    if (r.code === 99) throw new Error(`unshare: ${new TextDecoder().decode(r.stderr)}`);
    return await Promise.all(gets.map(async (g, i) => {
      const code = Number((await Deno.readTextFile(`${dir}/${i}.rc`).catch(() => "-1")).trim());
      const file = `${dir}/${i}/${g.path.split("/").pop() || "index.html"}`;
      const body = await Deno.readFile(file).catch(() => null);
      return { code, body };
    }));
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** One download through 127.0.0.1:`port`. */
export async function quicGet(port: number, get: QuicGet, timeoutS = 20): Promise<QuicGot> {
  return (await quicDownloads(port, [get], timeoutS))[0];
}

/** A UDP NAT stand-in between one client and a server that changes its outside port. */
export interface RebindingShim {
  /** Where the client sends (127.0.0.1). */
  port: number;
  /** The outside ports, in the order they are used: the first, then one per switch. */
  outside: number[];
  /** Datagrams the client sent after the (first) switch. */
  afterSwitch(): number;
  /** Switches made so far (the index in `outside` of the port last sent from). */
  switched(): number;
}

/**
 * Forwards one client's datagrams to 127.0.0.1:`target` from an outside socket, and switches
 * to another outside socket (a new source port, as a NAT rebinding) after every `switchAfter`
 * datagrams, `switches` times; what comes back on any is sent to the client. Closed with the
 * scope.
 */
export function rebindingShim(
  s: Scope,
  target: number,
  switchAfter: number,
  switches = 1,
): RebindingShim {
  const open = () => Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const front = open();
  const outs = Array.from({ length: switches + 1 }, open);
  s.defer(() => [front, ...outs].forEach((x) => x.close()));
  const to: Deno.NetAddr = { transport: "udp", hostname: "127.0.0.1", port: target };
  let client: Deno.Addr | null = null;
  let count = 0;
  const current = () => Math.min(Math.floor(count / switchAfter), switches);
  (async () => {
    for (;;) {
      const [d, from] = await front.receive();
      client = from;
      // the datagram numbered switchAfter + 1 is the first from the next port
      await outs[current()].send(d, to);
      count++;
    }
  })().catch(() => {});
  for (const out of outs) {
    (async () => {
      for (;;) {
        const [d] = await out.receive();
        if (client) await front.send(d, client);
      }
    })().catch(() => {});
  }
  const portOf = (x: Deno.DatagramConn) => (x.addr as Deno.NetAddr).port;
  return {
    port: portOf(front),
    outside: outs.map(portOf),
    afterSwitch: () => Math.max(0, count - switchAfter),
    switched: () => Math.min(Math.floor(Math.max(0, count - 1) / switchAfter), switches),
  };
}

/** The value of one sample of the proxy's metrics text (0 when absent). */
export function sample(text: string, name: string, labels = ""): number {
  const line = text.split("\n").find((l) => l.startsWith(`${name}${labels} `));
  return line ? Number(line.split(" ")[1]) : 0;
}

/** base64 SHA-256 of the test leaf's public key: what Chromium is told to accept. */
export async function testLeafSpki(): Promise<string> {
  const certs = await testCerts();
  const r = await new Deno.Command("sh", {
    args: [
      "-c",
      `openssl x509 -in ${certs.dir}/leaf.pem -pubkey -noout | ` +
      "openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64",
    ],
  }).output();
  return new TextDecoder().decode(r.stdout).trim();
}

/**
 * Headless Chromium loading https://`name`:`port`/ over HTTP/3 only (QUIC forced for the
 * origin, the name mapped to 127.0.0.1, the test leaf accepted by its key): the page's DOM.
 */
export async function chromiumDumpDom(name: string, port: number, timeoutS = 40): Promise<string> {
  const profile = await Deno.makeTempDir({ prefix: "quic-chromium-" });
  try {
    const r = await new Deno.Command("timeout", {
      args: [
        String(timeoutS),
        "chromium",
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        `--user-data-dir=${profile}`,
        `--origin-to-force-quic-on=${name}:${port}`,
        `--host-resolver-rules=MAP ${name} 127.0.0.1`,
        `--ignore-certificate-errors-spki-list=${await testLeafSpki()}`,
        "--dump-dom",
        `https://${name}:${port}/`,
      ],
      stdout: "piped",
      stderr: "null",
    }).output();
    return new TextDecoder().decode(r.stdout);
  } finally {
    await Deno.remove(profile, { recursive: true }).catch(() => {});
  }
}
