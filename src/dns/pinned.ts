/**
 * The DNS cache's store in a BPF LRU_HASH map pinned on bpffs: it outlives the process, is shared
 * by every proxy on the host and reads well with `bpftool map dump pinned PATH` (the map carries
 * BTF for its key and value when the kernel takes it).
 * @module
 */

import {
  BpfError,
  BpfMapFd,
  BpfMapType,
  BtfBuilder,
  BtfIntEncoding,
  libbpf,
} from "../../ffi/libbpf.ts";
import { Errno } from "../../ffi/libc.ts";
import { formatIpv6, parseIpv4, parseIpv6 } from "../net/ip.ts";
import { type EbpfLog, KernelAccelError } from "../ebpf/loader.ts";
import { ensureBpffs } from "../ebpf/host.ts";
import { type CacheStore, type DnsCacheEntry, MAX_ADDRS_PER_FAMILY } from "./store.ts";

/**
 * The store of the map pinned at `path` (created and pinned when missing; bpffs mounted when no
 * mount covers it; the pin dir made, and refused when another user owns it).
 * @throws {KernelAccelError} naming the cause and the fix.
 */
export function openPinnedStore(path: string, maxEntries: number, log: EbpfLog): CacheStore {
  try {
    libbpf();
    const dir = path.slice(0, path.lastIndexOf("/")) || "/";
    // a host where nothing mounted bpffs yet (pipe mode mounts nothing): mount it, as root can
    ensureBpffs(dir, log, "set ebpf.dns_cache_enabled to false");
    Deno.mkdirSync(dir, { recursive: true });
    // /sys/fs/bpf is world-writable: do not share a dir another user prepared
    const owner = Deno.statSync(dir).uid;
    if (owner === 0 && Deno.uid() !== 0) {
      throw new KernelAccelError(
        "not_root",
        `the DNS cache pin dir ${dir} is root's and this process runs as uid ${Deno.uid()}`,
        "run as root, or set ebpf.dns_cache_enabled to false",
      );
    }
    if (owner !== null && owner !== Deno.uid()) {
      throw new KernelAccelError(
        "pin_dir_foreign",
        `the DNS cache pin dir ${dir} belongs to uid ${owner}, not to this process`,
        `remove ${dir} (another user may have created it) or set ebpf.dns_cache_enabled to false`,
      );
    }
    return PinnedStore.open(path, maxEntries, log);
  } catch (e) {
    throw pinnedError(path, e);
  }
}

// Pinned map layout. Key: struct sni_dns_key { char name[256]; } (lower-case, zero padded).
// Value: struct sni_dns_entry, little-endian, 8-aligned:
const KEY_SIZE = 256;
const V_EXPIRES = 0; // u64 expires_at_ms (CLOCK_REALTIME)
const V_RESOLVED = 8; // u64 resolved_at_ms
const V_FLAGS = 16; // u32: FLAG_*
const V_COUNT4 = 20; // u8
const V_COUNT6 = 21; // u8
const V_IPV4 = 24; // u8 ipv4[8][4]
const V_IPV6 = V_IPV4 + 4 * MAX_ADDRS_PER_FAMILY; // u8 ipv6[8][16]
const VALUE_SIZE = V_IPV6 + 16 * MAX_ADDRS_PER_FAMILY; // 184
const FLAG_NOT_FOUND = 1;
const FLAG_NO_DATA = 2;
const MAP_NAME = "sni_dns_cache";

/** The pinned map's key and value types, for a readable `bpftool map dump`. */
function buildBtf(btf: BtfBuilder): { keyTypeId: number; valueTypeId: number } {
  const char = btf.addInt("char", 1, BtfIntEncoding.CHAR);
  const u8 = btf.addInt("__u8", 1);
  const u32 = btf.addInt("__u32", 4);
  const u64 = btf.addInt("__u64", 8);
  const nameArr = btf.addArray(u32, char, KEY_SIZE);
  const ip4 = btf.addArray(u32, u8, 4);
  const ip4s = btf.addArray(u32, ip4, MAX_ADDRS_PER_FAMILY);
  const ip6 = btf.addArray(u32, u8, 16);
  const ip6s = btf.addArray(u32, ip6, MAX_ADDRS_PER_FAMILY);
  const keyTypeId = btf.addStruct("sni_dns_key", KEY_SIZE);
  btf.addField("name", nameArr, 0);
  const valueTypeId = btf.addStruct("sni_dns_entry", VALUE_SIZE);
  btf.addField("expires_at_ms", u64, V_EXPIRES);
  btf.addField("resolved_at_ms", u64, V_RESOLVED);
  btf.addField("flags", u32, V_FLAGS);
  btf.addField("count_v4", u8, V_COUNT4);
  btf.addField("count_v6", u8, V_COUNT6);
  btf.addField("ipv4", ip4s, V_IPV4);
  btf.addField("ipv6", ip6s, V_IPV6);
  return { keyTypeId, valueTypeId };
}

/** Entries in a BPF LRU_HASH map pinned on bpffs, shared by every process that opens the pin. */
class PinnedStore implements CacheStore {
  readonly kind = "pinned";
  readonly #map: BpfMapFd;
  // reused buffers: one lookup/update at a time (single-threaded)
  readonly #key = new Uint8Array(KEY_SIZE);
  readonly #value = new Uint8Array(VALUE_SIZE);
  readonly #view = new DataView(this.#value.buffer);
  readonly #encoder = new TextEncoder();

  private constructor(map: BpfMapFd) {
    this.#map = map;
  }

  /**
   * Opens the map pinned at `path`, or creates and pins it. A pin of another layout or size is
   * replaced (logged): processes still holding the old map keep it until they restart.
   */
  static open(path: string, maxEntries: number, log: EbpfLog): PinnedStore {
    for (let attempt = 0;; attempt++) {
      let existing: BpfMapFd | null = null;
      try {
        existing = BpfMapFd.openPinned(path);
      } catch (e) {
        if (!(e instanceof BpfError && e.errno === Errno.ENOENT)) throw e; // create below
      }
      if (existing) {
        const i = existing.info;
        if (
          i.type === BpfMapType.LRU_HASH && i.keySize === KEY_SIZE && i.valueSize === VALUE_SIZE &&
          i.maxEntries === maxEntries
        ) {
          log("info", `DNS cache: using the pinned map ${path} (id ${i.id})`);
          return new PinnedStore(existing);
        }
        existing.close();
        log(
          "warning",
          `DNS cache: replacing the pinned map ${path} (type ${i.type}, key ${i.keySize} B, ` +
            `value ${i.valueSize} B, ${i.maxEntries} entries; want type ${BpfMapType.LRU_HASH}, ` +
            `key ${KEY_SIZE} B, value ${VALUE_SIZE} B, ${maxEntries} entries); running proxies ` +
            `keep the old one until restarted`,
        );
        Deno.removeSync(path);
      }
      const map = createMap(maxEntries, log);
      try {
        map.pin(path);
      } catch (e) {
        map.close();
        // another process pinned its map in between: use that one
        if (e instanceof BpfError && e.errno === Errno.EEXIST && attempt < 2) continue;
        throw e;
      }
      log(
        "info",
        `DNS cache: created and pinned ${path} (id ${map.info.id}, ${maxEntries} entries)`,
      );
      return new PinnedStore(map);
    }
  }

  #setKey(name: string): void {
    this.#key.fill(0);
    this.#encoder.encodeInto(name, this.#key);
  }

  get(name: string): DnsCacheEntry | null {
    this.#setKey(name);
    if (!this.#map.lookup(this.#key, this.#value)) return null;
    const v = this.#view;
    const flags = v.getUint32(V_FLAGS, true);
    const n4 = Math.min(this.#value[V_COUNT4], MAX_ADDRS_PER_FAMILY);
    const n6 = Math.min(this.#value[V_COUNT6], MAX_ADDRS_PER_FAMILY);
    const v4: string[] = [];
    for (let i = 0; i < n4; i++) {
      v4.push(this.#value.subarray(V_IPV4 + 4 * i, V_IPV4 + 4 * i + 4).join("."));
    }
    const v6: string[] = [];
    for (let i = 0; i < n6; i++) {
      v6.push(formatIpv6(this.#value.subarray(V_IPV6 + 16 * i, V_IPV6 + 16 * i + 16)));
    }
    return {
      expiresAtMs: Number(v.getBigUint64(V_EXPIRES, true)),
      resolvedAtMs: Number(v.getBigUint64(V_RESOLVED, true)),
      negative: flags & FLAG_NOT_FOUND ? "not_found" : flags & FLAG_NO_DATA ? "no_data" : null,
      v4,
      v6,
    };
  }

  set(name: string, entry: DnsCacheEntry): void {
    this.#setKey(name);
    const value = this.#value;
    value.fill(0);
    const v = this.#view;
    v.setBigUint64(V_EXPIRES, BigInt(Math.floor(entry.expiresAtMs)), true);
    v.setBigUint64(V_RESOLVED, BigInt(Math.floor(entry.resolvedAtMs)), true);
    v.setUint32(
      V_FLAGS,
      entry.negative === "not_found"
        ? FLAG_NOT_FOUND
        : entry.negative === "no_data"
        ? FLAG_NO_DATA
        : 0,
      true,
    );
    let n4 = 0;
    for (const ip of entry.v4) {
      if (n4 === MAX_ADDRS_PER_FAMILY) break;
      const bytes = parseIpv4(ip);
      if (bytes) value.set(bytes, V_IPV4 + 4 * n4++);
    }
    let n6 = 0;
    for (const ip of entry.v6) {
      if (n6 === MAX_ADDRS_PER_FAMILY) break;
      const bytes = parseIpv6(ip);
      if (bytes) value.set(bytes, V_IPV6 + 16 * n6++);
    }
    value[V_COUNT4] = n4;
    value[V_COUNT6] = n6;
    this.#map.update(this.#key, value);
  }

  close(): void {
    this.#map.close();
  }
}

function createMap(maxEntries: number, log: EbpfLog): BpfMapFd {
  const base = {
    type: BpfMapType.LRU_HASH,
    name: MAP_NAME,
    keySize: KEY_SIZE,
    valueSize: VALUE_SIZE,
    maxEntries,
  };
  // With BTF, bpftool prints names and fields; without (no kernel BTF support), hex bytes.
  try {
    using btf = new BtfBuilder();
    const ids = buildBtf(btf);
    const fd = btf.load();
    return BpfMapFd.create({ ...base, btf: { fd, ...ids } });
  } catch (e) {
    log("debug", `DNS cache: map without BTF (${(e as Error).message})`);
  }
  return BpfMapFd.create(base);
}

/** Wraps a pinned-map failure in the loader's error convention (cause + fix). */
function pinnedError(path: string, e: unknown): KernelAccelError {
  if (e instanceof KernelAccelError) return e;
  const msg = (e as Error).message;
  if (e instanceof BpfError && e.op.startsWith("dlopen")) {
    return new KernelAccelError(
      "no_libbpf",
      msg,
      "install libbpf 1.x (Debian: apt-get install -y libbpf1)",
      { cause: e },
    );
  }
  if (e instanceof BpfError && (e.errno === Errno.EPERM || e.errno === Errno.EACCES)) {
    return new KernelAccelError(
      "not_root",
      `not permitted to create or open the pinned DNS cache ${path}: ${msg}`,
      "run as root (or with CAP_BPF), or set ebpf.dns_cache_enabled to false",
      { cause: e },
    );
  }
  return new KernelAccelError(
    "dns_cache_failed",
    `cannot open the pinned DNS cache ${path}: ${msg}`,
    "check that a bpffs is mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf), " +
      "or set ebpf.dns_cache_enabled to false",
    { cause: e },
  );
}
