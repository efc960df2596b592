/**
 * A BPF ELF object and what it owns: its programs, maps and the links that attach them.
 * @module
 */

import { cString, Errno } from "../libc.ts";
import {
  type BatchMap,
  BPF_ANY,
  BpfError,
  BpfMapType,
  check,
  deleteBatch,
  libbpf,
  possibleCpus,
  ptrOrThrow,
  updateBatch,
} from "./core.ts";
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

  /**
   * Writes `count` elements in one call (keys and values packed one after another, BPF_ANY).
   * Throws the error of the element that failed; those before it are written.
   */
  updateBatch(keys: Uint8Array, values: Uint8Array, count: number): void {
    updateBatch(this.#batchMap(), keys, values, count);
  }

  /**
   * Deletes `count` keys (packed one after another) in one call; stops at the first absent
   * key and returns how many it deleted before it.
   */
  deleteBatch(keys: Uint8Array, count: number): number {
    return deleteBatch(this.#batchMap(), keys, count);
  }

  /** What the batch calls check the buffers against (the fd as it is now). */
  #batchMap(): BatchMap {
    return {
      fd: this.fd,
      name: this.name,
      keyBytes: this.keySize,
      valueBytes: this.valueBufferSize,
    };
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
