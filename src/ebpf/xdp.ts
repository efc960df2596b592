/**
 * Loader and control of the XDP source filter (bpf/xdp.bpf.c): the first line of the source
 * ACL, in the driver (or generic XDP) before the kernel allocates an skb. The userspace ACL of
 * the listener stays the second line.
 *
 * XdpFilter.open() loads the object, fills the deny/allow tries and the port set, and attaches
 * the program to every configured interface through a BPF link (BPF_LINK_CREATE). A link lives
 * as long as an fd refers to it, so the filter goes away with the process even on SIGKILL; it is
 * never pinned. An interface where another sni-proxy instance's filter runs (a restart: the new
 * process starts next to the old one) is taken over without a gap, its block set copied, and
 * handed back should this instance stop first (src/ebpf/xdp_handover.ts). update() rewrites the
 * maps in place (the program stays attached): new entries are added before removed ones are
 * deleted, so there is no moment without filtering.
 * @module
 */

import type { BpfMap, BpfObject } from "../../ffi/libbpf.ts";
import { Errno } from "../../ffi/libc.ts";
import type { Cidr } from "../route/acl.ts";
import { inRange, XDP_DEFAULT_BLOCK_ENTRIES, XDP_DEFAULT_ENTRIES, XDP_ENTRIES } from "./bounds.ts";
import {
  lpmKey,
  u32Key,
  XDP_BLOCK_MAPS,
  XDP_PROGRAM,
  XDP_STATS_FIELDS,
  XDP_STATS_INDEX,
  XDP_STATS_MAP,
  XDP_STATS_SIZE,
  XDP_TRIES,
} from "./layout.ts";
import {
  checkBpfAccess,
  checkPlatform,
  type EbpfLog,
  loadError,
  type LoadErrorHints,
  openBpfObject,
  sumPerCpu,
  withLibbpfLog,
  XdpError,
} from "./loader.ts";
import {
  attachAll,
  resolveInterfaces,
  type XdpAttachment,
  type XdpLink,
  type XdpMode,
} from "./xdp_attach.ts";
import { type XdpBlock, XdpBlockMaps, type XdpBlockResult } from "./xdp_blockmaps.ts";
import { release } from "./xdp_handover.ts";
import {
  applyLists,
  checkCapacity,
  fillLists,
  type ListMaps,
  listMaps,
  type Wanted,
  wanted,
} from "./xdp_lists.ts";

export { lpmKey, XdpError };
export type { XdpAttachment, XdpBlock, XdpBlockResult, XdpMode };

/** Log sink of the loader (same levels as the proxy's logger). */
export type XdpLog = EbpfLog;

/** Options of {@link XdpFilter.open}. */
export interface XdpFilterOptions {
  /** Interface names in this process's network namespace, e.g. `["eth0"]`. */
  interfaces: string[];
  mode: XdpMode;
  /** Sources whose packets are all dropped (acl.deny). */
  deny: Cidr[];
  /** When non-empty, TCP to `ports` from sources outside these is dropped (acl.allow). */
  allow: Cidr[];
  /** The proxy's listening TCP ports (the allow list applies to these only). */
  ports: number[];
  /** Capacity of each of the four tries (deny/allow x IPv4/IPv6); default 16384. */
  maxEntries?: number;
  /** Capacity of the temporary block set (each family); default 4096. */
  blockMaxEntries?: number;
  /** Receives loader and libbpf messages. */
  log: XdpLog;
  /** The compiled object's bytes; default: read bpf/xdp.bpf.o next to this source tree. */
  object?: Uint8Array;
}

/** Packets seen by the program, by outcome. */
export interface XdpCounters {
  passed: number;
  /** Source in the deny list. */
  droppedDeny: number;
  /** TCP to a listening port from a source outside a non-empty allow list. */
  droppedNotAllowed: number;
  /** TCP to a listening port from a temporarily blocked source ({@link XdpFilter.block}). */
  droppedBlocked: number;
}

/** Sum over CPUs and interfaces of the filter's counters, in total and per address family. */
export interface XdpStats extends XdpCounters {
  ipv4: XdpCounters;
  ipv6: XdpCounters;
  /** Non-IP frames (ARP, ...) and frames too short to parse; always passed. */
  other: XdpCounters;
}

const STATS_KEYS = Object.values(XDP_STATS_INDEX).map(u32Key);

/**
 * The XDP source filter, loaded and attached to its interfaces. Use {@link XdpFilter.open};
 * update() on reload; close() detaches everything (the kernel also does at process exit).
 */
export class XdpFilter {
  readonly #obj: BpfObject;
  readonly #maps: ListMaps;
  readonly #stats: BpfMap;
  readonly #statsBuf: Uint8Array;
  readonly #links: XdpLink[];
  readonly #log: XdpLog;
  readonly #maxEntries: number;
  readonly #blocks: XdpBlockMaps;
  #current: Wanted;
  #closed = false;

  private constructor(init: {
    obj: BpfObject;
    links: XdpLink[];
    log: XdpLog;
    maxEntries: number;
    blocks: XdpBlockMaps;
    current: Wanted;
  }) {
    this.#obj = init.obj;
    this.#maps = listMaps(init.obj);
    this.#stats = init.obj.map(XDP_STATS_MAP);
    this.#statsBuf = new Uint8Array(this.#stats.valueBufferSize);
    this.#links = init.links;
    this.#log = init.log;
    this.#maxEntries = init.maxEntries;
    this.#blocks = init.blocks;
    this.#current = init.current;
  }

  /**
   * Load the filter, fill its maps and attach it to every interface.
   * @throws {XdpError} naming the cause and the fix; nothing stays attached then.
   */
  static async open(options: XdpFilterOptions): Promise<XdpFilter> {
    const log = options.log;
    const { maxEntries, blockMax } = checkOptions(options);
    const want = wanted(options.deny, options.allow, options.ports);
    checkCapacity(want, maxEntries);
    checkPlatform(
      XdpError,
      "the XDP filter",
      [5, 9],
      "BPF links for XDP",
      "remove ebpf.xdp from the config (the userspace ACL still applies)",
    );
    await checkBpfAccess(
      XdpError,
      "load and attach XDP programs",
      "run as root, or grant CAP_BPF and CAP_NET_ADMIN",
    );
    const ifaces = resolveInterfaces(options.interfaces);
    const obj = await openBpfObject(XdpError, "xdp.bpf.o", "sni_xdp", "XDP", options.object, log);
    let links: XdpLink[];
    let blocks: XdpBlockMaps;
    try {
      load(obj, maxEntries, blockMax, log);
      // Maps first, then attach: the program never runs with empty lists.
      fillLists(listMaps(obj), want);
      blocks = new XdpBlockMaps(obj, blockMax);
      const adopt = (oldProgId: number) => {
        let done;
        try {
          done = blocks.adopt(oldProgId);
        } catch (e) {
          log("warning", `XDP block set not carried over: ${(e as Error).message}`);
          return;
        }
        const { adopted, full } = done;
        if (adopted + full === 0) return;
        log(
          full ? "warning" : "info",
          `XDP block set: ${adopted} blocked source(s) carried over from program id ${oldProgId}` +
            (full ? `; ${full} left out, the block set is full` : ""),
        );
      };
      links = attachAll(obj.program(XDP_PROGRAM).fd, ifaces, options.mode, log, adopt);
    } catch (e) {
      obj.close();
      throw e;
    }
    const filter = new XdpFilter({ obj, links, log, maxEntries, blocks, current: want });
    log(
      "info",
      `XDP source filter attached to ${
        links.map((l) => `${l.attachment.interface} (${l.attachment.mode})`).join(", ")
      }: ${want.deny_v4.size + want.deny_v6.size} deny, ${
        want.allow_v4.size + want.allow_v6.size
      } allow CIDRs, ports ${[...want.ports.values()].map((p) => p.text).join(",") || "none"}`,
    );
    return filter;
  }

  /** Where the filter is attached (one entry per interface, in the order given). */
  get attachments(): readonly XdpAttachment[] {
    return this.#links.map((l) => l.attachment);
  }

  /**
   * Replace the lists in place, while attached (on SIGHUP). New entries are added first, the
   * allow-list switch is set, then removed entries are deleted, so a source denied before and
   * after is never let through, even when its covering block changes (e.g. /32 -> /30).
   * @throws {XdpError} when an entry cannot be added (capacity): the previous lists stay in
   * force, unchanged.
   */
  update(deny: Cidr[], allow: Cidr[], ports: number[]): void {
    if (this.#closed) {
      throw new XdpError("closed", "the XDP filter is closed", "open a new one");
    }
    const prev = this.#current;
    const next = wanted(deny, allow, ports);
    checkCapacity(next, this.#maxEntries, prev);
    const { added, removed } = applyLists(this.#maps, prev, next);
    this.#current = next;
    this.#log(
      "info",
      `XDP source filter updated in place: ${added} entries added, ${removed} removed (${
        next.deny_v4.size + next.deny_v6.size
      } deny, ${next.allow_v4.size + next.allow_v6.size} allow CIDRs)`,
    );
  }

  /** The program's counters summed over CPUs (and interfaces). */
  stats(): XdpStats {
    const family = (index: number): XdpCounters => {
      const ok = !this.#closed && this.#stats.lookup(STATS_KEYS[index], this.#statsBuf);
      const s = sumPerCpu(
        ok ? this.#statsBuf : new Uint8Array(0),
        XDP_STATS_SIZE,
        XDP_STATS_FIELDS,
      );
      return {
        passed: s.passed,
        droppedDeny: s.dropped_deny,
        droppedNotAllowed: s.dropped_not_allowed,
        droppedBlocked: s.dropped_blocked,
      };
    };
    const ipv4 = family(XDP_STATS_INDEX.ipv4);
    const ipv6 = family(XDP_STATS_INDEX.ipv6);
    const other = family(XDP_STATS_INDEX.other);
    return {
      passed: ipv4.passed + ipv6.passed + other.passed,
      droppedDeny: ipv4.droppedDeny + ipv6.droppedDeny,
      droppedNotAllowed: ipv4.droppedNotAllowed + ipv6.droppedNotAllowed,
      droppedBlocked: ipv4.droppedBlocked + ipv6.droppedBlocked,
      ipv4,
      ipv6,
      other,
    };
  }

  /** How many sources the block set holds at most. */
  get blockCapacity(): number {
    return this.#blocks.capacity;
  }

  /**
   * Drop TCP to the listening ports from `source` (an IP address) for `ms` from now: a new
   * entry, or a later expiry for one already there (its hit count kept). "full" when the set
   * holds {@link blockCapacity} other sources (nothing changes then).
   * @throws {XdpError} for a source that is not an IP address, or when the kernel refuses.
   */
  block(source: string, ms: number): XdpBlockResult {
    return this.#blocks.block(source, ms);
  }

  /** Lift the block of `source` now; false when it was not blocked. */
  unblock(source: string): boolean {
    return this.#blocks.unblock(source);
  }

  /** Delete the expired entries (the program already lets them through); returns their sources. */
  sweepBlocked(): string[] {
    return this.#blocks.sweep();
  }

  /** The block set now, with each entry's time left and hits. */
  blocked(): XdpBlock[] {
    return this.#blocks.list();
  }

  /**
   * Let go of every interface (detached there, unless a newer instance took it over or this
   * one hands it back to the instance it took it over from) and free the program and maps.
   * Idempotent.
   */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#blocks.close();
    const progFd = this.#obj.program(XDP_PROGRAM).fd;
    const outcomes = new Map<string, string[]>();
    for (const l of this.#links) {
      const outcome = release(l, progFd);
      outcomes.set(outcome, [...outcomes.get(outcome) ?? [], l.attachment.interface]);
    }
    this.#obj.close();
    for (const [outcome, ifaces] of outcomes) {
      this.#log(
        "info",
        outcome === "detached"
          ? `XDP source filter detached from ${ifaces.join(", ")}`
          : `XDP source filter on ${ifaces.join(", ")}: ${outcome}`,
      );
    }
  }
}

/**
 * The map capacities (defaults filled in), after refusing options out of range, an unknown
 * mode, no interface or one listed twice (`bad_option`).
 */
function checkOptions(options: XdpFilterOptions): { maxEntries: number; blockMax: number } {
  const maxEntries = options.maxEntries ?? XDP_DEFAULT_ENTRIES;
  const blockMax = options.blockMaxEntries ?? XDP_DEFAULT_BLOCK_ENTRIES;
  for (const [name, n] of [["maxEntries", maxEntries], ["blockMaxEntries", blockMax]] as const) {
    if (!inRange(n, XDP_ENTRIES)) {
      throw new XdpError(
        "bad_option",
        `${name} must be an integer from ${XDP_ENTRIES.min} to ${XDP_ENTRIES.max} (got ${n})`,
        "fix the XDP map capacity in the config",
      );
    }
  }
  if (!["auto", "native", "generic"].includes(options.mode)) {
    throw new XdpError(
      "bad_option",
      `XDP mode must be "auto", "native" or "generic" (got ${JSON.stringify(options.mode)})`,
      "fix ebpf.xdp.mode in the config",
    );
  }
  if (options.interfaces.length === 0) {
    throw new XdpError(
      "bad_option",
      "no interface to attach the XDP filter to",
      "list at least one in ebpf.xdp.interfaces",
    );
  }
  const dup = options.interfaces.find((n, i) => options.interfaces.indexOf(n) !== i);
  if (dup !== undefined) {
    throw new XdpError(
      "bad_option",
      `interface "${dup}" is listed twice`,
      "list each interface once in ebpf.xdp.interfaces",
    );
  }
  return { maxEntries, blockMax };
}

/** Size the maps and load the program. */
function load(obj: BpfObject, maxEntries: number, blockMax: number, log: XdpLog): void {
  try {
    for (const name of XDP_TRIES) obj.map(name).setMaxEntries(maxEntries);
    for (const name of Object.values(XDP_BLOCK_MAPS)) obj.map(name).setMaxEntries(blockMax);
    withLibbpfLog(log, () => obj.load());
  } catch (e) {
    throw loadError(XdpError, e, xdpLoadHints(maxEntries));
  }
}

/** What a failed load of the XDP object means, per cause (see loadError). */
function xdpLoadHints(maxEntries: number): LoadErrorHints {
  return {
    program: "the XDP program",
    verifierFallback: "remove ebpf.xdp",
    memoryErrnos: [Errno.ENOMEM, Errno.E2BIG, Errno.ENOSPC],
    memory: {
      reason: "load_failed",
      cause: (errnoName) =>
        `the kernel could not create the XDP maps (${errnoName}; ${maxEntries} entries per trie)`,
      fix: "lower the XDP map capacity, or raise RLIMIT_MEMLOCK (ulimit -l) on kernels before 5.11",
    },
    refused: "the XDP program",
    permissionFix: "run as root with CAP_BPF and CAP_NET_ADMIN; check kernel lockdown",
    object: "the XDP object",
    otherFix: "check the kernel supports XDP and LPM_TRIE maps",
  };
}
