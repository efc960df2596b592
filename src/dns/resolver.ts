/**
 * Name resolution for hostname and dynamic (`$sni`) backends: IP literals pass through, names in
 * the hosts file (/etc/hosts, re-read when it changes) come from there, everything else from the
 * {@link DnsCache}, which asks DNS servers (the configured ones, else /etc/resolv.conf's) for A
 * and AAAA records in parallel through the stub client of src/dns/client.ts.
 *
 * A resolver is an instance: the proxy opens one from its config, hands it to its sessions,
 * replaces it on a reload that changes the DNS settings and closes it when it stops.
 * @module
 */

import {
  DnsCache,
  type DnsCacheOptions,
  type DnsLog,
  type DnsLookup,
  normalizeDnsName,
} from "./dnscache.ts";
import { type NameServer, serversLookup } from "./client.ts";
import { openPinnedStore } from "./pinned.ts";
import { HostsFile, systemServers } from "./sysconf.ts";
import { isIpAddress } from "../net/ip.ts";

export type { NameServer };

/** Options of {@link Resolver.open}: the cache's, plus where and how to ask. */
export interface ResolverOptions extends DnsCacheOptions {
  /** Servers to ask, in order; default: the `nameserver` lines of /etc/resolv.conf. */
  servers?: NameServer[];
  /** Wait for one query's answer this long before trying the next server; default 2000. */
  timeoutMs?: number;
  /** Rounds over the server list; default 2. */
  attempts?: number;
  /** Hosts file consulted before DNS; default /etc/hosts; null: none. */
  hostsFile?: string | null;
}

/** Where the pinned cache lives (its own dir: the sockmap loader removes /sys/fs/bpf/sni-proxy). */
export const DEFAULT_DNS_PIN_PATH = "/sys/fs/bpf/sni-proxy-dns/cache";

/** What resolves a backend host for a session (a {@link Resolver}, or one standing for it). */
export interface HostResolver {
  /**
   * Addresses to try for `host`, in order (IPv4 first, then IPv6).
   * @throws {DnsError} naming the host and the cause.
   */
  resolve(host: string): Promise<string[]>;
}

/** Resolves backend hosts: IP literal, hosts file, then the DNS cache. */
export class Resolver implements HostResolver {
  /** The DNS cache (its `stats` and `kind` are for metrics and logs). */
  readonly cache: DnsCache;
  /** The servers asked, in order. */
  readonly servers: readonly NameServer[];
  readonly #hosts: HostsFile | null;
  /** Lookups under way: a closed resolver keeps its cache until they are done. */
  #inFlight = 0;
  #closing = false;

  private constructor(cache: DnsCache, servers: NameServer[], hosts: HostsFile | null) {
    this.cache = cache;
    this.servers = servers;
    this.#hosts = hosts;
  }

  /**
   * A resolver with its cache. When `options.pinned` is set but the pinned map cannot be used,
   * logs one warning with cause and fix and uses an in-process cache instead.
   * @throws {RangeError} on bad options.
   */
  static open(options: ResolverOptions, log: DnsLog = () => {}): Resolver {
    const servers = options.servers?.length ? options.servers : systemServers();
    for (const s of servers) {
      if (!isIpAddress(s.ipAddr) || !Number.isInteger(s.port) || s.port < 1 || s.port > 65535) {
        throw new RangeError(`bad DNS server ${s.ipAddr}:${s.port}`);
      }
    }
    const timeoutMs = options.timeoutMs ?? 2000;
    const attempts = options.attempts ?? 2;
    if (!(timeoutMs > 0) || !Number.isInteger(attempts) || attempts < 1) {
      throw new RangeError(`bad DNS timeoutMs ${timeoutMs} or attempts ${attempts}`);
    }
    const cache = openCache(options, serversLookup(servers, timeoutMs, attempts), log);
    const hostsFile = options.hostsFile === undefined ? "/etc/hosts" : options.hostsFile;
    return new Resolver(cache, servers, hostsFile === null ? null : new HostsFile(hostsFile, log));
  }

  /**
   * Addresses to try for `host`, in order (IPv4 first, then IPv6).
   * @throws {DnsError} naming the host and the cause.
   */
  async resolve(host: string): Promise<string[]> {
    if (isIpAddress(host)) return [host];
    const name = normalizeDnsName(host);
    this.#inFlight++;
    try {
      if (this.#hosts !== null) {
        const h = await this.#hosts.lookup(name);
        if (h) return [...h.v4, ...h.v6];
      }
      return await this.cache.resolve(name);
    } finally {
      if (--this.#inFlight === 0 && this.#closing) this.cache.close();
    }
  }

  /**
   * Releases the cache (a pinned map stays for the next process) once the lookups under way are
   * done: a reload replaces the resolver while sessions may still wait on this one, and their
   * answers must not be written through a closed (or reused) map descriptor.
   */
  close(): void {
    if (this.#closing) return;
    this.#closing = true;
    if (this.#inFlight === 0) this.cache.close();
  }
}

/** The cache of `options`; a pinned one that cannot be used gives way to an in-process one. */
function openCache(options: ResolverOptions, lookup: DnsLookup, log: DnsLog): DnsCache {
  try {
    return DnsCache.open(options, lookup, log);
  } catch (e) {
    if (e instanceof RangeError || !options.pinned) throw e;
    warnFallback(e, log);
    return DnsCache.open({ ...options, pinned: null }, lookup, log);
  }
}

function warnFallback(e: unknown, log: DnsLog): void {
  log("warning", `DNS cache: ${(e as Error).message}; using an in-process cache`);
}

/**
 * Whether the pinned cache at `path` can be used by this process (opened, or created when
 * missing, then closed again); when not, logs the warning {@link Resolver.open} would and
 * returns false. A supervisor asks once for all its workers, so that they fall back to
 * in-process caches without one warning each.
 * @throws {RangeError} on a bad `maxEntries`.
 */
export function pinnedCacheUsable(path: string, maxEntries: number, log: DnsLog): boolean {
  try {
    openPinnedStore(path, maxEntries, log).close();
    return true;
  } catch (e) {
    if (e instanceof RangeError) throw e;
    warnFallback(e, log);
    return false;
  }
}
