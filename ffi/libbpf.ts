/**
 * Binding of the system libbpf (libbpf.so.1, libbpf >= 1.0) over Deno FFI.
 *
 * One typed symbol table, small classes that own what they wrap and free it (`Symbol.dispose`),
 * and {@link BpfError} for every failure. Error conventions of libbpf 1.x: calls returning a
 * pointer return NULL and set errno (read at once, before any other call); calls returning int
 * return -errno. No proxy logic lives here.
 * @module
 */

import { closeFd, cString, Errno, errno, errnoName, libc } from "./libc.ts";

const LIBBPF_SYMBOLS = {
  libbpf_major_version: { parameters: [], result: "u32" },
  libbpf_minor_version: { parameters: [], result: "u32" },
  libbpf_version_string: { parameters: [], result: "pointer" },
  libbpf_strerror: { parameters: ["i32", "buffer", "usize"], result: "i32" },
  libbpf_set_print: { parameters: ["pointer"], result: "pointer" },
  libbpf_num_possible_cpus: { parameters: [], result: "i32" },

  bpf_object__open_mem: { parameters: ["buffer", "usize", "buffer"], result: "pointer" },
  bpf_object__load: { parameters: ["pointer"], result: "i32" },
  bpf_object__close: { parameters: ["pointer"], result: "void" },
  bpf_object__find_program_by_name: { parameters: ["pointer", "buffer"], result: "pointer" },
  bpf_object__find_map_by_name: { parameters: ["pointer", "buffer"], result: "pointer" },

  bpf_program__fd: { parameters: ["pointer"], result: "i32" },
  bpf_program__set_autoload: { parameters: ["pointer", "bool"], result: "i32" },
  bpf_program__attach_cgroup: { parameters: ["pointer", "i32"], result: "pointer" },

  bpf_link__fd: { parameters: ["pointer"], result: "i32" },
  bpf_link__pin: { parameters: ["pointer", "buffer"], result: "i32" },
  bpf_link__unpin: { parameters: ["pointer"], result: "i32" },
  bpf_link__destroy: { parameters: ["pointer"], result: "i32" },

  bpf_map__fd: { parameters: ["pointer"], result: "i32" },
  bpf_map__type: { parameters: ["pointer"], result: "i32" },
  bpf_map__key_size: { parameters: ["pointer"], result: "u32" },
  bpf_map__value_size: { parameters: ["pointer"], result: "u32" },
  bpf_map__max_entries: { parameters: ["pointer"], result: "u32" },
  bpf_map__set_max_entries: { parameters: ["pointer", "u32"], result: "i32" },
  bpf_map__pin: { parameters: ["pointer", "buffer"], result: "i32" },
  bpf_map__unpin: { parameters: ["pointer", "buffer"], result: "i32" },
  bpf_map__update_elem: {
    parameters: ["pointer", "buffer", "usize", "buffer", "usize", "u64"],
    result: "i32",
  },
  bpf_map__lookup_elem: {
    parameters: ["pointer", "buffer", "usize", "buffer", "usize", "u64"],
    result: "i32",
  },
  bpf_map__delete_elem: { parameters: ["pointer", "buffer", "usize", "u64"], result: "i32" },
  bpf_map__get_next_key: { parameters: ["pointer", "buffer", "buffer", "usize"], result: "i32" },

  bpf_obj_get: { parameters: ["buffer"], result: "i32" },
  bpf_obj_pin: { parameters: ["i32", "buffer"], result: "i32" },
  bpf_obj_get_info_by_fd: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  bpf_map_create: {
    parameters: ["i32", "buffer", "u32", "u32", "u32", "buffer"],
    result: "i32",
  },
  bpf_map_update_elem: { parameters: ["i32", "buffer", "buffer", "u64"], result: "i32" },
  bpf_map_lookup_elem: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  bpf_map_delete_elem: { parameters: ["i32", "buffer"], result: "i32" },
  bpf_map_get_next_key: { parameters: ["i32", "buffer", "buffer"], result: "i32" },

  btf__new_empty: { parameters: [], result: "pointer" },
  btf__free: { parameters: ["pointer"], result: "void" },
  btf__add_int: { parameters: ["pointer", "buffer", "usize", "i32"], result: "i32" },
  btf__add_array: { parameters: ["pointer", "i32", "i32", "u32"], result: "i32" },
  btf__add_struct: { parameters: ["pointer", "buffer", "u32"], result: "i32" },
  btf__add_field: { parameters: ["pointer", "buffer", "i32", "u32", "u32"], result: "i32" },
  btf__load_into_kernel: { parameters: ["pointer"], result: "i32" },
  btf__fd: { parameters: ["pointer"], result: "i32" },
  bpf_prog_attach: { parameters: ["i32", "i32", "u32", "u32"], result: "i32" },
  bpf_prog_detach2: { parameters: ["i32", "i32", "u32"], result: "i32" },
  bpf_link_detach: { parameters: ["i32"], result: "i32" },
  bpf_prog_query: {
    parameters: ["i32", "u32", "u32", "buffer", "buffer", "buffer"],
    result: "i32",
  },
  bpf_link_create: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  bpf_xdp_query: { parameters: ["i32", "i32", "buffer"], result: "i32" },
  bpf_prog_get_fd_by_id: { parameters: ["u32"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

type LibbpfSymbols = Deno.DynamicLibrary<typeof LIBBPF_SYMBOLS>["symbols"];

/** enum bpf_attach_type values used by the fast path (linux/bpf.h). */
export const BpfAttachType = {
  CGROUP_SOCK_OPS: 3,
  SK_SKB_STREAM_PARSER: 4,
  SK_SKB_STREAM_VERDICT: 5,
  SK_SKB_VERDICT: 38,
  XDP: 37,
} as const;

/** enum bpf_map_type values this binding treats specially (linux/bpf.h). */
export const BpfMapType = {
  HASH: 1,
  ARRAY: 2,
  PERCPU_HASH: 5,
  PERCPU_ARRAY: 6,
  LRU_HASH: 9,
  LRU_PERCPU_HASH: 10,
  LPM_TRIE: 11,
  SOCKMAP: 15,
  SOCKHASH: 18,
} as const;

/** Map update flags (linux/bpf.h). */
export const BPF_ANY = 0n;
export const BPF_NOEXIST = 1n;
export const BPF_EXIST = 2n;

/** A failed libbpf or bpf(2) operation. */
export class BpfError extends Error {
  /** What was attempted, e.g. `bpf_object__load(sockmap)`. */
  readonly op: string;
  /** Positive errno (0 when none applies, e.g. dlopen failure). */
  readonly errno: number;
  /** Symbolic errno, e.g. `EPERM`. */
  readonly errnoName: string;
  /** libbpf_strerror text for errno. */
  readonly detail: string;
  /** The kernel verifier log when a program load was rejected, else undefined. */
  readonly verifierLog?: string;

  constructor(op: string, code: number, options: { detail?: string; verifierLog?: string } = {}) {
    const detail = options.detail ?? (code ? libbpfStrerror(code) : "");
    const tail = options.verifierLog
      ? `\nverifier log (tail):\n${logTail(options.verifierLog)}`
      : "";
    super(`${op} failed: ${code ? `${errnoName(code)}: ` : ""}${detail}${tail}`);
    this.name = "BpfError";
    this.op = op;
    this.errno = code;
    this.errnoName = code ? errnoName(code) : "";
    this.detail = detail;
    this.verifierLog = options.verifierLog;
  }
}

/** The last `lines` lines of a (verifier) log, with "..." when some were cut. */
export function logTail(log: string, lines = 25): string {
  const all = log.trimEnd().split("\n");
  return (all.length > lines ? ["...", ...all.slice(-lines)] : all).join("\n");
}

let libHandle: Deno.DynamicLibrary<typeof LIBBPF_SYMBOLS> | null = null;

/**
 * The libbpf symbol table; opens libbpf.so.1 on first use and checks it is libbpf 1.x or later.
 * @throws {BpfError} op `dlopen(libbpf.so.1)` when the library is missing or too old.
 */
export function libbpf(): LibbpfSymbols {
  if (libHandle) return libHandle.symbols;
  let handle: Deno.DynamicLibrary<typeof LIBBPF_SYMBOLS>;
  try {
    handle = Deno.dlopen("libbpf.so.1", LIBBPF_SYMBOLS);
  } catch (e) {
    throw new BpfError("dlopen(libbpf.so.1)", 0, {
      detail: `${(e as Error).message} (install libbpf 1.x: apt-get install -y libbpf1)`,
    });
  }
  const major = handle.symbols.libbpf_major_version();
  if (major < 1) {
    handle.close();
    throw new BpfError("dlopen(libbpf.so.1)", 0, {
      detail: `libbpf ${major}.x is too old, 1.x or later is needed`,
    });
  }
  libHandle = handle;
  return handle.symbols;
}

/** The loaded libbpf's version, e.g. `{ major: 1, minor: 1, text: "v1.1" }`. */
export function libbpfVersion(): { major: number; minor: number; text: string } {
  const lib = libbpf();
  const p = lib.libbpf_version_string();
  return {
    major: lib.libbpf_major_version(),
    minor: lib.libbpf_minor_version(),
    text: p === null ? "" : new Deno.UnsafePointerView(p).getCString(),
  };
}

/** Number of possible CPUs (the per-CPU map value multiplier). */
export function possibleCpus(): number {
  const n = libbpf().libbpf_num_possible_cpus();
  if (n < 0) throw new BpfError("libbpf_num_possible_cpus", -n);
  return n;
}

/** libbpf's message for an errno (covers libbpf's own codes too). */
export function libbpfStrerror(code: number): string {
  const buf = new Uint8Array(256);
  libbpf().libbpf_strerror(code, buf, BigInt(buf.length));
  const end = buf.indexOf(0);
  return new TextDecoder().decode(buf.subarray(0, end < 0 ? buf.length : end));
}

/** libbpf log levels (enum libbpf_print_level). */
export type LibbpfLogLevel = "warn" | "info" | "debug";
/** Receives each libbpf log line, rendered, without the trailing newline. */
export type LibbpfLogger = (level: LibbpfLogLevel, message: string) => void;

const PRINT_LEVELS: LibbpfLogLevel[] = ["warn", "info", "debug"];
let printCallback:
  | Deno.UnsafeCallback<{
    readonly parameters: readonly ["i32", "pointer", "pointer"];
    readonly result: "i32";
  }>
  | null = null;
let currentLogger: LibbpfLogger | null = null;
// One buffer for rendering, reused: libbpf prints from the calling thread, one message at a time.
const printBuf = new Uint8Array(64 * 1024);

/**
 * Route libbpf's own log (warnings, load progress) to `logger`; `null` silences it. Global to
 * the process, like libbpf_set_print. The va_list is rendered with libc vsnprintf.
 */
export function setLibbpfLogger(logger: LibbpfLogger | null): void {
  currentLogger = logger;
  const lib = libbpf();
  if (!printCallback) {
    printCallback = new Deno.UnsafeCallback(
      { parameters: ["i32", "pointer", "pointer"], result: "i32" } as const,
      (level, fmt, args) => {
        if (!currentLogger || fmt === null) return 0;
        // va_list is an array type on x86_64 (decays to a pointer) and passed by reference on
        // aarch64, so a pointer is what vsnprintf expects on both. It can be consumed only once.
        const n = libc().vsnprintf(printBuf, BigInt(printBuf.length), fmt, args);
        const len = Math.max(0, Math.min(n, printBuf.length - 1));
        const text = new TextDecoder().decode(printBuf.subarray(0, len)).replace(/\n+$/, "");
        try {
          currentLogger(PRINT_LEVELS[level] ?? "debug", text);
        } catch {
          // a throwing logger must not unwind through libbpf's C frames
        }
        return len;
      },
    );
  }
  lib.libbpf_set_print(printCallback.pointer);
}

function ptrOrThrow(p: Deno.PointerValue, op: string): Deno.PointerObject {
  if (p === null) throw new BpfError(op, errno() || Errno.EINVAL);
  return p;
}

function check(rc: number, op: string): number {
  if (rc < 0) throw new BpfError(op, -rc);
  return rc;
}

const VERIFIER_LOG_SIZE = 1 << 20;
const OPEN_OPTS_SIZE = 80; // sizeof(struct bpf_object_open_opts) in libbpf 1.1 (x86_64/aarch64)

/** A BPF ELF object opened from bytes: find its programs and maps, size maps, then load. */
export class BpfObject implements Disposable {
  #ptr: Deno.PointerObject | null;
  readonly name: string;
  // libbpf keeps pointers into these until close: keep them alive with the object.
  readonly #elf: Uint8Array<ArrayBuffer>;
  readonly #logBuf: Uint8Array<ArrayBuffer>;
  readonly #nameBuf: Uint8Array<ArrayBuffer>;
  #loaded = false;

  private constructor(
    ptr: Deno.PointerObject,
    name: string,
    elf: Uint8Array<ArrayBuffer>,
    logBuf: Uint8Array<ArrayBuffer>,
    nameBuf: Uint8Array<ArrayBuffer>,
  ) {
    this.#ptr = ptr;
    this.name = name;
    this.#elf = elf;
    this.#logBuf = logBuf;
    this.#nameBuf = nameBuf;
  }

  /**
   * bpf_object__open_mem: parse an object from its ELF bytes (nothing enters the kernel yet).
   * A verifier log buffer is attached so a rejected load reports the log in its error.
   */
  static openMem(elf: Uint8Array, name = "bpf"): BpfObject {
    const lib = libbpf();
    const elfCopy = new Uint8Array(elf);
    const logBuf = new Uint8Array(VERIFIER_LOG_SIZE);
    const nameBuf = cString(name);
    const opts = new Uint8Array(OPEN_OPTS_SIZE);
    const view = new DataView(opts.buffer);
    view.setBigUint64(0, BigInt(OPEN_OPTS_SIZE), true); // sz
    view.setBigUint64(8, Deno.UnsafePointer.value(Deno.UnsafePointer.of(nameBuf)), true);
    view.setBigUint64(56, Deno.UnsafePointer.value(Deno.UnsafePointer.of(logBuf)), true);
    view.setBigUint64(64, BigInt(logBuf.length), true); // kernel_log_size
    view.setUint32(72, 0, true); // kernel_log_level 0: log only on failure (libbpf retries)
    const p = lib.bpf_object__open_mem(elfCopy, BigInt(elfCopy.length), opts);
    const obj = new BpfObject(
      ptrOrThrow(p, `bpf_object__open_mem(${name})`),
      name,
      elfCopy,
      logBuf,
      nameBuf,
    );
    return obj;
  }

  #handle(): Deno.PointerObject {
    if (!this.#ptr) throw new BpfError(`bpf object ${this.name}`, 9, { detail: "object closed" });
    return this.#ptr;
  }

  /** The program of this function name. @throws {BpfError} ENOENT when absent. */
  program(name: string): BpfProgram {
    const p = libbpf().bpf_object__find_program_by_name(this.#handle(), cString(name));
    return new BpfProgram(ptrOrThrow(p, `find program ${name} in ${this.name}`), name);
  }

  /** The map of this name. @throws {BpfError} ENOENT when absent. */
  map(name: string): BpfMap {
    const p = libbpf().bpf_object__find_map_by_name(this.#handle(), cString(name));
    return new BpfMap(ptrOrThrow(p, `find map ${name} in ${this.name}`), name);
  }

  /**
   * bpf_object__load: create the maps and load the programs into the kernel.
   * @throws {BpfError} with `verifierLog` when the verifier rejected a program.
   */
  load(): void {
    const rc = libbpf().bpf_object__load(this.#handle());
    if (rc < 0) {
      const end = this.#logBuf.indexOf(0);
      const log = new TextDecoder().decode(this.#logBuf.subarray(0, end < 0 ? undefined : end));
      throw new BpfError(`bpf_object__load(${this.name})`, -rc, {
        verifierLog: log.trim() ? log : undefined,
      });
    }
    this.#loaded = true;
  }

  /** True once load() succeeded. */
  get loaded(): boolean {
    return this.#loaded;
  }

  /** bpf_object__close: unload programs, close maps (pinned ones and attachments stay). */
  close(): void {
    if (this.#ptr) libbpf().bpf_object__close(this.#ptr);
    this.#ptr = null;
    void this.#elf; // referenced so the buffer outlives the libbpf object
    void this.#nameBuf;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** A program of a {@link BpfObject}; owned by it (closing the object frees it). */
export class BpfProgram {
  readonly #ptr: Deno.PointerObject;
  /** The program's function name. */
  readonly name: string;

  /** @internal use BpfObject.program() */
  constructor(ptr: Deno.PointerObject, name: string) {
    this.#ptr = ptr;
    this.name = name;
  }

  /** The program fd (valid after load). */
  get fd(): number {
    return check(libbpf().bpf_program__fd(this.#ptr), `bpf_program__fd(${this.name})`);
  }

  /** Include or skip this program at load (call before load). */
  setAutoload(load: boolean): void {
    check(libbpf().bpf_program__set_autoload(this.#ptr, load), `set_autoload(${this.name})`);
  }

  /** bpf_program__attach_cgroup: attach to a cgroup v2 dir fd through a BPF link. */
  attachCgroup(cgroupFd: number): BpfLink {
    const p = libbpf().bpf_program__attach_cgroup(this.#ptr, cgroupFd);
    return new BpfLink(ptrOrThrow(p, `bpf_program__attach_cgroup(${this.name})`), this.name);
  }

  /** bpf_prog_attach: attach to a map (sk_skb to a sockmap/sockhash) with `attachType`. */
  attachToMap(map: BpfMap, attachType: number): void {
    check(
      libbpf().bpf_prog_attach(this.fd, map.fd, attachType, 0),
      `bpf_prog_attach(${this.name} -> ${map.name}, type ${attachType})`,
    );
  }

  /** bpf_prog_detach2: undo attachToMap. */
  detachFromMap(map: BpfMap, attachType: number): void {
    check(
      libbpf().bpf_prog_detach2(this.fd, map.fd, attachType),
      `bpf_prog_detach2(${this.name} -x ${map.name}, type ${attachType})`,
    );
  }
}

/** A BPF link (an attachment held by an fd or a pin). Dispose to release the fd. */
export class BpfLink implements Disposable {
  #ptr: Deno.PointerObject | null;
  /** The program the link attaches. */
  readonly program: string;

  /** @internal use BpfProgram.attachCgroup() */
  constructor(ptr: Deno.PointerObject, program: string) {
    this.#ptr = ptr;
    this.program = program;
  }

  #handle(): Deno.PointerObject {
    if (!this.#ptr) throw new BpfError(`link of ${this.program}`, 9, { detail: "link destroyed" });
    return this.#ptr;
  }

  /** The link fd. */
  get fd(): number {
    return check(libbpf().bpf_link__fd(this.#handle()), `bpf_link__fd(${this.program})`);
  }

  /** bpf_link__pin: keep the attachment alive at `path` (a bpffs file) beyond this process. */
  pin(path: string): void {
    check(libbpf().bpf_link__pin(this.#handle(), cString(path)), `bpf_link__pin(${path})`);
  }

  /** bpf_link__unpin: remove the pin file. */
  unpin(): void {
    check(libbpf().bpf_link__unpin(this.#handle()), `bpf_link__unpin(${this.program})`);
  }

  /** BPF_LINK_DETACH: detach now, even if the link is pinned or other fds refer to it. */
  detach(): void {
    check(libbpf().bpf_link_detach(this.fd), `bpf_link_detach(${this.program})`);
  }

  /** bpf_link__destroy: release this process's handle (a pinned link stays attached). */
  destroy(): void {
    if (this.#ptr) libbpf().bpf_link__destroy(this.#ptr);
    this.#ptr = null;
  }

  [Symbol.dispose](): void {
    this.destroy();
  }
}

const PERCPU_TYPES = new Set<number>([
  BpfMapType.PERCPU_HASH,
  BpfMapType.PERCPU_ARRAY,
  BpfMapType.LRU_PERCPU_HASH,
]);

/**
 * A map of a {@link BpfObject}; owned by it. Element helpers check buffer sizes against the
 * map's key/value sizes (per-CPU maps: value size rounded up to 8, times possible CPUs).
 */
export class BpfMap {
  readonly #ptr: Deno.PointerObject;
  /** The map's name in the object. */
  readonly name: string;

  /** @internal use BpfObject.map() */
  constructor(ptr: Deno.PointerObject, name: string) {
    this.#ptr = ptr;
    this.name = name;
  }

  /** The map fd (valid after load). */
  get fd(): number {
    return check(libbpf().bpf_map__fd(this.#ptr), `bpf_map__fd(${this.name})`);
  }
  /** enum bpf_map_type. */
  get type(): number {
    return libbpf().bpf_map__type(this.#ptr);
  }
  /** Key size in bytes. */
  get keySize(): number {
    return libbpf().bpf_map__key_size(this.#ptr);
  }
  /** Value size in bytes of one element (one CPU's slot for per-CPU maps). */
  get valueSize(): number {
    return libbpf().bpf_map__value_size(this.#ptr);
  }
  /** Bytes a lookup/update value buffer must have (all CPUs' slots for per-CPU maps). */
  get valueBufferSize(): number {
    const size = this.valueSize;
    return PERCPU_TYPES.has(this.type) ? Math.ceil(size / 8) * 8 * possibleCpus() : size;
  }
  /** Capacity. */
  get maxEntries(): number {
    return libbpf().bpf_map__max_entries(this.#ptr);
  }

  /** bpf_map__set_max_entries: resize before load. */
  setMaxEntries(n: number): void {
    check(
      libbpf().bpf_map__set_max_entries(this.#ptr, n),
      `bpf_map__set_max_entries(${this.name}, ${n})`,
    );
  }

  /** bpf_map__pin: pin the map at `path` (a bpffs file). */
  pin(path: string): void {
    check(libbpf().bpf_map__pin(this.#ptr, cString(path)), `bpf_map__pin(${this.name}, ${path})`);
  }

  /** bpf_map__unpin: remove the pin file at `path`. */
  unpin(path: string): void {
    check(
      libbpf().bpf_map__unpin(this.#ptr, cString(path)),
      `bpf_map__unpin(${this.name}, ${path})`,
    );
  }

  #checkKey(key: Uint8Array, op: string): void {
    if (key.length !== this.keySize) {
      throw new BpfError(`${op}(${this.name})`, 22, {
        detail: `key is ${key.length} bytes, the map's key size is ${this.keySize}`,
      });
    }
  }

  #checkValue(value: Uint8Array, op: string): void {
    const want = this.valueBufferSize;
    if (value.length !== want) {
      throw new BpfError(`${op}(${this.name})`, 22, {
        detail: `value buffer is ${value.length} bytes, the map needs ${want}`,
      });
    }
  }

  /** Insert or replace (flags: BPF_ANY, BPF_NOEXIST, BPF_EXIST). */
  update(key: Uint8Array, value: Uint8Array, flags: bigint = BPF_ANY): void {
    this.#checkKey(key, "update");
    this.#checkValue(value, "update");
    check(
      libbpf().bpf_map__update_elem(
        this.#ptr,
        key,
        BigInt(key.length),
        value,
        BigInt(value.length),
        flags,
      ),
      `bpf_map__update_elem(${this.name})`,
    );
  }

  /** Read the value of `key` into `out`; false when the key is absent. */
  lookup(key: Uint8Array, out: Uint8Array): boolean {
    this.#checkKey(key, "lookup");
    this.#checkValue(out, "lookup");
    const rc = libbpf().bpf_map__lookup_elem(
      this.#ptr,
      key,
      BigInt(key.length),
      out,
      BigInt(out.length),
      0n,
    );
    if (rc === -Errno.ENOENT) return false;
    check(rc, `bpf_map__lookup_elem(${this.name})`);
    return true;
  }

  /** Delete `key`; false when it was absent. */
  delete(key: Uint8Array): boolean {
    this.#checkKey(key, "delete");
    const rc = libbpf().bpf_map__delete_elem(this.#ptr, key, BigInt(key.length), 0n);
    if (rc === -Errno.ENOENT) return false;
    check(rc, `bpf_map__delete_elem(${this.name})`);
    return true;
  }

  /** Iterate keys (copies); the map may change meanwhile, as with any BPF map walk. */
  *keys(): Generator<Uint8Array> {
    const size = this.keySize;
    let cur: Uint8Array | null = null;
    for (;;) {
      const next = new Uint8Array(size);
      const rc = libbpf().bpf_map__get_next_key(this.#ptr, cur, next, BigInt(size));
      if (rc === -Errno.ENOENT) return;
      check(rc, `bpf_map__get_next_key(${this.name})`);
      yield next;
      cur = next;
    }
  }
}

/** bpf_obj_get: an fd for a pinned object (map, program or link); close it with closeFd. */
export function objGet(path: string): number {
  return check(libbpf().bpf_obj_get(cString(path)), `bpf_obj_get(${path})`);
}

/** BPF_LINK_DETACH on a link fd (e.g. a stale pinned link of a crashed run). */
export function linkDetachFd(fd: number, what = "link"): void {
  check(libbpf().bpf_link_detach(fd), `bpf_link_detach(${what})`);
}

/** IDs of the programs attached to `targetFd` (cgroup or map fd) with `attachType`. */
export function queryProgIds(targetFd: number, attachType: number): number[] {
  const attachFlags = new Uint32Array(1);
  const ids = new Uint32Array(64);
  const count = new Uint32Array([ids.length]);
  const rc = libbpf().bpf_prog_query(
    targetFd,
    attachType,
    0,
    new Uint8Array(attachFlags.buffer),
    new Uint8Array(ids.buffer),
    new Uint8Array(count.buffer),
  );
  check(rc, `bpf_prog_query(fd ${targetFd}, type ${attachType})`);
  return Array.from(ids.subarray(0, count[0]));
}

/** BTF_INT_ENCODING bits of btf__add_int (linux/btf.h). */
export const BtfIntEncoding = { NONE: 0, SIGNED: 1, CHAR: 2, BOOL: 4 } as const;

/**
 * Builds a BTF blob type by type (btf__new_empty and friends) and loads it into the kernel, so a
 * map created with its key/value type ids is printed field by field by `bpftool map dump`.
 * Type-adding methods return the new type id. Dispose to free it (a map created with it keeps
 * its own kernel reference).
 */
export class BtfBuilder implements Disposable {
  #ptr: Deno.PointerObject | null;

  constructor() {
    this.#ptr = ptrOrThrow(libbpf().btf__new_empty(), "btf__new_empty");
  }

  #handle(): Deno.PointerObject {
    if (!this.#ptr) throw new BpfError("btf", 9, { detail: "btf freed" });
    return this.#ptr;
  }

  /** An integer type of `size` bytes; encoding from {@link BtfIntEncoding}. */
  addInt(name: string, size: number, encoding: number = BtfIntEncoding.NONE): number {
    const rc = libbpf().btf__add_int(this.#handle(), cString(name), BigInt(size), encoding);
    return check(rc, `btf__add_int(${name})`);
  }

  /** An array of `count` elements of type `elemType`, indexed by integer type `indexType`. */
  addArray(indexType: number, elemType: number, count: number): number {
    const rc = libbpf().btf__add_array(this.#handle(), indexType, elemType, count);
    return check(rc, `btf__add_array(${elemType} x ${count})`);
  }

  /** A struct of `size` bytes; add its fields right after with addField. */
  addStruct(name: string, size: number): number {
    return check(
      libbpf().btf__add_struct(this.#handle(), cString(name), size),
      `btf__add_struct(${name})`,
    );
  }

  /** A field of the struct added last, at `byteOffset`. */
  addField(name: string, type: number, byteOffset: number): void {
    check(
      libbpf().btf__add_field(this.#handle(), cString(name), type, byteOffset * 8, 0),
      `btf__add_field(${name})`,
    );
  }

  /** btf__load_into_kernel; returns the BTF fd (owned by this builder, valid until dispose). */
  load(): number {
    const lib = libbpf();
    check(lib.btf__load_into_kernel(this.#handle()), "btf__load_into_kernel");
    return check(lib.btf__fd(this.#handle()), "btf__fd");
  }

  /** Free the BTF (and close its fd). */
  free(): void {
    if (this.#ptr) libbpf().btf__free(this.#ptr);
    this.#ptr = null;
  }

  [Symbol.dispose](): void {
    this.free();
  }
}

/** What the kernel reports about a map (struct bpf_map_info, first fields). */
export interface BpfMapInfo {
  type: number;
  id: number;
  keySize: number;
  valueSize: number;
  maxEntries: number;
  flags: number;
  name: string;
}

/** Options of {@link BpfMapFd.create}. */
export interface BpfMapCreateOptions {
  /** enum bpf_map_type, e.g. BpfMapType.LRU_HASH. */
  type: number;
  /** Map name (the kernel keeps at most 15 characters). */
  name: string;
  keySize: number;
  valueSize: number;
  maxEntries: number;
  /** BTF describing key and value (for readable `bpftool map dump`). */
  btf?: { fd: number; keyTypeId: number; valueTypeId: number };
}

const MAP_CREATE_OPTS_SIZE = 48; // sizeof(struct bpf_map_create_opts) in libbpf 1.1
const MAP_INFO_SIZE = 88; // sizeof(struct bpf_map_info) up to map_extra

/**
 * A map held by this process's own fd, not by a {@link BpfObject}: created standalone
 * (bpf_map_create, no program needed) or opened from a bpffs pin. Element helpers check buffer
 * sizes like {@link BpfMap} (not for per-CPU maps). Dispose to close the fd; a pin keeps the map.
 */
export class BpfMapFd implements Disposable {
  #fd: number;
  /** The map's name (as created, or the pin path when opened from a pin). */
  readonly name: string;
  /** Key and value sizes, read once from the kernel. */
  readonly info: BpfMapInfo;

  private constructor(fd: number, name: string) {
    this.#fd = fd;
    this.name = name;
    try {
      this.info = mapInfo(fd, name);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
  }

  /** bpf_map_create: a new map (needs CAP_BPF or root). */
  static create(options: BpfMapCreateOptions): BpfMapFd {
    const opts = new Uint8Array(MAP_CREATE_OPTS_SIZE);
    const view = new DataView(opts.buffer);
    view.setBigUint64(0, BigInt(MAP_CREATE_OPTS_SIZE), true); // sz
    if (options.btf) {
      view.setUint32(8, options.btf.fd, true);
      view.setUint32(12, options.btf.keyTypeId, true);
      view.setUint32(16, options.btf.valueTypeId, true);
    }
    const fd = check(
      libbpf().bpf_map_create(
        options.type,
        cString(options.name),
        options.keySize,
        options.valueSize,
        options.maxEntries,
        opts,
      ),
      `bpf_map_create(${options.name}, max_entries ${options.maxEntries})`,
    );
    return new BpfMapFd(fd, options.name);
  }

  /** bpf_obj_get: open the map pinned at `path`. @throws {BpfError} ENOENT when no pin. */
  static openPinned(path: string): BpfMapFd {
    return new BpfMapFd(objGet(path), path);
  }

  /** The map fd. */
  get fd(): number {
    if (this.#fd < 0) throw new BpfError(`map ${this.name}`, 9, { detail: "map closed" });
    return this.#fd;
  }

  /** bpf_obj_pin: pin at `path` (a new file on a bpffs). */
  pin(path: string): void {
    check(libbpf().bpf_obj_pin(this.fd, cString(path)), `bpf_obj_pin(${this.name}, ${path})`);
  }

  #checkSizes(op: string, key: Uint8Array, value?: Uint8Array): void {
    if (key.length !== this.info.keySize) {
      throw new BpfError(`${op}(${this.name})`, 22, {
        detail: `key is ${key.length} bytes, the map's key size is ${this.info.keySize}`,
      });
    }
    if (value && value.length !== this.info.valueSize) {
      throw new BpfError(`${op}(${this.name})`, 22, {
        detail: `value is ${value.length} bytes, the map's value size is ${this.info.valueSize}`,
      });
    }
  }

  /** Insert or replace (flags: BPF_ANY, BPF_NOEXIST, BPF_EXIST). */
  update(key: Uint8Array, value: Uint8Array, flags: bigint = BPF_ANY): void {
    this.#checkSizes("update", key, value);
    check(
      libbpf().bpf_map_update_elem(this.fd, key, value, flags),
      `bpf_map_update_elem(${this.name})`,
    );
  }

  /** Read the value of `key` into `out`; false when the key is absent. */
  lookup(key: Uint8Array, out: Uint8Array): boolean {
    this.#checkSizes("lookup", key, out);
    const rc = libbpf().bpf_map_lookup_elem(this.fd, key, out);
    if (rc === -Errno.ENOENT) return false;
    check(rc, `bpf_map_lookup_elem(${this.name})`);
    return true;
  }

  /** Delete `key`; false when it was absent. */
  delete(key: Uint8Array): boolean {
    this.#checkSizes("delete", key);
    const rc = libbpf().bpf_map_delete_elem(this.fd, key);
    if (rc === -Errno.ENOENT) return false;
    check(rc, `bpf_map_delete_elem(${this.name})`);
    return true;
  }

  /** Iterate keys (copies); the map may change meanwhile, as with any BPF map walk. */
  *keys(): Generator<Uint8Array> {
    let cur: Uint8Array | null = null;
    for (;;) {
      const next = new Uint8Array(this.info.keySize);
      const rc = libbpf().bpf_map_get_next_key(this.fd, cur, next);
      if (rc === -Errno.ENOENT) return;
      check(rc, `bpf_map_get_next_key(${this.name})`);
      yield next;
      cur = next;
    }
  }

  /** Close this process's fd (the map lives on while pinned or used elsewhere). */
  close(): void {
    if (this.#fd >= 0) closeFd(this.#fd);
    this.#fd = -1;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** bpf_obj_get_info_by_fd on a map fd. */
export function mapInfo(fd: number, what = `fd ${fd}`): BpfMapInfo {
  const info = new Uint8Array(MAP_INFO_SIZE);
  const len = new Uint32Array([MAP_INFO_SIZE]);
  check(
    libbpf().bpf_obj_get_info_by_fd(fd, info, new Uint8Array(len.buffer)),
    `bpf_obj_get_info_by_fd(${what})`,
  );
  const v = new DataView(info.buffer);
  const nameBytes = info.subarray(24, 40);
  const end = nameBytes.indexOf(0);
  return {
    type: v.getUint32(0, true),
    id: v.getUint32(4, true),
    keySize: v.getUint32(8, true),
    valueSize: v.getUint32(12, true),
    maxEntries: v.getUint32(16, true),
    flags: v.getUint32(20, true),
    name: new TextDecoder().decode(nameBytes.subarray(0, end < 0 ? 16 : end)),
  };
}

/** XDP attach flags (linux/if_link.h XDP_FLAGS_*). */
export const XdpFlags = {
  UPDATE_IF_NOEXIST: 1 << 0,
  SKB_MODE: 1 << 1,
  DRV_MODE: 1 << 2,
  HW_MODE: 1 << 3,
  REPLACE: 1 << 4,
} as const;

const LINK_CREATE_OPTS_SIZE = 64; // sizeof(struct bpf_link_create_opts) in libbpf 1.1
const XDP_QUERY_OPTS_SIZE = 32; // sizeof(struct bpf_xdp_query_opts) up to attach_mode
const PROG_INFO_SIZE = 232; // sizeof(struct bpf_prog_info) in linux 6.1 uapi; zeroed tail is ok

/**
 * bpf_link_create: attach program `progFd` to `targetFd` (an ifindex for BPF_XDP, a cgroup fd,
 * ...) through a new BPF link; `flags` go to link_create.flags (XDP: one of the XdpFlags modes).
 * Returns the link fd: the attachment lives while an fd (or pin) refers to it, so it goes away
 * with the process. Detach early with {@link linkDetachFd}, then close the fd with closeFd.
 */
export function linkCreate(
  progFd: number,
  targetFd: number,
  attachType: number,
  flags = 0,
  what = `prog fd ${progFd} -> ${targetFd}`,
): number {
  const opts = new Uint8Array(LINK_CREATE_OPTS_SIZE);
  const view = new DataView(opts.buffer);
  view.setBigUint64(0, BigInt(LINK_CREATE_OPTS_SIZE), true); // sz
  view.setUint32(8, flags, true);
  return check(
    libbpf().bpf_link_create(progFd, targetFd, attachType, opts),
    `bpf_link_create(${what})`,
  );
}

/** The XDP programs attached to an interface (bpf_xdp_query); ids are 0 when none. */
export interface XdpQueryResult {
  /** The program id when exactly one mode has one (prog_id). */
  progId: number;
  /** Native (driver) mode program id. */
  drvProgId: number;
  /** Generic (skb) mode program id. */
  skbProgId: number;
  /** Offloaded (hardware) program id. */
  hwProgId: number;
  /** enum XDP_ATTACHED_*: 0 none, 1 drv, 2 skb, 3 hw, 4 multi. */
  attachMode: number;
}

/** bpf_xdp_query: which XDP programs are attached to `ifindex` (netlink, any attach method). */
export function xdpQuery(ifindex: number): XdpQueryResult {
  const opts = new Uint8Array(XDP_QUERY_OPTS_SIZE);
  const view = new DataView(opts.buffer);
  view.setBigUint64(0, BigInt(XDP_QUERY_OPTS_SIZE), true); // sz
  check(libbpf().bpf_xdp_query(ifindex, 0, opts), `bpf_xdp_query(ifindex ${ifindex})`);
  return {
    progId: view.getUint32(8, true),
    drvProgId: view.getUint32(12, true),
    hwProgId: view.getUint32(16, true),
    skbProgId: view.getUint32(20, true),
    attachMode: view.getUint8(24),
  };
}

/** What the kernel reports about a loaded program (struct bpf_prog_info, first fields). */
export interface BpfProgInfo {
  /** enum bpf_prog_type. */
  type: number;
  id: number;
  /** The program's name as the kernel keeps it (at most 15 characters). */
  name: string;
  /** Hex tag (hash of the instructions), as `bpftool prog show` prints it. */
  tag: string;
}

/** The program with kernel id `id`: bpf_prog_get_fd_by_id + bpf_obj_get_info_by_fd. */
export function progInfoById(id: number): BpfProgInfo {
  const fd = check(libbpf().bpf_prog_get_fd_by_id(id), `bpf_prog_get_fd_by_id(${id})`);
  try {
    const info = new Uint8Array(PROG_INFO_SIZE);
    const len = new Uint32Array([PROG_INFO_SIZE]);
    check(
      libbpf().bpf_obj_get_info_by_fd(fd, info, new Uint8Array(len.buffer)),
      `bpf_obj_get_info_by_fd(prog ${id})`,
    );
    const v = new DataView(info.buffer);
    const nameBytes = info.subarray(64, 80);
    const end = nameBytes.indexOf(0);
    return {
      type: v.getUint32(0, true),
      id: v.getUint32(4, true),
      name: new TextDecoder().decode(nameBytes.subarray(0, end < 0 ? 16 : end)),
      tag: Array.from(info.subarray(8, 16), (b) => b.toString(16).padStart(2, "0")).join(""),
    };
  } finally {
    closeFd(fd);
  }
}
