/**
 * Real QUIC clients sending their first flight to a UDP socket that never answers: Debian's
 * gtlsclient (ngtcp2) and Chromium. Each runs in its own session (setsid) and is ended with every
 * process it started; the wait for datagrams is bounded.
 *
 * @module
 */

/** How a capture waits. */
export interface FlightLimits {
  /** The most time for the first datagram (a browser takes a while to start). */
  firstWithinMs?: number;
  /** The flight ends when this long passes without a datagram. */
  quietMs?: number;
  /** The most datagrams kept. */
  maxDatagrams?: number;
}

/**
 * The datagrams a client started by `start(port)` sends to a silent socket on 127.0.0.1 in its
 * first flight; the client is killed afterwards.
 */
export async function captureFirstFlight(
  start: (port: number) => Deno.ChildProcess,
  limits: FlightLimits = {},
): Promise<Uint8Array[]> {
  const { firstWithinMs = 15_000, quietMs = 400, maxDatagrams = 8 } = limits;
  const sock = Deno.listenDatagram({ transport: "udp", hostname: "127.0.0.1", port: 0 });
  const port = (sock.addr as Deno.NetAddr).port;
  const child = start(port);
  const got: Uint8Array[] = [];
  try {
    while (got.length < maxDatagrams) {
      const wait = got.length === 0 ? firstWithinMs : quietMs;
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<null>((r) => timer = setTimeout(() => r(null), wait));
      const next = await Promise.race([sock.receive(), timeout]);
      clearTimeout(timer);
      if (next === null) break;
      got.push(next[0]);
    }
  } finally {
    try {
      Deno.kill(-child.pid, "SIGKILL");
    } catch { /* already gone */ }
    await child.status;
    sock.close();
  }
  return got;
}

/** Whether `cmd` is on the PATH. */
export async function haveCommand(cmd: string): Promise<boolean> {
  const r = await new Deno.Command("sh", {
    args: ["-c", `command -v ${cmd}`],
    stdout: "null",
  }).output();
  return r.success;
}

const quiet = { stdout: "null", stderr: "null" } as const;

/**
 * The gtlsclient arguments for 127.0.0.1:PORT. ngtcp2 0.12's GnuTLS client sends its HOST
 * argument as the server name (its --sni is not used there), and only "localhost" resolves to
 * 127.0.0.1 without touching /etc/hosts: the name is "localhost".
 */
export function gtlsclientArgs(port: number | string): string[] {
  return [
    "-q",
    "--exit-on-first-stream-close",
    "--handshake-timeout=5s",
    "localhost",
    `${port}`,
    "https://localhost/",
  ];
}

/** Starts gtlsclient towards 127.0.0.1:`port`. */
export function startGtlsclient(port: number): Deno.ChildProcess {
  return new Deno.Command("setsid", { args: ["gtlsclient", ...gtlsclientArgs(port)], ...quiet })
    .spawn();
}

/** The Chromium arguments that force QUIC to `name`:PORT mapped to 127.0.0.1. */
export function chromiumArgs(name: string, port: number | string, profile: string): string[] {
  return [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    `--user-data-dir=${profile}`,
    `--origin-to-force-quic-on=${name}:${port}`,
    `--host-resolver-rules=MAP ${name} 127.0.0.1`,
    `https://${name}:${port}/`,
  ];
}

/** The first flight of headless Chromium asking https://`name`/ over QUIC. */
export async function chromiumFirstFlight(
  name: string,
  limits: FlightLimits = {},
): Promise<Uint8Array[]> {
  const profile = Deno.makeTempDirSync({ prefix: "quic-chromium-" });
  try {
    return await captureFirstFlight(
      (port) =>
        new Deno.Command("setsid", {
          args: ["chromium", ...chromiumArgs(name, port, profile)],
          ...quiet,
        }).spawn(),
      limits,
    );
  } finally {
    // the browser's helpers may still be writing as they die
    for (let i = 0; i < 20; i++) {
      try {
        Deno.removeSync(profile, { recursive: true });
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }
}
