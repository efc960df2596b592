/**
 * The system's resolver files: the `nameserver` lines of /etc/resolv.conf (the servers asked
 * when the config names none) and the hosts file, consulted before DNS and re-read when it
 * changes.
 * @module
 */

import { isIpAddress } from "../net/ip.ts";
import type { NameServer } from "./client.ts";
import type { DnsLog } from "./dnscache.ts";

/** How often the hosts file's mtime is looked at, at most. */
const HOSTS_CHECK_INTERVAL_MS = 5_000;

/** Addresses of one name in a hosts file. */
export interface HostsEntry {
  v4: string[];
  v6: string[];
}

/** The `nameserver` lines of a resolv.conf text (port 53); scoped IPv6 ones are skipped. */
export function parseResolvConf(text: string): NameServer[] {
  const out: NameServer[] = [];
  for (const line of text.split("\n")) {
    const m = /^\s*nameserver\s+(\S+)/.exec(line);
    if (m && isIpAddress(m[1])) out.push({ ipAddr: m[1], port: 53 });
  }
  return out;
}

/** Addresses per name of a hosts-file text (names lower-case, without trailing dot). */
export function parseHosts(text: string): Map<string, HostsEntry> {
  const out = new Map<string, HostsEntry>();
  for (const raw of text.split("\n")) {
    const [ip, ...names] = raw.replace(/#.*/, "").trim().split(/\s+/);
    if (!ip || names.length === 0 || !isIpAddress(ip)) continue;
    for (const n of names) {
      const name = n.toLowerCase().replace(/\.$/, "");
      let e = out.get(name);
      if (!e) out.set(name, e = { v4: [], v6: [] });
      const list = ip.includes(":") ? e.v6 : e.v4;
      if (!list.includes(ip)) list.push(ip);
    }
  }
  return out;
}

/**
 * The servers of /etc/resolv.conf, or glibc's default (127.0.0.1:53) when it names none or
 * cannot be read.
 */
export function systemServers(): NameServer[] {
  let servers: NameServer[] = [];
  try {
    servers = parseResolvConf(Deno.readTextFileSync("/etc/resolv.conf"));
  } catch {
    // no resolv.conf: glibc's default below
  }
  return servers.length ? servers : [{ ipAddr: "127.0.0.1", port: 53 }];
}

/** A hosts file, re-read when its mtime changes (looked at every 5 s at most). */
export class HostsFile {
  readonly path: string;
  readonly #log: DnsLog;
  #hosts = new Map<string, HostsEntry>();
  #mtime = -1;
  #checkedAt = -Infinity;
  /** The check (and read) under way, or null. */
  #refreshing: Promise<void> | null = null;

  constructor(path: string, log: DnsLog) {
    this.path = path;
    this.#log = log;
  }

  /** The addresses of `name` (normalised) in the file as it is now, or undefined. */
  async lookup(name: string): Promise<HostsEntry | undefined> {
    if (this.#refreshing === null && Date.now() - this.#checkedAt >= HOSTS_CHECK_INTERVAL_MS) {
      this.#checkedAt = Date.now();
      this.#refreshing = this.#refresh().finally(() => (this.#refreshing = null));
    }
    // every lookup while the file is read waits for it: the first read's burst would otherwise
    // find nothing (and go to DNS) before the file was ever read
    if (this.#refreshing !== null) await this.#refreshing;
    return this.#hosts.get(name);
  }

  /** Re-reads the file if its mtime changed. */
  async #refresh(): Promise<void> {
    let mtime = 0;
    try {
      mtime = (await Deno.stat(this.path)).mtime?.getTime() ?? 0;
      if (mtime === this.#mtime) return;
      this.#hosts = parseHosts(await Deno.readTextFile(this.path));
    } catch (e) {
      if (this.#mtime !== 0) this.#log("warning", `cannot read ${this.path}: ${e}`);
      this.#hosts = new Map();
      mtime = 0;
    }
    this.#mtime = mtime;
  }
}
