/**
 * The socket engine (src/io/) in tests: a fresh {@linkcode EventLoop} per test with everything
 * it opened closed afterwards, listening and connected sockets of the engine paired with Deno
 * clients or with each other, reads that wait for the socket's events, and what the kernel
 * holds in a socket's queues.
 *
 * @module
 */
import assert from "node:assert/strict";
import { E } from "../../ffi/socket.ts";
import { setSocketBuffer } from "../../ffi/libc.ts";
import { EventLoop, eventLoop, setLoopErrorSink } from "../../src/io/loop.ts";
import {
  connected,
  connectTcp,
  socketError,
  TcpListenSocket,
  type TcpSocket,
} from "../../src/io/tcp.ts";
import { ROOT, within } from "./scope.ts";
import { LineSplitter } from "../../src/net/bytes.ts";

/** One test's loop, the errors its handlers threw, and cleanups. */
export interface EngineRig {
  loop: EventLoop;
  /** What handlers threw (the loop's error sink). */
  errors: unknown[];
  /** Registers `cleanup` for the end of the test (last registered runs first). */
  defer(cleanup: () => void | Promise<void>): void;
}

/** The process's loop as tests use it: its handlers' errors are collected here. */
const processLoopErrors: unknown[] = [];
let processLoopReady = false;

/** Options of {@linkcode engineTest}. */
export interface EngineTestOptions {
  timeoutMs?: number;
  /**
   * Run on the process's loop (eventLoop()), not a fresh one: for code that hands work to it,
   * such as the Relay. It is not closed; everything the test opened on it is.
   */
  processLoop?: boolean;
}

/**
 * Declares a test on a fresh loop (or the process's), bounded in time; the loop and what the
 * test registered are closed afterwards. A handler error the test did not take out of
 * `rig.errors` fails it, and so does a descriptor left open (a fresh loop's own included).
 */
export function engineTest(
  name: string,
  fn: (rig: EngineRig) => Promise<void>,
  options: EngineTestOptions = {},
): void {
  const timeoutMs = options.timeoutMs ?? 20_000;
  Deno.test({
    name,
    // the loop's off-thread wait settles after the test (close() wakes it)
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      if (options.processLoop && !processLoopReady) {
        setLoopErrorSink((e) => processLoopErrors.push(e));
        processLoopReady = true;
      }
      const cleanups: (() => void | Promise<void>)[] = [];
      const fdsBefore = openFds();
      const errors = options.processLoop ? processLoopErrors : [];
      const loop = options.processLoop ? eventLoop() : new EventLoop((e) => errors.push(e));
      const rig: EngineRig = { loop, errors, defer: (c) => cleanups.push(c) };
      let passed = false;
      try {
        await within(timeoutMs, name, fn(rig));
        if (errors.length > 0) throw new Error(`handler errors: ${errors.join("; ")}`);
        passed = true;
      } finally {
        errors.length = 0;
        for (const c of cleanups.reverse()) {
          try {
            await c();
          } catch { /* best effort */ }
        }
        if (!options.processLoop) loop.close();
        // the loop closes its epoll and eventfd once its wait returns; Deno conns close theirs
        // once their pending reads are cancelled: then the count is what it was
        const settled = until("descriptors closed", () => openFds() <= fdsBefore, 3000);
        if (passed) await settled;
        else await settled.catch(() => {});
      }
    },
  });
}

/** A listening socket of the engine and a way to await its next connection. */
export interface EngineListener {
  socket: TcpListenSocket;
  port: number;
  /** The next accepted connection (the listener is watched only while one is awaited). */
  accept(): Promise<TcpSocket>;
}

/** Listens on `hostname`:0 with the engine (closed at the end of the test). */
export function engineListen(rig: EngineRig, hostname = "127.0.0.1", backlog = 64): EngineListener {
  const waiters: PromiseWithResolvers<TcpSocket>[] = [];
  const socket: TcpListenSocket = new TcpListenSocket(
    rig.loop,
    hostname,
    0,
    { reusePort: false, backlog },
    () => {
      while (waiters.length > 0) {
        const got = socket.accept();
        if (got === -E.EAGAIN) return;
        const w = waiters.shift()!;
        if (typeof got === "number") w.reject(socketError("accept", -got));
        else {
          rig.defer(() => got.close());
          w.resolve(got);
        }
      }
      // level-triggered: not watched while nobody awaits a connection
      socket.pause();
    },
  );
  rig.defer(() => socket.close());
  return {
    socket,
    port: socket.addr.port,
    accept() {
      const w = Promise.withResolvers<TcpSocket>();
      waiters.push(w);
      socket.resume();
      return w.promise;
    },
  };
}

/** A Deno client connected to an engine socket. */
export async function denoPair(
  rig: EngineRig,
  hostname = "127.0.0.1",
): Promise<{ conn: Deno.TcpConn; sock: TcpSocket; listener: EngineListener }> {
  const listener = engineListen(rig, hostname);
  const accepted = listener.accept();
  const conn = await Deno.connect({ hostname, port: listener.port });
  rig.defer(() => closeConn(conn));
  return { conn, sock: await accepted, listener };
}

/**
 * Two engine sockets connected to each other: `a` connected, `b` accepted (with a receive
 * buffer of `receiveBuffer` bytes when given: no autotuning, a small window).
 */
export async function enginePair(
  rig: EngineRig,
  receiveBuffer = 0,
): Promise<{ a: TcpSocket; b: TcpSocket }> {
  const listener = engineListen(rig);
  // set on the listening socket, it is the accepted socket's from the handshake on
  if (receiveBuffer) assert.equal(setSocketBuffer(listener.socket.fd, "receive", receiveBuffer), 0);
  const accepted = listener.accept();
  const a = connectTcp(rig.loop, "127.0.0.1", listener.port);
  rig.defer(() => a.close());
  await connected(a);
  return { a, b: await accepted };
}

/** An engine socket connected to a Deno server: `sock` connected, `conn` accepted. */
export async function engineToDeno(
  rig: EngineRig,
): Promise<{ sock: TcpSocket; conn: Deno.TcpConn }> {
  const server = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  rig.defer(() => server.close());
  const accepted = server.accept();
  const sock = connectTcp(rig.loop, "127.0.0.1", server.addr.port);
  rig.defer(() => sock.close());
  await connected(sock);
  const conn = await accepted;
  rig.defer(() => closeConn(conn));
  return { sock, conn };
}

/** Closes a Deno conn, ignoring "already closed". */
export function closeConn(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch { /* closed already */ }
}

/** One recv into `buf` that waits for the socket's events on EAGAIN: bytes, 0 at EOF, -errno. */
export async function recvWait(sock: TcpSocket, buf: Uint8Array): Promise<number> {
  for (;;) {
    const n = sock.recv(buf);
    if (n !== -E.EAGAIN) return n;
    if ((await sock.nextEvent()) === 0) return -E.EBADF;
  }
}

/** Reads `n` bytes from an engine socket (throws at EOF or an error before). */
export async function recvExact(sock: TcpSocket, n: number): Promise<Uint8Array> {
  const out = new Uint8Array(n);
  let have = 0;
  while (have < n) {
    const got = await recvWait(sock, out.subarray(have));
    if (got === 0) throw new Error(`EOF after ${have} of ${n} bytes`);
    if (got < 0) throw socketError("recv", -got);
    have += got;
  }
  return out;
}

/** Waits for `sock`'s events until `ready()` holds (returns at once when it does). */
export async function untilEvent(sock: TcpSocket, ready: () => boolean): Promise<void> {
  while (!ready()) {
    if ((await sock.nextEvent()) === 0) throw new Error("socket closed while waiting");
  }
}

const IOCTLS = {
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;
let ioctlLib: Deno.DynamicLibrary<typeof IOCTLS>["symbols"] | null = null;
const ioctlArg = new Int32Array(1);

/** SIOCINQ (FIONREAD): bytes in the receive queue. */
const SIOCINQ = 0x541bn;
/** SIOCOUTQNSD: bytes in the send queue not yet sent. */
const SIOCOUTQNSD = 0x894bn;
/** SIOCOUTQ (TIOCOUTQ): bytes in the send queue, sent or not, not yet acknowledged. */
const SIOCOUTQ = 0x5411n;

function queueIoctl(fd: number, request: bigint): number {
  ioctlLib ??= Deno.dlopen("libc.so.6", IOCTLS).symbols;
  if (ioctlLib.ioctl(fd, request, new Uint8Array(ioctlArg.buffer)) !== 0) return -1;
  return ioctlArg[0];
}

/** Bytes in `fd`'s queues: received and unread; unacknowledged; not yet sent. */
export function queues(fd: number): { inq: number; outq: number; unsent: number } {
  return {
    inq: queueIoctl(fd, SIOCINQ),
    outq: queueIoctl(fd, SIOCOUTQ),
    unsent: queueIoctl(fd, SIOCOUTQNSD),
  };
}

/** Polls `cond` every few ms until it holds (a kernel state with no event to await). */
export async function until(what: string, cond: () => boolean, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Descriptors open in this process now. */
export function openFds(): number {
  let n = -1; // the directory's own descriptor while it is read
  for (const _ of Deno.readDirSync("/proc/self/fd")) n++;
  return n;
}

/** A Deno script of tests/fixtures/ as a child process that speaks lines on stdio. */
export interface LineChild {
  pid: number;
  /** The next line it prints. */
  line(): Promise<string>;
  /** Writes `line` to its stdin and returns its next line of output. */
  ask(line: string): Promise<string>;
}

/**
 * Runs `deno run -A --unstable-net tests/fixtures/SCRIPT ARGS` (under `wrapper`, e.g.
 * prlimit); killed when `scope` closes.
 */
export function spawnFixture(
  scope: { defer(c: () => void | Promise<void>): void },
  script: string,
  args: string[] = [],
  wrapper: string[] = [],
): LineChild {
  const argv = [
    ...wrapper,
    Deno.execPath(),
    "run",
    "-A",
    "--unstable-net",
    `${ROOT}tests/fixtures/${script}`,
    ...args,
  ];
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdin: "piped",
    stdout: "piped",
    stderr: "inherit",
    env: { DENO_NO_UPDATE_CHECK: "1" },
  }).spawn();
  scope.defer(async () => {
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await child.status;
  });
  const lines = new LineSplitter();
  const reader = child.stdout.getReader();
  const writer = child.stdin.getWriter();
  const line = async () => {
    for (;;) {
      const l = lines.shift();
      if (l !== null) return l;
      const { value, done } = await reader.read();
      if (done) throw new Error(`${script} exited`);
      lines.push(value);
    }
  };
  return {
    pid: child.pid,
    line,
    async ask(l: string) {
      await writer.write(new TextEncoder().encode(`${l}\n`));
      return await line();
    },
  };
}

/** CPU time (user + system) a process used so far, in seconds. */
export function cpuSeconds(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  // fields after the command name: state is field 3, utime 14, stime 15 (clock ticks, 100/s)
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) / 100;
}
