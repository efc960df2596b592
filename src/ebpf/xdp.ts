/**
 * Loader and control of the XDP source filter (bpf/xdp.bpf.c): the first line of the source
 * ACL, in the driver (or generic XDP) before the kernel allocates an skb. The userspace ACL of
 * the listener stays the second line.
 *
 * XdpFilter.open() loads the object, fills the deny/allow tries and the port set, and attaches
 * the program to every configured interface through a BPF link (BPF_LINK_CREATE). A link lives
 * as long as an fd refers to it, so the filter goes away with the process even on SIGKILL; it is
 * never pinned. update() rewrites the maps in place (the program stays attached): new entries
 * are added before removed ones are deleted, so there is no moment without filtering.
 * @module
 */

import {
  BpfAttachType,
  BpfError,
  type BpfMap,
  type BpfObject,
  linkCreate,
  linkDetachFd,
  progInfoById,
  XdpFlags,
  xdpQuery,
} from "../../ffi/libbpf.ts";
import { closeFd, Errno, ifNameToIndex, monotonicNs } from "../../ffi/libc.ts";
import { type Cidr, parseCidr } from "../route/acl.ts";
import { inRange, XDP_DEFAULT_BLOCK_ENTRIES, XDP_DEFAULT_ENTRIES, XDP_ENTRIES } from "./bounds.ts";
import {
  decodeXdpBlock,
  encodeXdpBlock,
  encodeXdpConfig,
  KEY_ZERO,
  lpmKey,
  PORT_VALUE,
  portKey,
  TRIE_VALUE,
  u32Key,
  XDP_BLOCK,
  XDP_BLOCK_MAPS,
  XDP_MAPS,
  XDP_PORTS_MAX,
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

export { lpmKey, XdpError };

/** Log sink of the loader (same levels as the proxy's logger). */
export type XdpLog = EbpfLog;

/**
 * Where the program runs: `native` in the driver (fastest; the driver must support XDP),
 * `generic` after skb allocation (any device), `auto` native with a logged fallback to generic.
 */
export type XdpMode = "auto" | "native" | "generic";

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

/** A source in the temporary block set. */
export interface XdpBlock {
  source: string;
  /** Until the program lets it through again (0 once expired, until the next sweep). */
  expiresInMs: number;
  /** Packets dropped for this entry. */
  hits: number;
}

/** What {@link XdpFilter.block} did. */
export type XdpBlockResult = "blocked" | "extended" | "full";

/** Sum over CPUs and interfaces of the filter's counters, in total and per address family. */
export interface XdpStats extends XdpCounters {
  ipv4: XdpCounters;
  ipv6: XdpCounters;
  /** Non-IP frames (ARP, ...) and frames too short to parse; always passed. */
  other: XdpCounters;
}

/** Where the filter is attached. */
export interface XdpAttachment {
  interface: string;
  ifindex: number;
  /** The mode in effect (in `auto`, what the fallback chose). */
  mode: "native" | "generic";
  /** The kernel's id of the attached program (`bpftool prog show id N`). */
  programId: number;
}

const STATS_KEYS = Object.values(XDP_STATS_INDEX).map(u32Key);
const TRIES = XDP_TRIES;
type TrieName = typeof TRIES[number];
type MapName = typeof XDP_MAPS[number];

function hex(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += b.toString(16).padStart(2, "0");
  return s;
}

/** One map's wanted content: key hex -> key bytes (plus the CIDR text for messages). */
type Entries = Map<string, { key: Uint8Array; text: string }>;

interface Wanted {
  deny_v4: Entries;
  deny_v6: Entries;
  allow_v4: Entries;
  allow_v6: Entries;
  ports: Entries;
  allowActive: boolean;
}

function wanted(deny: Cidr[], allow: Cidr[], ports: number[]): Wanted {
  const w: Wanted = {
    deny_v4: new Map(),
    deny_v6: new Map(),
    allow_v4: new Map(),
    allow_v6: new Map(),
    ports: new Map(),
    allowActive: allow.length > 0,
  };
  for (const [list, kind] of [[deny, "deny"], [allow, "allow"]] as const) {
    for (const c of list) {
      const key = lpmKey(c);
      w[`${kind}_${c.v6 ? "v6" : "v4"}`].set(hex(key), { key, text: c.text });
    }
  }
  for (const p of ports) {
    if (!Number.isInteger(p) || p < 1 || p > 65535) {
      throw new XdpError("bad_option", `port ${p} is out of range`, "ports must be 1-65535");
    }
    const key = portKey(p);
    w.ports.set(hex(key), { key, text: String(p) });
  }
  return w;
}

const TRIE_LABEL: Record<TrieName, string> = {
  deny_v4: "IPv4 deny",
  deny_v6: "IPv6 deny",
  allow_v4: "IPv4 allow",
  allow_v6: "IPv6 allow",
};

/**
 * Refuse lists that do not fit. During update() a trie holds the old and the new entries
 * together for a moment (add first, then delete), so `prev` entries not in `w` count too.
 */
function checkCapacity(w: Wanted, maxEntries: number, prev?: Wanted): void {
  for (const name of TRIES) {
    let size = w[name].size;
    if (prev) { for (const k of prev[name].keys()) if (!w[name].has(k)) size++; }
    if (size > maxEntries) {
      throw new XdpError(
        "too_many_entries",
        `${w[name].size} ${TRIE_LABEL[name]} CIDRs${
          prev && size > w[name].size ? ` (${size} while replacing the previous list)` : ""
        } exceed the XDP trie capacity (${maxEntries})`,
        "merge CIDRs into wider blocks or raise the XDP map capacity (maxEntries)",
      );
    }
  }
  let ports = w.ports.size;
  if (prev) { for (const k of prev.ports.keys()) if (!w.ports.has(k)) ports++; }
  if (ports > XDP_PORTS_MAX) {
    throw new XdpError(
      "too_many_entries",
      `${w.ports.size} listening ports exceed the XDP port set (${XDP_PORTS_MAX})`,
      "use fewer listeners",
    );
  }
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

/**
 * The XDP source filter, loaded and attached to its interfaces. Use {@link XdpFilter.open};
 * update() on reload; close() detaches everything (the kernel also does at process exit).
 */
export class XdpFilter {
  readonly #obj: BpfObject;
  readonly #maps: Record<MapName, BpfMap>;
  readonly #stats: BpfMap;
  readonly #statsBuf: Uint8Array;
  readonly #links: { fd: number; attachment: XdpAttachment }[];
  readonly #log: XdpLog;
  readonly #maxEntries: number;
  readonly #blockMaps: { v4: BpfMap; v6: BpfMap };
  readonly #blockMax: number;
  readonly #blockBuf = new Uint8Array(XDP_BLOCK.size);
  /** The entries of blocked_v4/blocked_v6, by source text. */
  readonly #blocked = new Map<string, { v6: boolean; key: Uint8Array; expiresNs: bigint }>();
  #current: Wanted;
  #closed = false;

  private constructor(init: {
    obj: BpfObject;
    links: { fd: number; attachment: XdpAttachment }[];
    log: XdpLog;
    maxEntries: number;
    blockMax: number;
    current: Wanted;
  }) {
    this.#obj = init.obj;
    this.#maps = XdpFilter.#mapsOf(init.obj);
    this.#stats = init.obj.map(XDP_STATS_MAP);
    this.#statsBuf = new Uint8Array(this.#stats.valueBufferSize);
    this.#links = init.links;
    this.#log = init.log;
    this.#maxEntries = init.maxEntries;
    this.#blockMaps = {
      v4: init.obj.map(XDP_BLOCK_MAPS.v4),
      v6: init.obj.map(XDP_BLOCK_MAPS.v6),
    };
    this.#blockMax = init.blockMax;
    this.#current = init.current;
  }

  static #mapsOf(obj: BpfObject): Record<MapName, BpfMap> {
    return Object.fromEntries(XDP_MAPS.map((name) => [name, obj.map(name)])) as Record<
      MapName,
      BpfMap
    >;
  }

  /**
   * Load the filter, fill its maps and attach it to every interface.
   * @throws {XdpError} naming the cause and the fix; nothing stays attached then.
   */
  static async open(options: XdpFilterOptions): Promise<XdpFilter> {
    const log = options.log;
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

    // Resolve every interface before loading anything: a typo fails fast and cleanly.
    const ifaces = options.interfaces.map((name) => {
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

    const obj = await openBpfObject(XdpError, "xdp.bpf.o", "sni_xdp", "XDP", options.object, log);

    const links: { fd: number; attachment: XdpAttachment }[] = [];
    try {
      try {
        for (const name of TRIES) obj.map(name).setMaxEntries(maxEntries);
        for (const name of Object.values(XDP_BLOCK_MAPS)) obj.map(name).setMaxEntries(blockMax);
        withLibbpfLog(log, () => obj.load());
      } catch (e) {
        throw loadError(XdpError, e, xdpLoadHints(maxEntries));
      }
      const maps = XdpFilter.#mapsOf(obj);
      // Maps first, then attach: the program never runs with empty lists.
      for (const name of [...TRIES, "ports"] as const) {
        for (const { key, text } of want[name].values()) {
          addEntry(maps[name], name, key, text, "check the entry and the map capacity");
        }
      }
      writeConfig(maps.xdp_config, want.allowActive);

      const progFd = obj.program(XDP_PROGRAM).fd;
      for (const { name, ifindex } of ifaces) {
        links.push(attach(progFd, name, ifindex, options.mode, log));
      }
    } catch (e) {
      for (const l of links) detachLink(l.fd, l.attachment.interface, log);
      obj.close();
      throw e;
    }
    const filter = new XdpFilter({ obj, links, log, maxEntries, blockMax, current: want });
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
    const names = [...TRIES, "ports"] as const;
    const added: [typeof names[number], Uint8Array][] = [];
    try {
      for (const name of names) {
        for (const [k, { key, text }] of next[name]) {
          if (prev[name].has(k)) continue;
          addEntry(
            this.#maps[name],
            name,
            key,
            text,
            "the previous XDP lists stay in force; check the map capacity",
          );
          added.push([name, key]);
        }
      }
    } catch (e) {
      for (const [name, key] of added) {
        try {
          this.#maps[name].delete(key);
        } catch { /* nothing better to do: the entry was ours and new */ }
      }
      throw e;
    }
    if (next.allowActive !== prev.allowActive) writeConfig(this.#maps.xdp_config, next.allowActive);
    let removed = 0;
    for (const name of names) {
      for (const [k, { key }] of prev[name]) {
        if (next[name].has(k)) continue;
        this.#maps[name].delete(key);
        removed++;
      }
    }
    this.#current = next;
    this.#log(
      "info",
      `XDP source filter updated in place: ${added.length} entries added, ${removed} removed (${
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
    return this.#blockMax;
  }

  /**
   * Drop TCP to the listening ports from `source` (an IP address) for `ms` from now: a new
   * entry, or a later expiry for one already there (its hit count kept). "full" when the set
   * holds {@link blockCapacity} other sources (nothing changes then).
   * @throws {XdpError} for a source that is not an IP address, or when the kernel refuses.
   */
  block(source: string, ms: number): XdpBlockResult {
    if (this.#closed) throw new XdpError("closed", "the XDP filter is closed", "open a new one");
    let cidr: Cidr;
    try {
      cidr = parseCidr(source);
    } catch (e) {
      throw new XdpError("bad_option", (e as Error).message, "block an IP address");
    }
    if (cidr.prefix !== (cidr.v6 ? 128 : 32)) {
      throw new XdpError("bad_option", `${source} is not one address`, "block an IP address");
    }
    const known = this.#blocked.get(source);
    if (!known && this.#blocked.size >= this.#blockMax) return "full";
    const key = known?.key ?? lpmKey(cidr).slice(4);
    const expiresNs = monotonicNs() + BigInt(Math.round(ms)) * 1_000_000n;
    const map = this.#blockMaps[cidr.v6 ? "v6" : "v4"];
    const value = encodeXdpBlock(expiresNs);
    if (known && map.lookup(key, this.#blockBuf)) {
      value.set(this.#blockBuf.subarray(XDP_BLOCK.hits), XDP_BLOCK.hits);
    }
    try {
      map.update(key, value);
    } catch (e) {
      throw new XdpError(
        "update_failed",
        `cannot add ${source} to the XDP block set: ${(e as Error).message}`,
        "check the block set's capacity (ebpf.xdp.block.max_entries)",
        { cause: e },
      );
    }
    this.#blocked.set(source, { v6: cidr.v6, key, expiresNs });
    return known ? "extended" : "blocked";
  }

  /** Lift the block of `source` now; false when it was not blocked. */
  unblock(source: string): boolean {
    const entry = this.#blocked.get(source);
    if (!entry) return false;
    this.#blocked.delete(source);
    if (!this.#closed) this.#blockMaps[entry.v6 ? "v6" : "v4"].delete(entry.key);
    return true;
  }

  /** Delete the expired entries (the program already lets them through); returns their sources. */
  sweepBlocked(): string[] {
    const now = monotonicNs();
    const gone: string[] = [];
    for (const [source, e] of this.#blocked) {
      if (e.expiresNs > now) continue;
      this.unblock(source);
      gone.push(source);
    }
    return gone;
  }

  /** The block set now, with each entry's time left and hits. */
  blocked(): XdpBlock[] {
    const now = monotonicNs();
    const out: XdpBlock[] = [];
    for (const [source, e] of this.#blocked) {
      const ok = !this.#closed &&
        this.#blockMaps[e.v6 ? "v6" : "v4"].lookup(e.key, this.#blockBuf);
      out.push({
        source,
        expiresInMs: e.expiresNs > now ? Number((e.expiresNs - now) / 1_000_000n) : 0,
        hits: ok ? decodeXdpBlock(this.#blockBuf).hits : 0,
      });
    }
    return out;
  }

  /** Detach from every interface and free the program and maps. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    for (const l of this.#links) detachLink(l.fd, l.attachment.interface, this.#log);
    this.#obj.close();
    this.#log(
      "info",
      `XDP source filter detached from ${
        this.#links.map((l) => l.attachment.interface).join(", ")
      }`,
    );
  }
}

/** Add one CIDR (or port) to its map; `update_failed` with `fix` when the kernel refuses. */
function addEntry(map: BpfMap, name: MapName, key: Uint8Array, text: string, fix: string): void {
  try {
    map.update(key, name === "ports" ? PORT_VALUE : TRIE_VALUE);
  } catch (e) {
    throw new XdpError(
      "update_failed",
      `cannot add ${text} to the XDP map ${name}: ${(e as Error).message}`,
      fix,
      { cause: e },
    );
  }
}

function writeConfig(map: BpfMap, allowActive: boolean): void {
  map.update(KEY_ZERO, encodeXdpConfig(allowActive));
}

function detachLink(fd: number, ifname: string, log: XdpLog): void {
  try {
    linkDetachFd(fd, `XDP link on ${ifname}`);
  } catch (e) {
    // ENOLINK/EINVAL when the interface went away (the link was detached with it)
    log("debug", `XDP detach from ${ifname}: ${(e as Error).message}`);
  }
  closeFd(fd);
}

function attach(
  progFd: number,
  ifname: string,
  ifindex: number,
  mode: XdpMode,
  log: XdpLog,
): { fd: number; attachment: XdpAttachment } {
  const tryMode = (m: "native" | "generic"): number => {
    const flags = m === "native" ? XdpFlags.DRV_MODE : XdpFlags.SKB_MODE;
    return linkCreate(progFd, ifindex, BpfAttachType.XDP, flags, `XDP ${m} on ${ifname}`);
  };
  const done = (fd: number, m: "native" | "generic") => {
    let programId = 0;
    try {
      const q = xdpQuery(ifindex);
      programId = m === "native" ? q.drvProgId : q.skbProgId;
    } catch { /* informational only */ }
    return { fd, attachment: { interface: ifname, ifindex, mode: m, programId } };
  };
  const fail = (e: unknown, m: "native" | "generic"): never => {
    const err = e as BpfError;
    const code = e instanceof BpfError ? err.errno : 0;
    if (code === Errno.EBUSY || code === Errno.EEXIST) {
      const o = describeOccupant(ifname, ifindex);
      throw new XdpError(
        "interface_busy",
        `cannot attach the XDP filter to ${ifname} (${m} mode): ${err.errnoName}, ${o.what} is already attached`,
        o.fix,
        { cause: e, interface: ifname },
      );
    }
    if (
      m === "native" &&
      (code === Errno.EOPNOTSUPP || code === Errno.ENOTSUPP || code === Errno.EINVAL)
    ) {
      throw new XdpError(
        "native_unsupported",
        `the driver of ${ifname} does not support native XDP (${err.errnoName})`,
        'set ebpf.xdp.mode to "generic" (or "auto", which falls back to it)',
        { cause: e, interface: ifname },
      );
    }
    throw new XdpError(
      code === Errno.EPERM ? "not_permitted" : "attach_failed",
      `cannot attach the XDP filter to ${ifname} (${m} mode): ${err.message}`,
      code === Errno.EPERM
        ? "run as root (CAP_BPF + CAP_NET_ADMIN); check kernel lockdown"
        : "check the interface is up and supports XDP (`ip -d link show dev " + ifname + "`)",
      { cause: e, interface: ifname },
    );
  };

  if (mode === "generic") {
    try {
      return done(tryMode("generic"), "generic");
    } catch (e) {
      return fail(e, "generic");
    }
  }
  try {
    return done(tryMode("native"), "native");
  } catch (e) {
    const code = e instanceof BpfError ? e.errno : 0;
    const unsupported = code === Errno.EOPNOTSUPP || code === Errno.ENOTSUPP ||
      code === Errno.EINVAL;
    if (mode === "native" || !unsupported) return fail(e, "native");
    log(
      "warning",
      `native XDP is not supported on ${ifname} (${(e as BpfError).errnoName}); ` +
        `using generic XDP there (slower: runs after skb allocation)`,
    );
  }
  try {
    return done(tryMode("generic"), "generic");
  } catch (e) {
    return fail(e, "generic");
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
