/**
 * Kernel mode's part of one session: handing the connected pair to the kernel, and taking it
 * back at the end. In `ebpf.splice_mode` "sockmap" the pair is put in the sockmap (its bytes are
 * redirected by the kernel; userspace sees EOFs, resets and stray bytes); in "pipe" splice(2)
 * moves them through pipes. The relay then is {@link SplicedRelay} or {@link PipedRelay}, on the
 * proxy's own sockets; a pair that does not qualify for the sockmap stays with the userspace
 * relay.
 *
 * @module
 */
import type { KernelAccel, SplicePair } from "../ebpf/sockmap.ts";
import { KernelAccelError } from "../ebpf/errors.ts";
import type { ClientHello } from "../proto/clienthello.ts";
import { BurstLog, logger } from "../ops/log.ts";
import { Metrics } from "../ops/metrics.ts";
import { errText } from "../ops/errtext.ts";
import type { BulkHandover, ByteRelay, RelayState, SpliceHooks } from "./relay.ts";
import { setSocketBuffer } from "../../ffi/libc.ts";
import type { ByteCounts, KernelPart } from "./conn_record.ts";
import { SplicedRelay } from "./spliced.ts";
import { PipedRelay, type PipePool } from "./piped.ts";
import { PairWatcher, socketPair } from "../io/watch.ts";
import { eventLoop } from "../io/loop.ts";
import type { TcpSocket } from "../io/tcp.ts";
import { afterPeerFin } from "./tcpinfo.ts";

const log = logger("session");
const bursts = new BurstLog(log);

/** The `ebpf` settings a handoff reads. */
export interface KernelRelaySettings {
  /** Sockmap mode: how long a socket may take no redirected byte before the pair is cut. */
  drainTimeoutMs: number;
  /** Pipe mode: both sockets' buffer sizes, when above 0. */
  sndbuf: number;
  rcvbuf: number;
}

/**
 * How a process's connections move their bytes: resolved once at start from `ebpf.enabled`,
 * `ebpf.sockmap_enabled` and `ebpf.splice_mode` (and what the host allowed), then handed
 * unchanged to every listener and session.
 */
export type RelayPath =
  | { kind: "userspace" }
  /** Kernel mode, splice(2) through the process's pipes. */
  | { kind: "pipe"; pipes: PipePool }
  /** Kernel mode, the eBPF sockmap redirect. */
  | { kind: "sockmap"; kernel: KernelAccel };

/** Userspace mode: the relay copies. */
export const USERSPACE_PATH: RelayPath = { kind: "userspace" };

/** What the access log and the ready line call a relay path. */
export function pathMode(path: RelayPath): "kernel" | "userspace" {
  return path.kind === "userspace" ? "userspace" : "kernel";
}

/** What a session's handoff needs. */
export interface KernelHandoffOptions {
  /** How bytes move in this process. */
  path: RelayPath;
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

/** One session's way into the kernel, and back. */
export interface KernelHandoff extends KernelPart {
  /**
   * Hands the connected pair to a kernel relay, which writes `opening.first` itself; or returns
   * null when the session writes it and relays in userspace (the pair does not qualify, or
   * moves to the kernel only once it carries bulk: see `bulk`).
   */
  handOff(backend: TcpSocket, opening: Opening): ByteRelay | null;
  /** Removes the kernel pairing (once; before the sockets close), keeping its byte counts. */
  release(): void;
  /** Who takes a pair the session relays in userspace once it carries bulk, or null. */
  readonly bulk: BulkHandover | null;
}

/** The handoff of `client`'s session in the proxy's kernel mode; null in userspace mode. */
export function kernelHandoff(
  client: TcpSocket,
  options: KernelHandoffOptions,
): KernelHandoff | null {
  const path = options.path;
  if (path.kind === "pipe") return new PipeHandoff(client, path.pipes, options);
  if (path.kind === "sockmap") return new SockmapHandoff(client, path.kernel, options);
  return null;
}

/** Counts a kernel-mode connection that runs in userspace instead; logs once per burst. */
function kernelFallback(m: Metrics, reason: string, detail: string): void {
  Metrics.bump(m.kernelFallbacks, reason);
  bursts.warn("kernel_fallback", `kernel mode: a connection runs in userspace mode: ${detail}`);
}

/** No bytes, what a pipe handoff reports: shared and never written (not two objects a connection). */
const NO_BYTES: ByteCounts = Object.freeze({ up: 0, down: 0 });

/**
 * `ebpf.splice_mode` "pipe": the pair starts in the userspace relay, as in userspace mode (the
 * session writes the hello), and a direction moves to splice(2) through the pool's pipes once it
 * carries bulk: the relay hands the pair over ({@link BulkHandover}). It lives as long as its
 * connection (the record reads it at the end), so it keeps little past the handoff.
 */
class PipeHandoff implements KernelHandoff, BulkHandover {
  readonly #pipes: PipePool;
  readonly #idleMs: number;
  /** The client and the buffer sizes to set on the pair (`ebpf.sndbuf`/`rcvbuf`), when set. */
  #sizes: { client: TcpSocket; sndbuf: number; rcvbuf: number } | null = null;
  /** The pair is relayed by kernel mode's relays (spliced once it carries bulk). */
  #piped = false;
  /** The relay counts what splice(2) moves as its own bytes. */
  readonly kernelBytes: ByteCounts = NO_BYTES;
  readonly undelivered: ByteCounts = NO_BYTES;

  constructor(client: TcpSocket, pipes: PipePool, options: KernelHandoffOptions) {
    this.#pipes = pipes;
    this.#idleMs = options.idleMs;
    const { sndbuf, rcvbuf } = options.ebpf;
    if (sndbuf || rcvbuf) this.#sizes = { client, sndbuf, rcvbuf };
  }

  get mode(): "userspace" | "kernel" {
    return this.#piped ? "kernel" : "userspace";
  }

  get bulk(): BulkHandover {
    return this;
  }

  /**
   * Sizes the pair's socket buffers (when set: with the pipe they bound what a direction holds
   * for a reader that stops); the session then writes the hello and starts its relay.
   */
  handOff(backend: TcpSocket): null {
    this.#piped = true;
    const sizes = this.#sizes;
    this.#sizes = null;
    if (sizes) {
      for (const fd of [sizes.client.fd, backend.fd]) {
        if (sizes.sndbuf) setSocketBuffer(fd, "send", sizes.sndbuf);
        if (sizes.rcvbuf) setSocketBuffer(fd, "receive", sizes.rcvbuf);
      }
    }
    return null;
  }

  relayBulk(client: TcpSocket, backend: TcpSocket, state: RelayState): ByteRelay {
    const pair = socketPair(client, backend);
    const watcher = new PairWatcher(eventLoop(), pair);
    return new PipedRelay(pair, this.#pipes, { idleMs: this.#idleMs, resume: state, watcher });
  }

  // nothing is paired in the kernel: the relay gives its pipes back to the pool when it ends
  release(): void {}
}

/** `ebpf.splice_mode` "sockmap": the kernel redirects the pair's bytes between the sockets. */
class SockmapHandoff implements KernelHandoff {
  readonly #client: TcpSocket;
  readonly #kernel: KernelAccel;
  readonly #options: KernelHandoffOptions;
  /** The pairing in the sockmap, once made. */
  #pair: SplicePair | null = null;
  #released = false;
  #kernelBytes: ByteCounts = { up: 0, down: 0 };
  readonly undelivered: ByteCounts = { up: 0, down: 0 };
  readonly bulk = null;

  constructor(client: TcpSocket, kernel: KernelAccel, options: KernelHandoffOptions) {
    this.#client = client;
    this.#kernel = kernel;
    this.#options = options;
  }

  get mode(): "userspace" | "kernel" {
    return this.#pair ? "kernel" : "userspace";
  }

  get kernelBytes(): ByteCounts {
    return this.#kernelBytes;
  }

  handOff(backend: TcpSocket, opening: Opening): ByteRelay | null {
    const pair = this.#pairUp(backend, opening);
    if (!pair) return null;
    const hooks = new SockmapHooks({
      kernel: this.#kernel,
      pair,
      client: this.#client,
      backend,
      firstBytes: opening.first.length,
      clientAddr: this.#options.clientAddr,
      drainMs: this.#options.ebpf.drainTimeoutMs,
      undelivered: this.undelivered,
      finalBytes: this.#finalBytes,
      unpair: () => this.release(),
    });
    const { idleMs } = this.#options;
    const sockets = socketPair(this.#client, backend);
    const watcher = new PairWatcher(eventLoop(), sockets);
    return new SplicedRelay(sockets, { idleMs, hooks, first: opening.first, watcher });
  }

  /**
   * The redirected bytes of each direction once its drain at the source's EOF succeeded (then
   * final): with both known, the release reads no counter.
   */
  readonly #finalBytes: { up: number | null; down: number | null } = { up: null, down: null };

  // the session closes both sockets right after: they leave the sockhash by themselves
  release(): void {
    if (!this.#pair || this.#released) return;
    this.#released = true;
    const { up, down } = this.#finalBytes;
    const known = up !== null && down !== null ? { aToB: up, bToA: down } : null;
    const c = this.#kernel.release(this.#pair, known);
    this.#kernelBytes = { up: c.aToB, down: c.bToA };
  }

  /**
   * Puts the pair in the sockmap when it qualifies (a TLS hello alone, without early data);
   * returns the pairing, or null to stay in userspace.
   */
  #pairUp(backend: TcpSocket, opening: Opening): SplicePair | null {
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
        { fd: client.fd, local: client.localAddr, remote: client.remoteAddr, opened: "accepted" },
        {
          fd: backend.fd,
          local: backend.localAddr,
          remote: backend.remoteAddr,
          opened: "connected",
        },
      );
    } catch (e) {
      if (e instanceof KernelAccelError && e.reason === "map_full") {
        kernelFallback(metrics, "map_full", errText(e));
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
  client: TcpSocket;
  backend: TcpSocket;
  /** Bytes written to the backend before the relay started (PROXY header and hello). */
  firstBytes: number;
  /** The client, for log lines. */
  clientAddr: string;
  /** `ebpf.drain_timeout_ms`. */
  drainMs: number;
  /** Where the bytes known undelivered are noted when a stalled drain cuts the pair. */
  undelivered: ByteCounts;
  /** Where a direction's redirected bytes are noted once drained at its source's EOF. */
  finalBytes: { up: number | null; down: number | null };
  /** Removes the pairing (once). */
  unpair: () => void;
}

/** The relays' hooks for a pair in the sockmap (see {@link SpliceHooks}). */
class SockmapHooks implements SpliceHooks {
  readonly #o: SockmapHooksOptions;
  /**
   * Aborted when the relay is done: a drain still waiting gives up. Made by the first drain (most
   * pairs never wait for one: an idle connection holds no controller).
   */
  #ended: AbortController | null = null;
  #released = false;

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
    this.#ended ??= new AbortController();
    if (this.#released) this.#ended.abort();
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
    if (r.drained) {
      if (atEof) this.#o.finalBytes[up ? "up" : "down"] = r.redirected;
      return true;
    }
    if (r.socketFound && !this.#released) {
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
    this.#released = true;
    this.#ended?.abort();
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
