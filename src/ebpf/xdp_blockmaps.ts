/**
 * The XDP filter's temporary block set (`blocked_v4` / `blocked_v6` of bpf/xdp.bpf.c): sources
 * whose TCP to the listening ports is dropped until an expiry. The policy that decides who is
 * blocked is src/ebpf/xdpblock.ts; this module only keeps the maps, and at a restart copies the
 * previous instance's entries in (adopt).
 * @module
 */

import { type BpfMap, BpfMapFd, type BpfObject, progMaps, withProgById } from "../../ffi/libbpf.ts";
import { monotonicNs } from "../../ffi/libc.ts";
import { formatIpv6 } from "../net/ip.ts";
import { type Cidr, parseCidr } from "../route/acl.ts";
import { decodeXdpBlock, encodeXdpBlock, lpmKey, XDP_BLOCK, XDP_BLOCK_MAPS } from "./layout.ts";
import { XdpError } from "./loader.ts";

/** A source in the temporary block set. */
export interface XdpBlock {
  source: string;
  /** Until the program lets it through again (0 once expired, until the next sweep). */
  expiresInMs: number;
  /** Packets dropped for this entry. */
  hits: number;
}

/** What {@link XdpBlockMaps.block} did. */
export type XdpBlockResult = "blocked" | "extended" | "full";

/** The block maps of a loaded XDP object, with the entries this process put there. */
export class XdpBlockMaps {
  readonly #maps: { v4: BpfMap; v6: BpfMap };
  /** How many sources the set holds at most. */
  readonly capacity: number;
  readonly #buf = new Uint8Array(XDP_BLOCK.size);
  /** The entries of blocked_v4/blocked_v6, by source text. */
  readonly #blocked = new Map<string, { v6: boolean; key: Uint8Array; expiresNs: bigint }>();
  /** The programs whose block sets were copied in already. */
  readonly #adopted = new Set<number>();
  #closed = false;

  constructor(obj: BpfObject, capacity: number) {
    this.#maps = { v4: obj.map(XDP_BLOCK_MAPS.v4), v6: obj.map(XDP_BLOCK_MAPS.v6) };
    this.capacity = capacity;
  }

  /**
   * Drop TCP to the listening ports from `source` (an IP address) for `ms` from now: a new
   * entry, or a later expiry for one already there (its hit count kept). "full" when the set
   * holds {@link capacity} other sources (nothing changes then).
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
    if (!known && this.#blocked.size >= this.capacity) return "full";
    const key = known?.key ?? lpmKey(cidr).slice(4);
    const expiresNs = monotonicNs() + BigInt(Math.round(ms)) * 1_000_000n;
    const map = this.#maps[cidr.v6 ? "v6" : "v4"];
    const value = encodeXdpBlock(expiresNs);
    if (known && map.lookup(key, this.#buf)) {
      value.set(this.#buf.subarray(XDP_BLOCK.hits), XDP_BLOCK.hits);
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
    if (!this.#closed) this.#maps[entry.v6 ? "v6" : "v4"].delete(entry.key);
    return true;
  }

  /** Delete the expired entries (the program already lets them through); returns their sources. */
  sweep(): string[] {
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
  list(): XdpBlock[] {
    const now = monotonicNs();
    const out: XdpBlock[] = [];
    for (const [source, e] of this.#blocked) {
      const ok = !this.#closed && this.#maps[e.v6 ? "v6" : "v4"].lookup(e.key, this.#buf);
      out.push({
        source,
        expiresInMs: e.expiresNs > now ? Number((e.expiresNs - now) / 1_000_000n) : 0,
        hits: ok ? decodeXdpBlock(this.#buf).hits : 0,
      });
    }
    return out;
  }

  /**
   * Copies the unexpired entries of the block set of program `progId` (another instance's
   * filter, about to be taken over) into this one, with their expiry and hits; once per
   * program. `full`: entries left out because this set reached its capacity. A program that is
   * gone, or has no such maps, gives nothing.
   */
  adopt(progId: number): { adopted: number; full: number } {
    const done = { adopted: 0, full: 0 };
    if (this.#closed || this.#adopted.has(progId)) return done;
    this.#adopted.add(progId);
    let mapIds: number[];
    try {
      mapIds = withProgById(progId, (fd) => progMaps(fd).mapIds);
    } catch {
      return done;
    }
    for (const id of mapIds) {
      let old: BpfMapFd;
      try {
        old = BpfMapFd.openById(id);
      } catch {
        continue;
      }
      try {
        const v6 = old.info.name === XDP_BLOCK_MAPS.v6;
        if (!v6 && old.info.name !== XDP_BLOCK_MAPS.v4) continue;
        if (old.info.keySize !== (v6 ? 16 : 4) || old.info.valueSize !== XDP_BLOCK.size) continue;
        this.#copyFrom(old, v6, done);
      } finally {
        old.close();
      }
    }
    return done;
  }

  #copyFrom(old: BpfMapFd, v6: boolean, done: { adopted: number; full: number }): void {
    const now = monotonicNs();
    const value = new Uint8Array(XDP_BLOCK.size);
    for (const key of old.keys()) {
      if (!old.lookup(key, value)) continue;
      const { expiresNs } = decodeXdpBlock(value);
      const source = v6 ? formatIpv6(key) : key.join(".");
      if (expiresNs <= now || this.#blocked.has(source)) continue;
      if (this.#blocked.size >= this.capacity) {
        done.full++;
        continue;
      }
      this.#maps[v6 ? "v6" : "v4"].update(key, value);
      this.#blocked.set(source, { v6, key, expiresNs });
      done.adopted++;
    }
  }

  /** The maps are about to be freed with their object: from now on nothing touches them. */
  close(): void {
    this.#closed = true;
  }
}
