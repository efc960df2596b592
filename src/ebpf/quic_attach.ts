/**
 * The QUIC fast path's attachment: tcx links (BPF_LINK_CREATE, BPF_TCX_INGRESS) on the ingress
 * of each interface, the interface checks before them, and the forwarding setting the program's
 * route lookups depend on.
 * @module
 */

import { BpfAttachType, linkCreate, linkDetachFd } from "../../ffi/libbpf.ts";
import { closeFd, Errno, ifNameToIndex } from "../../ffi/libc.ts";
import { EbpfError, type EbpfLog } from "./loader.ts";

/**
 * Why the QUIC fast path could not be set up. Reasons: `bad_option`, `unsupported_platform`,
 * `old_kernel`, `not_root`, `no_libbpf`, `no_object`, `bad_object`, `no_interface`,
 * `unsupported_interface`, `load_failed`, `verifier_rejected`, `not_permitted`,
 * `attach_failed`, `update_failed`, `closed`.
 */
export class QuicBpfError extends EbpfError {
  override name = "QuicBpfError";
}

/** The tcx link of the program on one interface (attached while `fd` is open). */
export interface TcxLink {
  fd: number;
  interface: string;
  ifindex: number;
}

/** ARPHRD_ETHER and ARPHRD_LOOPBACK: the program expects a 14-byte Ethernet header. */
const ETHERNET_TYPES = new Set(["1", "772"]);

/** An interface by name and index. */
export interface QuicInterface {
  name: string;
  ifindex: number;
}

/** The interface by name, refusing a missing one and one without Ethernet framing. */
export function resolveInterface(name: string): QuicInterface {
  const ifindex = ifNameToIndex(name);
  if (ifindex === 0) {
    throw new QuicBpfError(
      "no_interface",
      `network interface "${name}" does not exist (in this network namespace)`,
      "fix the interface list; `ip -br link` lists the interfaces",
      { interface: name },
    );
  }
  let type = "";
  try {
    type = Deno.readTextFileSync(`/sys/class/net/${name}/type`).trim();
  } catch { /* no sysfs: let the attach decide */ }
  if (type && !ETHERNET_TYPES.has(type)) {
    throw new QuicBpfError(
      "unsupported_interface",
      `interface "${name}" has no Ethernet framing (ARPHRD ${type}); the QUIC fast path ` +
        `handles Ethernet interfaces and lo only`,
      "leave it out of the list (its flows are relayed in userspace)",
      { interface: name },
    );
  }
  return { name, ifindex };
}

/** Attach through a tcx link on the interface's ingress. */
export function attach(progFd: number, iface: QuicInterface): TcxLink {
  try {
    const fd = linkCreate(
      progFd,
      iface.ifindex,
      BpfAttachType.TCX_INGRESS,
      0,
      `tcx ingress on ${iface.name}`,
    );
    return { fd, interface: iface.name, ifindex: iface.ifindex };
  } catch (e) {
    const code = (e as { errno?: number }).errno;
    throw new QuicBpfError(
      code === Errno.EPERM ? "not_permitted" : "attach_failed",
      `cannot attach the QUIC fast path to ${iface.name}: ${(e as Error).message}`,
      code === Errno.EPERM
        ? "run as root (CAP_BPF + CAP_NET_ADMIN); check kernel lockdown"
        : "tcx needs Linux 6.6 or later; check `bpftool net show dev " + iface.name + "`",
      { cause: e, interface: iface.name },
    );
  }
}

/** Detach a link and close its fd; a link gone with its interface is only logged (debug). */
export function detach(link: TcxLink, log: EbpfLog): void {
  try {
    linkDetachFd(link.fd, `tcx link on ${link.interface}`);
  } catch (e) {
    log("debug", `QUIC fast path detach from ${link.interface}: ${(e as Error).message}`);
  }
  closeFd(link.fd);
}

/**
 * Logs the attached interfaces where forwarding is off for a family: there bpf_fib_lookup
 * answers FWD_DISABLED, so a datagram to another host arriving there waits (in userspace) until
 * the way to its destination has been learned from the other direction.
 */
export function noteForwarding(ifaces: QuicInterface[], log: EbpfLog): void {
  for (const { name } of ifaces) {
    if (name === "lo") continue;
    const off = ["ipv4", "ipv6"].filter((family) => {
      try {
        return Deno.readTextFileSync(`/proc/sys/net/${family}/conf/${name}/forwarding`).trim() ===
          "0";
      } catch {
        return false;
      }
    });
    if (off.length === 0) continue;
    log(
      "info",
      `QUIC fast path: forwarding is off on ${name} (${
        off.join(", ")
      }): datagrams arriving there ` +
        `for another host are relayed in userspace (counted as fibFwdDisabled); to forward them ` +
        `in the kernel set ${off.map((f) => `net.${f}.conf.${name}.forwarding=1`).join(" and ")}`,
    );
  }
}
