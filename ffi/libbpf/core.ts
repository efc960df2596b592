/**
 * The libbpf symbol table and what every part of the binding shares: the library handle, its
 * version, {@link BpfError}, libbpf's own log, and the two return-value conventions.
 * @module
 */

import { Errno, errno, errnoName, libc } from "../libc.ts";

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
  bpf_map_update_batch: {
    parameters: ["i32", "buffer", "buffer", "buffer", "pointer"],
    result: "i32",
  },
  bpf_map_delete_batch: { parameters: ["i32", "buffer", "buffer", "pointer"], result: "i32" },
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
  bpf_map_get_fd_by_id: { parameters: ["u32"], result: "i32" },
  bpf_link_get_fd_by_id: { parameters: ["u32"], result: "i32" },
  bpf_link_get_next_id: { parameters: ["u32", "buffer"], result: "i32" },
  bpf_link_update: { parameters: ["i32", "i32", "buffer"], result: "i32" },
} as const satisfies Deno.ForeignLibraryInterface;

export type LibbpfSymbols = Deno.DynamicLibrary<typeof LIBBPF_SYMBOLS>["symbols"];

/** enum bpf_attach_type values used by the fast path (linux/bpf.h). */
export const BpfAttachType = {
  CGROUP_SOCK_OPS: 3,
  SK_SKB_STREAM_PARSER: 4,
  SK_SKB_STREAM_VERDICT: 5,
  SK_SKB_VERDICT: 38,
  XDP: 37,
  /** tcx: a tc program on an interface's ingress through a BPF link (Linux 6.6+, no qdisc). */
  TCX_INGRESS: 46,
  TCX_EGRESS: 47,
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

/** A pointer result, or the BpfError of `op` with the errno libbpf set. */
export function ptrOrThrow(p: Deno.PointerValue, op: string): Deno.PointerObject {
  if (p === null) throw new BpfError(op, errno() || Errno.EINVAL);
  return p;
}

/** An int result, or the BpfError of `op` for its -errno. */
export function check(rc: number, op: string): number {
  if (rc < 0) throw new BpfError(op, -rc);
  return rc;
}

/** The element count in and out of a batch call (and its bytes, as the call takes them). */
const batchCount = new Uint32Array(1);
const batchCountBytes = new Uint8Array(batchCount.buffer);

/**
 * A map as its batch calls see it: its fd, its name for errors, and the bytes of one key and of
 * one value buffer (all CPUs' slots for per-CPU maps).
 */
export interface BatchMap {
  fd: number;
  name: string;
  keyBytes: number;
  valueBytes: number;
}

/** Throws unless `bytes` holds exactly `count` items of `size` bytes. */
function checkBatch(
  op: string,
  map: BatchMap,
  what: string,
  bytes: number,
  size: number,
  count: number,
) {
  if (bytes !== count * size) {
    throw new BpfError(`${op}(${map.name})`, Errno.EINVAL, {
      detail: `${what} are ${bytes} bytes, ${count} ${what} of the map take ${count * size}`,
    });
  }
}

/**
 * BPF_MAP_UPDATE_BATCH: writes `count` elements (keys and values packed one after another) in
 * one call. Throws the error of the element that failed (those before it are written).
 */
export function updateBatch(map: BatchMap, keys: Uint8Array, values: Uint8Array, count: number) {
  checkBatch("updateBatch", map, "keys", keys.length, map.keyBytes, count);
  checkBatch("updateBatch", map, "values", values.length, map.valueBytes, count);
  batchCount[0] = count;
  check(
    libbpf().bpf_map_update_batch(map.fd, keys, values, batchCountBytes, null),
    `bpf_map_update_batch(${map.name})`,
  );
}

/**
 * BPF_MAP_DELETE_BATCH: deletes `count` keys (packed one after another) in one call; stops at
 * the first absent key. Returns how many were deleted before it; throws any other error.
 */
export function deleteBatch(map: BatchMap, keys: Uint8Array, count: number): number {
  checkBatch("deleteBatch", map, "keys", keys.length, map.keyBytes, count);
  batchCount[0] = count;
  const rc = libbpf().bpf_map_delete_batch(map.fd, keys, batchCountBytes, null);
  if (rc === -Errno.ENOENT) return batchCount[0];
  check(rc, `bpf_map_delete_batch(${map.name})`);
  return count;
}
