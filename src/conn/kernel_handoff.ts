/**
 * Kernel mode's part of one session: handing the connected pair to the kernel, and taking it
 * back at the end. In `ebpf.splice_mode` "sockmap" the pair is put in the sockmap (its bytes are
 * redirected by the kernel; userspace sees EOFs, resets and stray bytes); in "pipe" splice(2)
 * moves them through pipes. Either way the sockets leave Deno's event loop when they can
 * (src/conn/detach.ts), and the relay then is {@link SplicedRelay} or {@link PipedRelay}; a pair
 * that does not qualify, or whose sockets cannot leave, stays with the userspace relay.
 *
 * @module
 */
import { type KernelAccel, KernelAccelError, type SplicePair } from "../ebpf/sockmap.ts";
import type { ClientHello } from "../proto/clienthello.ts";
import { BurstLog, logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { errText } from "../ops/errtext.ts";
import { parseIp } from "../net/ip.ts";
import { socketCookie, socketEnds } from "../../ffi/libc.ts";
import type { ByteRelay, SpliceHooks } from "./relay.ts";
import type { ByteCounts, KernelPart } from "./conn_record.ts";
import { SplicedRelay } from "./spliced.ts";
import { PipedRelay, type PipePool } from "./piped.ts";
import {
  backendFdHint,
  type DetachedPair,
  detachSockets,
  type SocketCheck,
  watcher,
} from "./detach.ts";
import { afterPeerFin } from "./tcpinfo.ts";

const log = logger("session");
const bursts = new BurstLog(log);

/** The `ebpf` settings a handoff reads. */
export interface KernelRelaySettings {
  /** Sockmap mode: take spliced sockets out of Deno's event loop. */
  detachSpliced: boolean;
  /** Sockmap mode: how long a socket may take no redirected byte before the pair is cut. */
  drainTimeoutMs: number;
  /** Pipe mode: both sockets' buffer sizes, when above 0. */
  sndbuf: number;
  rcvbuf: number;
}

/** What a session's handoff needs. */
export interface KernelHandoffOptions {
  /** The sockmap fast path (`ebpf.splice_mode` "sockmap"), or null. */
  kernel: KernelAccel | null;
  /** The pipes of `ebpf.splice_mode` "pipe", or null. */
  pipes: PipePool | null;
  ebpf: KernelRelaySettings;
  metrics: Metrics;
  /** The client, for log lines. */
  clientAddr: string;
  /** The idle timeout of the relay (`timeouts.idle_ms`). */
  idleMs: number;
}

/** What the session forwards first, and what it read of the client. */
export interface Opening {
  /** What to write to the backend first: any PROXY header, then the client's bytes so far. */
  first: Uint8Array;
  /** Of `first`, the client's bytes (the hello, and anything it sent after it). */
  clientBytes: number;
  /** The parsed ClientHello (TLS listeners), or null. */
  hello: ClientHello | null;
}

/**
 * Where {@link KernelHandoff.handOff} put a pair: with a kernel relay, which writes
 * `opening.first` itself (the sockets left Deno's event loop); or with the session, which writes
 * it and runs the userspace relay, with `hooks` when the sockmap splices the pair.
 */
export type Handed = { relay: ByteRelay } | { relay: null; hooks: SpliceHooks | undefined };

/** The pair stays with the session's userspace relay, without hooks. */
const IN_USERSPACE: Handed = { relay: null, hooks: undefined };

/** One session's way into the kernel, and back. */
export interface KernelHandoff extends KernelPart {
  /** Called right before each backend connect: notes the fd the backend socket will likely get. */
  beforeConnect(): void;
  /** Hands the connected pair to the kernel, when it qualifies: see {@link Handed}. */
  handOff(backend: Deno.TcpConn, opening: Opening): Handed;
  /** Removes the kernel pairing (once; before the sockets close), keeping its byte counts. */
  release(): void;
}

/** The handoff of `client`'s session in the proxy's kernel mode; null in userspace mode. */
export function kernelHandoff(
  client: Deno.TcpConn,
  options: KernelHandoffOptions,
): KernelHandoff | null {
  if (options.pipes) return new PipeHandoff(client, options.pipes, options);
  if (options.kernel) return new SockmapHandoff(client, options.kernel, options);
  return null;
}

/**
 * The warning that the sockets cannot leave Deno's event loop was logged: once per process, as
 * what it depends on (the Deno build, its epoll) is the process's.
 */
let detachWarned = false;

/** Takes the pair's sockets out of Deno's loop, or warns (once) why not and returns null. */
function detach(
  client: Deno.TcpConn,
  backend: Deno.TcpConn,
  options: { check: SocketCheck; fdHint: number; consequence: string },
): DetachedPair | null {
  const pair = detachSockets(client, backend, options.check, options.fdHint);
  if (typeof pair !== "string") return pair;
  if (!detachWarned) {
    detachWarned = true;
    log.warn(
      `kernel mode: the sockets cannot leave Deno's event loop (${pair}); ${options.consequence}`,
    );
  }
  return null;
}

/** Whether an fd is `conn`'s socket: the whole 4-tuple (two backend sockets can share ports). */
function sameEnds(conn: Deno.TcpConn): (fd: number) => boolean {
  const want = [conn.localAddr, conn.remoteAddr].map((a) => {
    const n = a as Deno.NetAddr;
    return { ip: parseIp(n.hostname), port: n.port };
  });
  return (fd: number) => {
    const ends = socketEnds(fd);
    if (!ends) return false;
    return [ends.local, ends.remote].every((end, i) => {
      const w = want[i];
      return w.ip !== null && end.port === w.port && end.family === w.ip.family &&
        end.bytes.every((b, j) => b === w.ip!.bytes[j]);
    });
  };
}

/** Counts a kernel-mode connection that runs in userspace instead; logs once per burst. */
function kernelFallback(m: Metrics, reason: string, detail: string): void {
  Metrics.bump(m.kernelFallbacks, reason);
  bursts.warn("kernel_fallback", `kernel mode: a connection runs in userspace mode: ${detail}`);
}

/** `ebpf.splice_mode` "pipe": the pair is relayed by splice(2) through the pool's pipes. */
class PipeHandoff implements KernelHandoff {
  readonly #client: Deno.TcpConn;
  readonly #pipes: PipePool;
  readonly #options: KernelHandoffOptions;
  #fdHint = -1;
  /** The pair is relayed by splice(2). */
  #piped = false;
  /** The relay counts what splice(2) moves as its own bytes. */
  readonly kernelBytes: ByteCounts = { up: 0, down: 0 };
  readonly undelivered: ByteCounts = { up: 0, down: 0 };

  constructor(client: Deno.TcpConn, pipes: PipePool, options: KernelHandoffOptions) {
    this.#client = client;
    this.#pipes = pipes;
    this.#options = options;
  }

  get mode(): "userspace" | "kernel" {
    return this.#piped ? "kernel" : "userspace";
  }

  beforeConnect(): void {
    this.#fdHint = backendFdHint();
  }

  handOff(backend: Deno.TcpConn, opening: Opening): Handed {
    const pair = detach(this.#client, backend, {
      check: { client: sameEnds(this.#client), backend: sameEnds(backend) },
      fdHint: this.#fdHint,
      consequence: "connections run in userspace mode",
    });
    if (!pair) return IN_USERSPACE;
    this.#piped = true;
    const { idleMs, ebpf: { sndbuf, rcvbuf } } = this.#options;
    const first = opening.first;
    return { relay: new PipedRelay(pair, this.#pipes, { idleMs, first, sndbuf, rcvbuf, watcher }) };
  }

  // nothing is paired in the kernel: the relay gives its pipes back to the pool when it ends
  release(): void {}
}

/** `ebpf.splice_mode` "sockmap": the kernel redirects the pair's bytes between the sockets. */
class SockmapHandoff implements KernelHandoff {
  readonly #client: Deno.TcpConn;
  readonly #kernel: KernelAccel;
  readonly #options: KernelHandoffOptions;
  #fdHint = -1;
  /** The pairing in the sockmap, once made. */
  #pair: SplicePair | null = null;
  #released = false;
  #kernelBytes: ByteCounts = { up: 0, down: 0 };
  readonly undelivered: ByteCounts = { up: 0, down: 0 };

  constructor(client: Deno.TcpConn, kernel: KernelAccel, options: KernelHandoffOptions) {
    this.#client = client;
    this.#kernel = kernel;
    this.#options = options;
  }

  get mode(): "userspace" | "kernel" {
    return this.#pair ? "kernel" : "userspace";
  }

  beforeConnect(): void {
    if (this.#options.ebpf.detachSpliced) this.#fdHint = backendFdHint();
  }

  get kernelBytes(): ByteCounts {
    return this.#kernelBytes;
  }

  handOff(backend: Deno.TcpConn, opening: Opening): Handed {
    const pair = this.#pairUp(backend, opening);
    if (!pair) return IN_USERSPACE;
    const hooks = new SockmapHooks({
      kernel: this.#kernel,
      pair,
      client: this.#client,
      backend,
      firstBytes: opening.first.length,
      clientAddr: this.#options.clientAddr,
      drainMs: this.#options.ebpf.drainTimeoutMs,
      undelivered: this.undelivered,
      unpair: () => this.release(),
    });
    if (!this.#options.ebpf.detachSpliced) return { relay: null, hooks };
    const { cookies } = pair;
    const detached = detach(this.#client, backend, {
      check: {
        client: (fd) => socketCookie(fd) === cookies.a,
        backend: (fd) => socketCookie(fd) === cookies.b,
      },
      fdHint: this.#fdHint,
      consequence: "spliced sockets stay in Deno's event loop: the proxy is woken by their traffic",
    });
    const { idleMs } = this.#options;
    if (!detached) return { relay: null, hooks };
    return { relay: new SplicedRelay(detached, { idleMs, hooks, first: opening.first, watcher }) };
  }

  release(): void {
    if (!this.#pair || this.#released) return;
    this.#released = true;
    const c = this.#kernel.unpair(this.#pair);
    this.#kernelBytes = { up: c.aToB, down: c.bToA };
  }

  /**
   * Puts the pair in the sockmap when it qualifies (a TLS hello alone, without early data);
   * returns the pairing, or null to stay in userspace.
   */
  #pairUp(backend: Deno.TcpConn, opening: Opening): SplicePair | null {
    const { hello } = opening;
    const { clientAddr, metrics } = this.#options;
    if (!hello) return null;
    if (hello.earlyData || opening.clientBytes !== hello.recordBytes) {
      log.debug(
        `${clientAddr}: userspace mode (${
          hello.earlyData ? "early_data in the hello" : "bytes after the hello"
        })`,
      );
      return null;
    }
    const client = this.#client;
    try {
      this.#pair = this.#kernel.pair(
        { local: client.localAddr, remote: client.remoteAddr },
        { local: backend.localAddr, remote: backend.remoteAddr },
      );
    } catch (e) {
      if (e instanceof KernelAccelError && e.reason === "map_full") {
        kernelFallback(metrics, "map_full", errText(e));
      } else if (e instanceof KernelAccelError && e.reason === "socket_not_tracked") {
        kernelFallback(metrics, "not_tracked", errText(e));
      } else {
        log.debug(`${clientAddr}: userspace mode: ${errText(e)}`);
      }
      return null;
    }
    return this.#pair;
  }
}

/** What {@link SockmapHooks} serve. */
interface SockmapHooksOptions {
  kernel: KernelAccel;
  pair: SplicePair;
  client: Deno.TcpConn;
  backend: Deno.TcpConn;
  /** Bytes written to the backend before the relay started (PROXY header and hello). */
  firstBytes: number;
  /** The client, for log lines. */
  clientAddr: string;
  /** `ebpf.drain_timeout_ms`. */
  drainMs: number;
  /** Where the bytes known undelivered are noted when a stalled drain cuts the pair. */
  undelivered: ByteCounts;
  /** Removes the pairing (once). */
  unpair: () => void;
}

/** The relays' hooks for a pair in the sockmap (see {@link SpliceHooks}). */
class SockmapHooks implements SpliceHooks {
  readonly #o: SockmapHooksOptions;
  /** Aborted when the relay is done: a drain still waiting gives up. */
  readonly #ended = new AbortController();

  constructor(options: SockmapHooksOptions) {
    this.#o = options;
  }

  async drainKernel(
    up: boolean,
    userspaceBytes: number,
    atEof: boolean,
    progress: () => void,
  ): Promise<boolean> {
    const { kernel, pair, clientAddr, drainMs } = this.#o;
    const bytes = up ? this.#o.firstBytes + userspaceBytes : userspaceBytes;
    const r = await kernel.waitDrained(pair, up ? "b" : "a", bytes, {
      timeoutMs: drainMs,
      sourceFinal: atEof,
      signal: this.#ended.signal,
      progress,
    });
    const from = up ? "client" : "backend";
    const to = up ? "backend" : "client";
    log.debug(
      `${clientAddr}: ${atEof ? `${from} EOF` : `bytes from the ${from} in userspace`}; ` +
        `${to} socket took ${r.taken}/${r.expected} bytes in ${r.waitedMs.toFixed(1)} ms`,
    );
    if (r.drained) return true;
    if (r.socketFound && !this.#ended.signal.aborted) {
      this.#o.undelivered[up ? "up" : "down"] = Math.max(0, r.expected - r.taken);
      log.warn(
        `${clientAddr}: ${to} socket took ${r.taken} of ${r.expected} bytes and then ` +
          `none for ebpf.drain_timeout_ms (${drainMs}); resetting both sides ` +
          `(${r.expected - r.taken} bytes undelivered)`,
      );
    }
    return false;
  }

  release(): void {
    this.#ended.abort();
    this.#o.unpair();
  }

  eofIsReal(up: boolean): boolean {
    const conn = up ? this.#o.client : this.#o.backend;
    const info = this.#o.kernel.tcpInfo({ local: conn.localAddr, remote: conn.remoteAddr });
    const real = !info || afterPeerFin(info.state);
    if (!real) {
      log.debug(
        `${this.#o.clientAddr}: false EOF on the ${up ? "client" : "backend"} socket (state ${
          info!.state
        })`,
      );
    }
    return real;
  }

  splicedBytes(): number {
    const c = this.#o.kernel.counters(this.#o.pair);
    return c.aToB + c.bToA;
  }
}
