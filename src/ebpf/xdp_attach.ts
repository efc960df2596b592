/**
 * Attaching the XDP program to network interfaces through BPF links (BPF_LINK_CREATE), native
 * mode with a fallback to generic, or taking an interface over from another sni-proxy instance
 * (src/ebpf/xdp_handover.ts); letting go of them, and saying who holds an interface that is
 * taken.
 * @module
 */

import {
  BpfAttachType,
  BpfError,
  linkCreate,
  progInfoById,
  XdpFlags,
  xdpQuery,
} from "../../ffi/libbpf.ts";
import { Errno, ifNameToIndex } from "../../ffi/libc.ts";
import { type EbpfLog, XdpError } from "./loader.ts";
import { type Adopt, release, takeOver } from "./xdp_handover.ts";

/**
 * Where the program runs: `native` in the driver (fastest; the driver must support XDP),
 * `generic` after skb allocation (any device), `auto` native with a logged fallback to generic.
 */
export type XdpMode = "auto" | "native" | "generic";

/** Where the filter is attached. */
export interface XdpAttachment {
  interface: string;
  ifindex: number;
  /** The mode in effect (in `auto`, what the fallback chose). */
  mode: "native" | "generic";
  /** The kernel's id of the attached program (`bpftool prog show id N`). */
  programId: number;
}

/** The BPF link of the program on one interface (it lives while an fd of it is open). */
export interface XdpLink {
  fd: number;
  attachment: XdpAttachment;
  /** The id of the program this link ran before it was taken over from another instance. */
  predecessor?: number;
}

/** An interface by name and index. */
export interface Interface {
  name: string;
  ifindex: number;
}

/**
 * The index of every interface, before anything is loaded: a typo fails fast and cleanly.
 * @throws {XdpError} `no_interface`.
 */
export function resolveInterfaces(names: string[]): Interface[] {
  return names.map((name) => {
    const ifindex = ifNameToIndex(name);
    if (ifindex === 0) {
      throw new XdpError(
        "no_interface",
        `network interface "${name}" does not exist (in this network namespace)`,
        "fix ebpf.xdp.interfaces; `ip -br link` lists the interfaces",
        { interface: name },
      );
    }
    return { name, ifindex };
  });
}

/**
 * Attaches program `progFd` to every interface, in order: takes an interface over from another
 * sni-proxy instance that runs there (after `adopt` of its program), else attaches anew in
 * `mode`.
 * @throws {XdpError} for the first that fails; the interfaces done before it are let go then.
 */
export function attachAll(
  progFd: number,
  ifaces: Interface[],
  mode: XdpMode,
  log: EbpfLog,
  adopt: Adopt,
): XdpLink[] {
  const links: XdpLink[] = [];
  try {
    for (const iface of ifaces) {
      const taken = takeOver(progFd, iface, log, adopt);
      if (taken && mode !== "auto" && taken.attachment.mode !== mode) {
        log(
          "warning",
          `XDP on ${iface.name} stays in ${taken.attachment.mode} mode, as the instance it was ` +
            `taken over from attached it; ${mode} mode applies at a start with no sni-proxy ` +
            `filter on the interface`,
        );
      }
      links.push(taken ?? attach(progFd, iface.name, iface.ifindex, mode, log));
    }
  } catch (e) {
    for (const l of links) log("debug", `XDP on ${l.attachment.interface}: ${release(l, progFd)}`);
    throw e;
  }
  return links;
}

/** Attaches in `mode`; `auto` tries native and falls back to generic (logged) when unsupported. */
function attach(
  progFd: number,
  ifname: string,
  ifindex: number,
  mode: XdpMode,
  log: EbpfLog,
): XdpLink {
  if (mode !== "generic") {
    try {
      return linkIn("native", progFd, ifname, ifindex);
    } catch (e) {
      if (mode === "native" || !nativeUnsupported(e)) {
        throw attachError(e, "native", ifname, ifindex);
      }
      log(
        "warning",
        `native XDP is not supported on ${ifname} (${(e as BpfError).errnoName}); ` +
          `using generic XDP there (slower: runs after skb allocation)`,
      );
    }
  }
  try {
    return linkIn("generic", progFd, ifname, ifindex);
  } catch (e) {
    throw attachError(e, "generic", ifname, ifindex);
  }
}

/** Creates the link in mode `m`, with the attached program's id when the kernel tells it. */
function linkIn(m: "native" | "generic", progFd: number, ifname: string, ifindex: number): XdpLink {
  const flags = m === "native" ? XdpFlags.DRV_MODE : XdpFlags.SKB_MODE;
  const fd = linkCreate(progFd, ifindex, BpfAttachType.XDP, flags, `XDP ${m} on ${ifname}`);
  let programId = 0;
  try {
    const q = xdpQuery(ifindex);
    programId = m === "native" ? q.drvProgId : q.skbProgId;
  } catch { /* informational only */ }
  return { fd, attachment: { interface: ifname, ifindex, mode: m, programId } };
}

/** The errnos with which a driver refuses native XDP. */
function nativeUnsupported(e: unknown): boolean {
  const code = e instanceof BpfError ? e.errno : 0;
  return code === Errno.EOPNOTSUPP || code === Errno.ENOTSUPP || code === Errno.EINVAL;
}

/** A failed attach in mode `m` as an {@link XdpError} naming the cause and the fix. */
function attachError(e: unknown, m: "native" | "generic", ifname: string, ifindex: number) {
  const err = e as BpfError;
  const code = e instanceof BpfError ? err.errno : 0;
  if (code === Errno.EBUSY || code === Errno.EEXIST) {
    const o = describeOccupant(ifname, ifindex);
    return new XdpError(
      "interface_busy",
      `cannot attach the XDP filter to ${ifname} (${m} mode): ${err.errnoName}, ${o.what} is already attached`,
      o.fix,
      { cause: e, interface: ifname },
    );
  }
  if (m === "native" && nativeUnsupported(e)) {
    return new XdpError(
      "native_unsupported",
      `the driver of ${ifname} does not support native XDP (${err.errnoName})`,
      'set ebpf.xdp.mode to "generic" (or "auto", which falls back to it)',
      { cause: e, interface: ifname },
    );
  }
  return new XdpError(
    code === Errno.EPERM ? "not_permitted" : "attach_failed",
    `cannot attach the XDP filter to ${ifname} (${m} mode): ${err.message}`,
    code === Errno.EPERM
      ? "run as root (CAP_BPF + CAP_NET_ADMIN); check kernel lockdown"
      : "check the interface is up and supports XDP (`ip -d link show dev " + ifname + "`)",
    { cause: e, interface: ifname },
  );
}

/** Describe the XDP program(s) already on `ifindex`, and the command that removes them. */
function describeOccupant(ifname: string, ifindex: number): { what: string; fix: string } {
  let q;
  try {
    q = xdpQuery(ifindex);
  } catch (e) {
    return {
      what: `another XDP program (query failed: ${(e as Error).message})`,
      fix: `inspect it with \`ip link show dev ${ifname}\` and remove it with ` +
        `\`ip link set dev ${ifname} xdp off\``,
    };
  }
  const found: string[] = [];
  const commands: string[] = [];
  for (
    const [id, mode, off] of [
      [q.drvProgId, "native", "xdp"],
      [q.skbProgId, "generic", "xdpgeneric"],
      [q.hwProgId, "offloaded", "xdpoffload"],
    ] as const
  ) {
    if (!id) continue;
    let name = "";
    try {
      name = progInfoById(id).name;
    } catch { /* gone meanwhile, or no permission: the id still identifies it */ }
    found.push(
      `${name ? `"${name}" ` : ""}(id ${id}, ${mode} mode; \`bpftool prog show id ${id}\`)`,
    );
    commands.push(`\`ip link set dev ${ifname} ${off} off\``);
  }
  if (found.length === 0) {
    return {
      what: "another XDP program (it was gone when queried)",
      fix: `retry; check with \`ip link show dev ${ifname}\``,
    };
  }
  return {
    what: `XDP program ${found.join(" and ")}`,
    fix:
      `remove it with ${
        commands.join(" and ")
      } (the command for its mode; plain \`ip link set dev ${ifname} xdp off\` ` +
      `only removes a native-mode program); if it belongs to a BPF link (\`bpftool link\`, e.g. ` +
      `another sni-proxy) stop that process instead; or list another interface`,
  };
}
