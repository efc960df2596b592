/**
 * The lists of the XDP source filter as map contents: the deny/allow tries per family, the
 * listening ports and the allow-list switch; what they must hold for a config, filling them at
 * load, and replacing them in place so that there is no moment without filtering.
 * @module
 */

import type { BpfMap, BpfObject } from "../../ffi/libbpf.ts";
import type { Cidr } from "../route/acl.ts";
import {
  encodeXdpConfig,
  KEY_ZERO,
  lpmKey,
  PORT_VALUE,
  portKey,
  TRIE_VALUE,
  XDP_MAPS,
  XDP_PORTS_MAX,
  XDP_TRIES,
} from "./layout.ts";
import { XdpError } from "./loader.ts";

type TrieName = typeof XDP_TRIES[number];
/** The maps that hold the lists. */
export type ListMapName = typeof XDP_MAPS[number];
/** The list maps of a loaded object, by name. */
export type ListMaps = Record<ListMapName, BpfMap>;

/** The entries of the tries and the port set, in the order they are written. */
const ENTRY_MAPS = [...XDP_TRIES, "ports"] as const;

/** One map's wanted content: key hex -> key bytes (plus the CIDR text for messages). */
type Entries = Map<string, { key: Uint8Array; text: string }>;

/** What the list maps must hold for one config. */
export interface Wanted {
  deny_v4: Entries;
  deny_v6: Entries;
  allow_v4: Entries;
  allow_v6: Entries;
  ports: Entries;
  allowActive: boolean;
}

const TRIE_LABEL: Record<TrieName, string> = {
  deny_v4: "IPv4 deny",
  deny_v6: "IPv6 deny",
  allow_v4: "IPv4 allow",
  allow_v6: "IPv6 allow",
};

function hex(bytes: Uint8Array): string {
  let s = "";
  for (const b of bytes) s += b.toString(16).padStart(2, "0");
  return s;
}

/** The list maps of `obj`, by name. */
export function listMaps(obj: BpfObject): ListMaps {
  return Object.fromEntries(XDP_MAPS.map((name) => [name, obj.map(name)])) as ListMaps;
}

/**
 * The map contents for `deny`, `allow` and the listening `ports`.
 * @throws {XdpError} `bad_option` for a port out of range.
 */
export function wanted(deny: Cidr[], allow: Cidr[], ports: number[]): Wanted {
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

/**
 * Refuse lists that do not fit. During an update a trie holds the old and the new entries
 * together for a moment (add first, then delete), so `prev` entries not in `w` count too.
 */
export function checkCapacity(w: Wanted, maxEntries: number, prev?: Wanted): void {
  for (const name of XDP_TRIES) {
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

/** Writes `want` into the empty maps of a freshly loaded object (before it is attached). */
export function fillLists(maps: ListMaps, want: Wanted): void {
  for (const name of ENTRY_MAPS) {
    for (const { key, text } of want[name].values()) {
      addEntry(maps[name], name, key, text, "check the entry and the map capacity");
    }
  }
  writeConfig(maps.xdp_config, want.allowActive);
}

/**
 * Turns the maps' `prev` content into `next` while attached: new entries first, then the
 * allow-list switch, then the removed entries, so a source denied before and after is never let
 * through. Returns how many entries were added and removed.
 * @throws {XdpError} when an entry cannot be added: those added are taken out again and `prev`
 * stays in force, unchanged.
 */
export function applyLists(
  maps: ListMaps,
  prev: Wanted,
  next: Wanted,
): { added: number; removed: number } {
  const added: [typeof ENTRY_MAPS[number], Uint8Array][] = [];
  try {
    for (const name of ENTRY_MAPS) {
      for (const [k, { key, text }] of next[name]) {
        if (prev[name].has(k)) continue;
        addEntry(
          maps[name],
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
        maps[name].delete(key);
      } catch { /* nothing better to do: the entry was ours and new */ }
    }
    throw e;
  }
  if (next.allowActive !== prev.allowActive) writeConfig(maps.xdp_config, next.allowActive);
  let removed = 0;
  for (const name of ENTRY_MAPS) {
    for (const [k, { key }] of prev[name]) {
      if (next[name].has(k)) continue;
      maps[name].delete(key);
      removed++;
    }
  }
  return { added: added.length, removed };
}

/** Add one CIDR (or port) to its map; `update_failed` with `fix` when the kernel refuses. */
function addEntry(
  map: BpfMap,
  name: ListMapName,
  key: Uint8Array,
  text: string,
  fix: string,
): void {
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
