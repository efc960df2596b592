/**
 * BPF links, programs and maps found by their kernel ids (what `bpftool link/prog/map show`
 * lists): walking the links, reading a link's or a program's info, opening one by id (a map:
 * BpfMapFd.openById), and swapping a link's program in place (BPF_LINK_UPDATE). Opening by id
 * needs CAP_SYS_ADMIN.
 * @module
 */

import { closeFd } from "../libc.ts";
import { check, libbpf } from "./core.ts";

/** enum bpf_link_type values this binding reads (linux/bpf.h). */
export const BpfLinkType = { XDP: 6 } as const;

/** BPF_F_REPLACE (linux/bpf.h): update only when the current program is the expected one. */
export const BPF_F_REPLACE = 1 << 2;

const LINK_INFO_SIZE = 64; // struct bpf_link_info: type, id, prog_id, then a union at 16
const LINK_UPDATE_OPTS_SIZE = 16; // struct bpf_link_update_opts: sz, flags, old_prog_fd
const PROG_INFO_SIZE = 232; // struct bpf_prog_info as in linux 6.1 uapi; a zeroed tail is ok

/** What the kernel reports about a link (struct bpf_link_info). */
export interface BpfLinkInfo {
  /** enum bpf_link_type, e.g. {@link BpfLinkType}.XDP. */
  type: number;
  id: number;
  /** The program the link runs now. */
  progId: number;
  /** For an XDP link: its interface in the creator's network namespace (0 once detached). */
  ifindex: number;
}

/** bpf_obj_get_info_by_fd on a link fd. */
export function linkInfo(fd: number): BpfLinkInfo {
  const info = new Uint8Array(LINK_INFO_SIZE);
  const len = new Uint32Array([LINK_INFO_SIZE]);
  check(
    libbpf().bpf_obj_get_info_by_fd(fd, info, new Uint8Array(len.buffer)),
    `bpf_obj_get_info_by_fd(link fd ${fd})`,
  );
  const v = new DataView(info.buffer);
  const type = v.getUint32(0, true);
  return {
    type,
    id: v.getUint32(4, true),
    progId: v.getUint32(8, true),
    ifindex: type === BpfLinkType.XDP ? v.getUint32(16, true) : 0,
  };
}

/** The ids of every BPF link on the machine (bpf_link_get_next_id), in id order. */
export function linkIds(): number[] {
  const ids: number[] = [];
  const next = new Uint32Array(1);
  for (let id = 0;;) {
    const rc = libbpf().bpf_link_get_next_id(id, new Uint8Array(next.buffer));
    if (rc === -2) return ids; // ENOENT: no link after `id`
    check(rc, `bpf_link_get_next_id(${id})`);
    id = next[0];
    ids.push(id);
  }
}

/** bpf_link_get_fd_by_id: an fd for link `id` (ENOENT when gone); close it with closeFd. */
export function linkFdById(id: number): number {
  return check(libbpf().bpf_link_get_fd_by_id(id), `bpf_link_get_fd_by_id(${id})`);
}

/** bpf_prog_get_fd_by_id: an fd for program `id` (ENOENT when gone); close it with closeFd. */
export function progFdById(id: number): number {
  return check(libbpf().bpf_prog_get_fd_by_id(id), `bpf_prog_get_fd_by_id(${id})`);
}

/**
 * BPF_LINK_UPDATE: the link runs `newProgFd` from now on, atomically (no packet sees no
 * program). With `oldProgFd`, only if it still runs that program (BPF_F_REPLACE; EPERM
 * otherwise). ENOLINK when the link was detached meanwhile.
 */
export function linkUpdate(linkFd: number, newProgFd: number, oldProgFd?: number): void {
  const opts = new Uint8Array(LINK_UPDATE_OPTS_SIZE);
  const view = new DataView(opts.buffer);
  view.setBigUint64(0, BigInt(LINK_UPDATE_OPTS_SIZE), true); // sz
  if (oldProgFd !== undefined) {
    view.setUint32(8, BPF_F_REPLACE, true);
    view.setUint32(12, oldProgFd, true);
  }
  check(
    libbpf().bpf_link_update(linkFd, newProgFd, opts),
    `bpf_link_update(link fd ${linkFd} -> prog fd ${newProgFd})`,
  );
}

/** A loaded program's id, name and the ids of the maps it uses. */
export interface BpfProgMaps {
  id: number;
  /** As the kernel keeps it (at most 15 characters). */
  name: string;
  mapIds: number[];
}

/** bpf_obj_get_info_by_fd on a program fd, with its map ids (at most `maxMaps`). */
export function progMaps(fd: number, maxMaps = 64): BpfProgMaps {
  const ids = new Uint32Array(maxMaps);
  const info = new Uint8Array(PROG_INFO_SIZE);
  const v = new DataView(info.buffer);
  v.setUint32(52, maxMaps, true); // nr_map_ids: room in map_ids
  const at = Deno.UnsafePointer.value(Deno.UnsafePointer.of(ids));
  v.setBigUint64(56, BigInt(at), true); // map_ids
  const len = new Uint32Array([PROG_INFO_SIZE]);
  check(
    libbpf().bpf_obj_get_info_by_fd(fd, info, new Uint8Array(len.buffer)),
    `bpf_obj_get_info_by_fd(prog fd ${fd})`,
  );
  const nameBytes = info.subarray(64, 80);
  const end = nameBytes.indexOf(0);
  const n = Math.min(v.getUint32(52, true), maxMaps);
  return {
    id: v.getUint32(4, true),
    name: new TextDecoder().decode(nameBytes.subarray(0, end < 0 ? 16 : end)),
    mapIds: Array.from(ids.subarray(0, n)),
  };
}

/** Runs `f` with an fd of program `id`, closed afterwards. */
export function withProgById<T>(id: number, f: (fd: number) => T): T {
  const fd = progFdById(id);
  try {
    return f(fd);
  } finally {
    closeFd(fd);
  }
}
