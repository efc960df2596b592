/**
 * Handing the XDP filter of an interface from one sni-proxy instance to the next at a restart,
 * without a moment where the interface has no filter. XDP is one program per interface, so two
 * instances cannot each attach their own; instead:
 *
 * - A starting instance that finds an sni-proxy program on the interface, attached through a
 *   BPF link, opens that link by id and swaps its own program in (BPF_LINK_UPDATE with
 *   BPF_F_REPLACE: atomic, and only if the program is still the one it found). It then holds an
 *   fd of that link, like the instance it took over from; before the swap it may copy the old
 *   program's block set (the caller's `adopt`).
 * - A stopping instance never detaches explicitly: it closes its fd of the link, and the kernel
 *   detaches the link when its last fd closes, that is when the last instance holding it
 *   stops. If the link still runs the stopping instance's own program and the instance it took
 *   over from still runs, the program is handed back to that one first (a new instance that
 *   stops before the old one, e.g. a failed upgrade, leaves the old one's filter in force).
 *
 * Nothing is pinned: the link lives as long as one of the instances does. Opening a link or a
 * program by id needs CAP_SYS_ADMIN; without it a start finds the interface busy, as before.
 * @module
 */

import {
  BpfError,
  BpfLinkType,
  linkFdById,
  linkIds,
  linkInfo,
  linkUpdate,
  progInfoById,
  progMaps,
  withProgById,
  xdpQuery,
} from "../../ffi/libbpf.ts";
import { closeFd, Errno } from "../../ffi/libc.ts";
import { XDP_PROGRAM } from "./layout.ts";
import { type EbpfLog, XdpError } from "./loader.ts";
import type { Interface, XdpLink } from "./xdp_attach.ts";

/** Copies what should carry over from the program with id `oldProgId` (its block set). */
export type Adopt = (oldProgId: number) => void;

/** How often a takeover is retried when another instance swaps the program meanwhile. */
const ATTEMPTS = 3;
/** EPERM: another instance swapped first; ENOENT/ENOLINK: the old one went away meanwhile. */
const RETRY_ERRNOS: readonly number[] = [Errno.EPERM, Errno.ENOENT, Errno.ENOLINK];

/**
 * Takes the interface over from another sni-proxy instance: swaps `progFd` into the BPF link
 * that runs that instance's program there. Null when there is nothing to take over (no
 * program, another kind of program, one attached without a link, or no permission to open it:
 * logged): the caller attaches the usual way, which names any occupant.
 */
export function takeOver(
  progFd: number,
  iface: Interface,
  log: EbpfLog,
  adopt: Adopt,
): XdpLink | null {
  const programId = progMaps(progFd).id;
  for (let attempt = 1; attempt <= ATTEMPTS; attempt++) {
    const occupant = sniProgramOn(iface.ifindex);
    if (!occupant) return null;
    let link: { fd: number; id: number } | null;
    try {
      link = linkOf(occupant.progId, iface.ifindex);
    } catch (e) {
      log(
        "warning",
        `cannot take XDP on ${iface.name} over from sni-proxy program id ${occupant.progId}: ` +
          `${(e as Error).message} (opening it by id needs CAP_SYS_ADMIN)`,
      );
      return null;
    }
    if (link === null) return null;
    const linkFd = link.fd;
    try {
      adopt(occupant.progId);
      withProgById(occupant.progId, (oldFd) => linkUpdate(linkFd, progFd, oldFd));
    } catch (e) {
      closeFd(linkFd);
      const errno = e instanceof BpfError ? e.errno : 0;
      if (RETRY_ERRNOS.includes(errno)) continue;
      throw new XdpError(
        "attach_failed",
        `cannot take XDP on ${iface.name} over from sni-proxy program id ${occupant.progId}: ` +
          (e as Error).message,
        "stop the other sni-proxy first, or list another interface",
        { cause: e, interface: iface.name },
      );
    }
    log(
      "info",
      `XDP on ${iface.name} taken over from sni-proxy program id ${occupant.progId} ` +
        `(${occupant.mode} mode) without a gap: BPF link id ${link.id} now runs ` +
        `program id ${programId}`,
    );
    return {
      fd: linkFd,
      attachment: { interface: iface.name, ifindex: iface.ifindex, mode: occupant.mode, programId },
      predecessor: occupant.progId,
    };
  }
  return null;
}

/**
 * Lets go of `link` at close: hands the program back to the instance it was taken over from
 * when the link still runs this process's program (`ownProgFd`) and that instance's program still exists, then closes
 * this process's fd of the link. Returns what is on the interface afterwards, for the log.
 */
export function release(link: XdpLink, ownProgFd: number): string {
  const { ifindex } = link.attachment;
  let handedTo = 0;
  try {
    const info = linkInfo(link.fd);
    const own = info.progId === progMaps(ownProgFd).id;
    if (link.predecessor && own && info.ifindex !== 0) {
      withProgById(link.predecessor, (fd) => linkUpdate(link.fd, fd, ownProgFd));
      handedTo = link.predecessor;
    }
  } catch { /* the predecessor is gone, or the link went with its interface */ }
  closeFd(link.fd);
  if (handedTo) return `handed back to the instance it took over from (program id ${handedTo})`;
  let now = 0;
  try {
    const q = xdpQuery(ifindex);
    now = q.drvProgId || q.skbProgId;
  } catch { /* the interface is gone: nothing is attached to it */ }
  return now ? `left to program id ${now} (a newer instance)` : "detached";
}

/** The sni-proxy XDP program on `ifindex` (native or generic), or null. */
function sniProgramOn(
  ifindex: number,
): { progId: number; mode: "native" | "generic" } | null {
  let q;
  try {
    q = xdpQuery(ifindex);
  } catch {
    return null;
  }
  const progId = q.drvProgId || q.skbProgId;
  if (!progId) return null;
  try {
    if (progInfoById(progId).name !== XDP_PROGRAM) return null;
  } catch {
    return null; // gone meanwhile, or no permission: attach the usual way
  }
  return { progId, mode: q.drvProgId ? "native" : "generic" };
}

/**
 * The XDP link that runs `progId` on `ifindex` (an fd of it, and its id), or null (the program
 * is attached without a link). Program ids are machine-wide, so this is the link of this network
 * namespace's interface even where another namespace has the same ifindex.
 * @throws {BpfError} when the links cannot be listed or opened (EPERM without CAP_SYS_ADMIN).
 */
function linkOf(progId: number, ifindex: number): { fd: number; id: number } | null {
  for (const id of linkIds()) {
    let fd: number;
    try {
      fd = linkFdById(id);
    } catch (e) {
      if (e instanceof BpfError && e.errno === Errno.ENOENT) continue;
      throw e;
    }
    let info;
    try {
      info = linkInfo(fd);
    } catch {
      info = null;
    }
    if (info?.type === BpfLinkType.XDP && info.progId === progId && info.ifindex === ifindex) {
      return { fd, id };
    }
    closeFd(fd);
  }
  return null;
}
