/**
 * BPF objects by fd rather than through an ELF object: pins, map creation and lookup, BTF built
 * by hand, XDP attachment, program info.
 * @module
 */

import { closeFd, cString, Errno } from "../libc.ts";
import {
  type BatchMap,
  BPF_ANY,
  BpfError,
  check,
  deleteBatch,
  libbpf,
  ptrOrThrow,
  updateBatch,
} from "./core.ts";

/** bpf_obj_get: an fd for a pinned object (map, program or link); close it with closeFd. */
export function objGet(path: string): number {
  return check(libbpf().bpf_obj_get(cString(path)), `bpf_obj_get(${path})`);
}

/** bpf_obj_pin: pin the object of `fd` (map, program or link) at `path` on a bpffs. */
export function objPin(fd: number, path: string): void {
  check(libbpf().bpf_obj_pin(fd, cString(path)), `bpf_obj_pin(fd ${fd}, ${path})`);
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

  /**
   * bpf_map_get_fd_by_id: open map `id` (e.g. one of a program's, see progMaps); needs
   * CAP_SYS_ADMIN. @throws {BpfError} ENOENT when it is gone.
   */
  static openById(id: number): BpfMapFd {
    const fd = check(libbpf().bpf_map_get_fd_by_id(id), `bpf_map_get_fd_by_id(${id})`);
    return new BpfMapFd(fd, `map id ${id}`);
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
      keyBytes: this.info.keySize,
      valueBytes: this.info.valueSize,
    };
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
