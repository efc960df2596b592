/**
 * QUIC worker steering (bpf/quic_reuseport.bpf.c): with `workers` > 1, a QUIC datagram goes to
 * the worker that holds its flow, chosen by its Destination Connection ID, not by the kernel's
 * hash of its addresses, so a client that rebinds to a new address:port stays with its flow.
 *
 * The process that loads it (the supervisor) owns the program and its maps and pins them in the
 * instance's pin dir; each worker opens the pins, puts its listening socket of each QUIC
 * listener at its index of the socket array and attaches the program to the socket's
 * SO_REUSEPORT group, then publishes the server connection IDs its flows are followed by:
 * ```ts
 * // supervisor
 * const steer = await QuicSteering.open({ workers: 2, listeners: 1, maxCids, pinDir, log });
 * // worker w (1-based), after binding listener i's UDP socket
 * const member = QuicSteeringWorker.open(pinDir, w, 2);
 * const ids = member.join(i, sock.fd); // the program now steers the group
 * ids.add(cid);    // a flow learned the backend's ID `cid` (a CID key string, see quic_flow.ts)
 * ids.remove(cid); // the flow ended
 * // supervisor, when worker w died: its IDs would steer to its successor, who has no flows
 * steer.forgetWorker(w);
 * await steer.close(); // pins removed; the program stays with the group until its last socket
 * ```
 * The socket array index of listener i's socket of worker w is `i * workers + w - 1`; an ID
 * maps to that index. What the program cannot steer (an unknown ID, no QUIC header, a worker
 * whose socket is gone) is hashed by the kernel as without it; a full ID map refuses the insert
 * (counted: {@link QuicSteeringWorker.mapFull}) and that flow is hashed too.
 *
 * One program steers a reuseport group: a second instance on the same port (a restart) attaches
 * its own in its place, and the IDs of the first instance's flows are then hashed.
 * @module
 */

import { BpfMapFd, type BpfObject, objGet, objPin } from "../../ffi/libbpf.ts";
import { closeFd, Errno } from "../../ffi/libc.ts";
import { setIntOption, SO_ATTACH_REUSEPORT_EBPF, SOL_SOCKET } from "../../ffi/socket.ts";
import { inRange, STEER_CIDS } from "./bounds.ts";
import { ensureBpffs, removeDeadInstances, removeQuietly } from "./host.ts";
import {
  encodeSteerCid,
  KEY_ZERO,
  PIN_ROOT,
  STEER_CID,
  STEER_CID_MAX,
  STEER_MAPS,
  STEER_PROGRAM,
  STEER_PROGRAM_PIN,
  STEER_SLOT_SIZE,
  STEER_SOCK_SIZE,
  STEER_STATS_FIELDS,
  STEER_STATS_SIZE,
  u32Key,
} from "./layout.ts";
import {
  checkBpfAccess,
  checkPlatform,
  EbpfError,
  type EbpfLog,
  loadError,
  openBpfObject,
  sumPerCpu,
  Undo,
  withLibbpfLog,
} from "./loader.ts";

/**
 * Why the QUIC worker steering is unavailable. Reasons: `bad_option`, `unsupported_platform`,
 * `old_kernel`, `not_root`, `no_libbpf`, `no_object`, `bad_object`, `no_bpffs`, `load_failed`,
 * `verifier_rejected`, `not_permitted`, `no_memory`, `no_pins`, `pin_mismatch`,
 * `attach_failed`.
 */
export class QuicSteerError extends EbpfError {
  override name = "QuicSteerError";
}

/** Options of {@link QuicSteering.open}. */
export interface QuicSteeringOptions {
  /** Worker processes (2 and more). */
  workers: number;
  /** Listener indices 0..listeners-1 get a row of `workers` sockets each (the config's). */
  listeners: number;
  /** Connection IDs held at most ({@link STEER_CIDS}). */
  maxCids: number;
  /** The bpffs dir the program and maps are pinned in (created; removed by close()). */
  pinDir: string;
  log: EbpfLog;
  /** The compiled object's bytes; default: read bpf/quic_reuseport.bpf.o. */
  object?: Uint8Array;
}

/** The program's counters, summed over CPUs. */
export interface QuicSteerStats {
  /** Datagrams sent to the worker that holds their flow. */
  steered: number;
  /** Datagrams with a QUIC header whose DCID no flow has: hashed. */
  unknownCid: number;
  /** Datagrams without a readable QUIC header (or before any short-header length is known). */
  unparsable: number;
  /** Datagrams whose flow's worker has no socket in the array (it died): hashed. */
  noSocket: number;
}

const PINS = [STEER_PROGRAM_PIN, ...Object.values(STEER_MAPS)];

/** The program and its maps, loaded and pinned: what the supervisor owns. */
export class QuicSteering {
  readonly #obj: BpfObject;
  readonly #statsBuf: Uint8Array;
  readonly #log: EbpfLog;
  readonly workers: number;
  /** Where the program and maps are pinned (the workers' {@link QuicSteeringWorker.open}). */
  readonly pinDir: string;
  #closed = false;

  private constructor(obj: BpfObject, o: QuicSteeringOptions) {
    this.#obj = obj;
    this.#statsBuf = new Uint8Array(obj.map(STEER_MAPS.stats).valueBufferSize);
    this.#log = o.log;
    this.workers = o.workers;
    this.pinDir = o.pinDir;
  }

  /**
   * Load the program, size its maps and pin them under `pinDir`.
   * @throws {QuicSteerError} naming the cause and the fix; nothing stays behind then.
   */
  static async open(o: QuicSteeringOptions): Promise<QuicSteering> {
    checkOptions(o);
    checkPlatform(
      QuicSteerError,
      "QUIC worker steering",
      [5, 8],
      "bounded loops, CAP_BPF",
      "run one worker",
    );
    await checkBpfAccess(
      QuicSteerError,
      "load eBPF programs",
      "run as root, or grant CAP_BPF and CAP_NET_ADMIN",
    );
    const obj = await openBpfObject(
      QuicSteerError,
      "quic_reuseport.bpf.o",
      "sni_steer",
      "QUIC steering",
      o.object,
      o.log,
    );
    const undo = new Undo();
    undo.push(() => obj.close());
    try {
      load(obj, o);
      ensureBpffs(o.pinDir, o.log, "run one worker");
      if (o.pinDir.startsWith(PIN_ROOT + "/")) await removeDeadInstances(PIN_ROOT, o.log);
      await Deno.mkdir(o.pinDir, { recursive: true });
      for (const name of PINS) {
        const path = `${o.pinDir}/${name}`;
        await removeQuietly(path); // this pid's own leftover: only a reused pid has one
        const fd = name === STEER_PROGRAM_PIN ? obj.program(STEER_PROGRAM).fd : obj.map(name).fd;
        objPin(fd, path);
        undo.push(() => removeQuietly(path));
      }
    } catch (e) {
      await undo.unwind();
      throw e instanceof EbpfError ? e : new QuicSteerError(
        "load_failed",
        `QUIC steering setup failed: ${(e as Error).message}`,
        "run one worker, or check bpffs and privileges",
        { cause: e },
      );
    }
    o.log(
      "info",
      `QUIC worker steering loaded (pins in ${o.pinDir}): ${o.workers} workers, ` +
        `up to ${o.maxCids} connection IDs`,
    );
    return new QuicSteering(obj, o);
  }

  /** The program's counters summed over CPUs. */
  stats(): QuicSteerStats {
    const ok = !this.#closed && this.#obj.map(STEER_MAPS.stats).lookup(KEY_ZERO, this.#statsBuf);
    const s = sumPerCpu(
      ok ? this.#statsBuf : new Uint8Array(0),
      STEER_STATS_SIZE,
      STEER_STATS_FIELDS,
    );
    return {
      steered: s.steered,
      unknownCid: s.unknown_cid,
      unparsable: s.unparsable,
      noSocket: s.no_socket,
    };
  }

  /**
   * Removes the IDs of worker `worker`'s flows (it died: they are gone, and its successor
   * takes its socket index). Returns how many.
   */
  forgetWorker(worker: number): number {
    if (this.#closed) return 0;
    using cids = BpfMapFd.openPinned(`${this.pinDir}/${STEER_MAPS.cids}`);
    const value = new Uint8Array(STEER_SLOT_SIZE);
    const view = new DataView(value.buffer);
    let n = 0;
    for (const key of [...cids.keys()]) {
      if (!cids.lookup(key, value)) continue;
      if (view.getUint32(0, true) % this.workers === worker - 1 && cids.delete(key)) n++;
    }
    return n;
  }

  /** Remove the pins and free this process's hold of the program and maps. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const name of PINS) await removeQuietly(`${this.pinDir}/${name}`);
    await removeQuietly(this.pinDir); // unless the sockmap's pins are still there
    this.#obj.close();
    this.#log("info", "QUIC worker steering unloaded");
  }
}

/** What a QUIC listener publishes its flows' server IDs through (see src/conn/quic_flow.ts). */
export interface SteeredIds {
  /** The flow holding this ID is here: steer datagrams with it to this socket. */
  add(cid: string): void;
  /** No flow here holds it any more. */
  remove(cid: string): void;
}

/** A worker's use of the pinned steering: its sockets joined, its flows' IDs published. */
export class QuicSteeringWorker {
  readonly #cids: BpfMapFd;
  readonly #socks: BpfMapFd;
  readonly #lens: BpfMapFd;
  readonly #progFd: number;
  /** ID lengths this process has marked in use (each once). */
  readonly #lensSet = new Set<number>();
  readonly #worker: number;
  readonly #workers: number;
  /** IDs not added because the map was full (that flow is hashed, as without steering). */
  mapFull = 0;
  /** IDs not added for another error (the first is in `lastError`). */
  failed = 0;
  lastError: string | null = null;
  #closed = false;

  private constructor(maps: BpfMapFd[], progFd: number, worker: number, workers: number) {
    [this.#cids, this.#socks, this.#lens] = maps;
    this.#progFd = progFd;
    this.#worker = worker;
    this.#workers = workers;
  }

  /**
   * Opens the pins under `pinDir` as worker `worker` (1-based) of `workers`.
   * @throws {QuicSteerError} `no_pins` or `pin_mismatch`; nothing stays open then.
   */
  static open(pinDir: string, worker: number, workers: number): QuicSteeringWorker {
    const opened: BpfMapFd[] = [];
    try {
      opened.push(openPinned(pinDir, STEER_MAPS.cids, STEER_CID.size, STEER_SLOT_SIZE));
      opened.push(openPinned(pinDir, STEER_MAPS.socks, 4, STEER_SOCK_SIZE));
      opened.push(openPinned(pinDir, STEER_MAPS.lens, 4, 4));
      let progFd: number;
      try {
        progFd = objGet(`${pinDir}/${STEER_PROGRAM_PIN}`);
      } catch (e) {
        throw noPins(`${pinDir}/${STEER_PROGRAM_PIN}`, e);
      }
      return new QuicSteeringWorker(opened, progFd, worker, workers);
    } catch (e) {
      for (const m of opened) m.close();
      throw e;
    }
  }

  /**
   * Puts `fd` (this worker's bound SO_REUSEPORT socket of listener `listener`) in the socket
   * array and attaches the program to its group; the IDs of this listener's flows.
   * @throws {QuicSteerError} `attach_failed` (the group is steered as before then, or hashed).
   */
  join(listener: number, fd: number): SteeredIds {
    const slot = listener * this.#workers + this.#worker - 1;
    const sock = new Uint8Array(STEER_SOCK_SIZE);
    new DataView(sock.buffer).setBigUint64(0, BigInt(fd), true);
    try {
      this.#socks.update(u32Key(slot), sock);
    } catch (e) {
      throw new QuicSteerError(
        "attach_failed",
        `cannot put the QUIC socket in the steering array at ${slot}: ${(e as Error).message}`,
        "QUIC clients that rebind may lose their flow",
        { cause: e },
      );
    }
    const rc = setIntOption(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, this.#progFd);
    if (rc < 0) {
      throw new QuicSteerError(
        "attach_failed",
        `SO_ATTACH_REUSEPORT_EBPF failed (errno ${-rc})`,
        "QUIC clients that rebind may lose their flow",
      );
    }
    const value = u32Key(slot);
    const seen = new Uint8Array(STEER_SLOT_SIZE);
    return {
      add: (cid) => this.#add(cid, value),
      remove: (cid) => {
        if (this.#closed) return;
        const key = encodeSteerCid(cid);
        // another worker's flow may hold the same ID (a backend reused it): leave its entry
        if (this.#cids.lookup(key, seen) && seen.every((b, i) => b === value[i])) {
          this.#cids.delete(key);
        }
      },
    };
  }

  #add(cid: string, value: Uint8Array): void {
    if (this.#closed || cid.length === 0 || cid.length > STEER_CID_MAX) return;
    try {
      this.#cids.update(encodeSteerCid(cid), value);
      if (!this.#lensSet.has(cid.length)) {
        this.#lens.update(u32Key(cid.length), u32Key(1));
        this.#lensSet.add(cid.length);
      }
    } catch (e) {
      if ((e as { errno?: number }).errno === Errno.E2BIG) this.mapFull++;
      else {
        this.failed++;
        this.lastError ??= (e as Error).message;
      }
    }
  }

  /** Closes this process's fds (its sockets leave the array as they close). Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const m of [this.#cids, this.#socks, this.#lens]) m.close();
    closeFd(this.#progFd);
  }
}

function checkOptions(o: QuicSteeringOptions): void {
  const bad = (what: string) => {
    throw new QuicSteerError("bad_option", what, "fix the QUIC steering options");
  };
  if (!Number.isInteger(o.workers) || o.workers < 2 || o.workers > 256) {
    bad(`workers must be 2 to 256 (got ${o.workers})`);
  }
  if (!Number.isInteger(o.listeners) || o.listeners < 1 || o.listeners * o.workers > 65536) {
    bad(`listeners must be 1 or more, listeners x workers at most 65536 (got ${o.listeners})`);
  }
  if (!inRange(o.maxCids, STEER_CIDS)) {
    bad(`maxCids must be an integer from ${STEER_CIDS.min} to ${STEER_CIDS.max}`);
  }
}

/** Size the maps and load the program. */
function load(obj: BpfObject, o: QuicSteeringOptions): void {
  try {
    obj.map(STEER_MAPS.cids).setMaxEntries(o.maxCids);
    obj.map(STEER_MAPS.socks).setMaxEntries(o.listeners * o.workers);
    withLibbpfLog(o.log, () => obj.load());
  } catch (e) {
    throw loadError(QuicSteerError, e, {
      program: "the QUIC steering program",
      verifierFallback: "run one worker",
      memoryErrnos: [Errno.ENOMEM, Errno.E2BIG],
      memory: {
        reason: "no_memory",
        cause: (errnoName) =>
          `the kernel could not create the QUIC steering maps (${errnoName}; ${o.maxCids} IDs)`,
        fix: "lower quic.max_flows",
      },
      refused: "the QUIC steering program",
      permissionFix: "run as root with CAP_BPF; check kernel lockdown",
      object: "the QUIC steering object",
      otherFix: "check the kernel supports SK_REUSEPORT programs (CONFIG_BPF_SYSCALL)",
    });
  }
}

/** A pinned map, checked against the layout this code expects. */
function openPinned(pinDir: string, name: string, keySize: number, valueSize: number): BpfMapFd {
  let m: BpfMapFd;
  try {
    m = BpfMapFd.openPinned(`${pinDir}/${name}`);
  } catch (e) {
    throw noPins(`${pinDir}/${name}`, e);
  }
  if (m.info.keySize !== keySize || m.info.valueSize !== valueSize) {
    m.close();
    throw new QuicSteerError(
      "pin_mismatch",
      `${pinDir}/${name} has key/value sizes ${m.info.keySize}/${m.info.valueSize}, ` +
        `expected ${keySize}/${valueSize}`,
      "the pins belong to another version of sni-proxy: restart the proxy",
    );
  }
  return m;
}

function noPins(path: string, e: unknown): QuicSteerError {
  return new QuicSteerError(
    "no_pins",
    `cannot open the pinned ${path}: ${(e as Error).message}`,
    "the process that loads the steering (the supervisor) must be running",
    { cause: e },
  );
}
