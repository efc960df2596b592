/**
 * Name resolution for hostname and dynamic (`$sni`) backends: IP literals pass through, names in
 * the hosts file (/etc/hosts, re-read when it changes) come from there, everything else from the
 * {@link DnsCache}, which asks DNS servers (the configured ones, else /etc/resolv.conf's) for A
 * and AAAA records in parallel.
 *
 * The DNS queries are a small stub client over UDP (TCP when the answer is truncated) rather than
 * Deno.resolveDns, because Deno.resolveDns (Deno 2.9) returns addresses without their TTL, and
 * the cache must honour TTLs. It sends one question with RD set and an EDNS0 OPT record, uses a
 * fresh socket (random source port) and a random id per query, accepts only a reply from the
 * server asked with the same id and question, follows CNAME chains inside the answer, and tries
 * the servers in order (`attempts` rounds) on timeout, SERVFAIL or REFUSED.
 * Needs `--unstable-net` (Deno.listenDatagram).
 * @module
 */

import {
  DnsCache,
  type DnsCacheOptions,
  DnsError,
  type DnsLog,
  type DnsLookupResult,
  normalizeDnsName,
} from "./dnscache.ts";
import { formatIpv6, isIpAddress } from "../net/ip.ts";
import { writeAll } from "../net/bytes.ts";

/** A DNS server to ask. */
export interface NameServer {
  ipAddr: string;
  port: number;
}

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

/** Defaults used until {@link configureResolver} is called (and for omitted config keys). */
export const DEFAULT_RESOLVER_OPTIONS: Readonly<ResolverOptions> = {
  minTtlMs: 5_000,
  maxTtlMs: 3_600_000,
  negativeTtlMs: 10_000,
  maxEntries: 4096,
  pinned: null,
};

/** Where the pinned cache lives (its own dir: the sockmap loader removes /sys/fs/bpf/sni-proxy). */
export const DEFAULT_DNS_PIN_PATH = "/sys/fs/bpf/sni-proxy-dns/cache";

const TYPE_A = 1;
const TYPE_CNAME = 5;
const TYPE_AAAA = 28;
const TYPE_OPT = 41;
const RCODE_NAMES: Record<number, string> = {
  1: "FORMERR",
  2: "SERVFAIL",
  3: "NXDOMAIN",
  4: "NOTIMP",
  5: "REFUSED",
};
const EDNS_UDP_SIZE = 1232;
const HOSTS_CHECK_INTERVAL_MS = 5_000;

/** One server's answer to one question. */
export interface DnsAnswer {
  /** 0 NOERROR, 3 NXDOMAIN (others are turned into errors before they get here). */
  rcode: number;
  /** Addresses of the asked type (after following CNAMEs), in answer order. */
  addresses: string[];
  /** Smallest TTL of the records used, ms (0 when there is no address). */
  ttlMs: number;
}

/** Builds the query message: one question, RD, EDNS0 OPT advertising 1232 bytes. */
function buildQuery(id: number, name: string, qtype: number): Uint8Array<ArrayBuffer> {
  const labels = name.split(".");
  const out = new Uint8Array(12 + name.length + 2 + 4 + 11);
  const v = new DataView(out.buffer);
  v.setUint16(0, id);
  v.setUint16(2, 0x0100); // RD
  v.setUint16(4, 1); // QDCOUNT
  v.setUint16(10, 1); // ARCOUNT (OPT)
  let off = 12;
  for (const label of labels) {
    out[off++] = label.length;
    for (let i = 0; i < label.length; i++) out[off++] = label.charCodeAt(i);
  }
  out[off++] = 0;
  v.setUint16(off, qtype);
  v.setUint16(off + 2, 1); // IN
  off += 4;
  out[off++] = 0; // OPT owner: root
  v.setUint16(off, TYPE_OPT);
  v.setUint16(off + 2, EDNS_UDP_SIZE);
  // TTL (extended rcode, version, flags) and RDLEN stay 0
  return out;
}

class MalformedAnswer extends Error {}

/** Reads a possibly compressed name at `off`; returns it (lower-case) and the offset after it. */
function readName(msg: Uint8Array, off: number): [string, number] {
  let name = "";
  let end = -1;
  for (let jumps = 0;;) {
    if (off >= msg.length) throw new MalformedAnswer("name runs past the message");
    const len = msg[off];
    if (len === 0) {
      off++;
      break;
    }
    if ((len & 0xc0) === 0xc0) {
      if (off + 1 >= msg.length || ++jumps > 32) throw new MalformedAnswer("bad name pointer");
      if (end < 0) end = off + 2;
      off = ((len & 0x3f) << 8) | msg[off + 1];
      continue;
    }
    if (len > 63 || off + 1 + len > msg.length) throw new MalformedAnswer("bad label");
    for (let i = 0; i < len; i++) name += String.fromCharCode(msg[off + 1 + i]);
    name += ".";
    off += 1 + len;
    if (name.length > 255) throw new MalformedAnswer("name too long");
  }
  return [name.slice(0, -1).toLowerCase(), end < 0 ? off : end];
}

/**
 * Parses a reply to (id, name, qtype); null when it is not one (other id or question).
 * @throws {MalformedAnswer} when it is one but cannot be parsed.
 */
function parseAnswer(
  msg: Uint8Array,
  id: number,
  name: string,
  qtype: number,
): (DnsAnswer & { truncated: boolean }) | null {
  if (msg.length < 12) return null;
  const v = new DataView(msg.buffer, msg.byteOffset, msg.byteLength);
  const flags = v.getUint16(2);
  if (v.getUint16(0) !== id || !(flags & 0x8000) || v.getUint16(4) !== 1) return null;
  const [qname, qend] = readName(msg, 12);
  if (qend + 4 > msg.length) throw new MalformedAnswer("question runs past the message");
  if (qname !== name || v.getUint16(qend) !== qtype) return null;
  const truncated = (flags & 0x0200) !== 0;
  const rcode = flags & 0x000f;
  const records: { owner: string; type: number; ttl: number; at: number; len: number }[] = [];
  let off = qend + 4;
  const ancount = v.getUint16(6);
  for (let i = 0; i < ancount && !truncated; i++) {
    const [owner, end] = readName(msg, off);
    if (end + 10 > msg.length) throw new MalformedAnswer("record runs past the message");
    const len = v.getUint16(end + 8);
    if (end + 10 + len > msg.length) throw new MalformedAnswer("rdata runs past the message");
    // RFC 2181 8: a TTL with the top bit set is 0
    const ttl = v.getUint32(end + 4) & 0x80000000 ? 0 : v.getUint32(end + 4);
    records.push({ owner, type: v.getUint16(end), ttl, at: end + 10, len });
    off = end + 10 + len;
  }
  // the names that lead to the asked one through CNAMEs in this answer
  const chain = new Set([name]);
  let ttl = Infinity;
  for (let grew = true; grew;) {
    grew = false;
    for (const r of records) {
      if (r.type !== TYPE_CNAME || !chain.has(r.owner)) continue;
      const [target] = readName(msg, r.at);
      if (!chain.has(target)) {
        chain.add(target);
        ttl = Math.min(ttl, r.ttl);
        grew = true;
      }
    }
  }
  const addresses: string[] = [];
  let addrTtl = Infinity;
  for (const r of records) {
    if (r.type !== qtype || !chain.has(r.owner)) continue;
    if (qtype === TYPE_A && r.len === 4) {
      addresses.push(msg.subarray(r.at, r.at + 4).join("."));
    } else if (qtype === TYPE_AAAA && r.len === 16) {
      addresses.push(formatIpv6(msg.subarray(r.at, r.at + 16)));
    } else {
      throw new MalformedAnswer(`record of type ${qtype} with ${r.len} bytes of data`);
    }
    addrTtl = Math.min(addrTtl, r.ttl);
  }
  return {
    rcode,
    truncated,
    addresses,
    ttlMs: addresses.length ? Math.min(ttl, addrTtl) * 1000 : 0,
  };
}

type Exchange = { answer: (DnsAnswer & { truncated: boolean }) | null; timedOut: boolean };

async function udpExchange(
  query: Uint8Array<ArrayBuffer>,
  server: NameServer,
  timeoutMs: number,
  accept: (msg: Uint8Array) => (DnsAnswer & { truncated: boolean }) | null,
): Promise<Exchange> {
  const sock = Deno.listenDatagram({
    transport: "udp",
    hostname: server.ipAddr.includes(":") ? "::" : "0.0.0.0",
    port: 0,
  });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    sock.close();
  }, timeoutMs);
  try {
    await sock.send(query, { transport: "udp", hostname: server.ipAddr, port: server.port });
    const buf = new Uint8Array(4096);
    for (;;) {
      const [msg, from] = await sock.receive(buf);
      const addr = from as Deno.NetAddr;
      if (addr.port !== server.port || addr.hostname !== server.ipAddr) continue;
      const answer = accept(msg);
      if (answer) return { answer, timedOut: false };
    }
  } catch (e) {
    if (timedOut) return { answer: null, timedOut: true };
    throw e;
  } finally {
    clearTimeout(timer);
    if (!timedOut) sock.close();
  }
}

async function tcpExchange(
  query: Uint8Array<ArrayBuffer>,
  server: NameServer,
  timeoutMs: number,
  accept: (msg: Uint8Array) => (DnsAnswer & { truncated: boolean }) | null,
): Promise<Exchange> {
  const signal = AbortSignal.timeout(timeoutMs);
  let conn: Deno.TcpConn;
  try {
    conn = await Deno.connect({ hostname: server.ipAddr, port: server.port, signal });
  } catch (e) {
    if (signal.aborted) return { answer: null, timedOut: true };
    throw e;
  }
  const onAbort = () => conn.close();
  signal.addEventListener("abort", onAbort);
  try {
    const framed = new Uint8Array(2 + query.length);
    new DataView(framed.buffer).setUint16(0, query.length);
    framed.set(query, 2);
    await writeAll(conn, framed);
    let buf = new Uint8Array(2);
    let have = 0;
    let want = 2;
    for (;;) {
      const n = await conn.read(buf.subarray(have));
      if (n === null) throw new Error("connection closed before the whole answer");
      have += n;
      if (have < want) continue;
      if (want === 2) {
        want = 2 + ((buf[0] << 8) | buf[1]);
        const grown = new Uint8Array(want);
        grown.set(buf.subarray(0, have));
        buf = grown;
        if (have < want) continue;
      }
      return { answer: accept(buf.subarray(2, want)), timedOut: false };
    }
  } catch (e) {
    if (signal.aborted) return { answer: null, timedOut: true };
    throw e;
  } finally {
    signal.removeEventListener("abort", onAbort);
    if (!signal.aborted) conn.close();
  }
}

/**
 * Asks one server one question (UDP, then TCP if truncated).
 * @throws {DnsError} `timeout`, or `server_failure` for other rcodes, malformed or no answers.
 */
export async function queryDns(
  name: string,
  qtype: "A" | "AAAA",
  server: NameServer,
  timeoutMs = 2000,
): Promise<DnsAnswer> {
  const type = qtype === "A" ? TYPE_A : TYPE_AAAA;
  const id = crypto.getRandomValues(new Uint16Array(1))[0];
  const query = buildQuery(id, name, type);
  const where = `${
    server.ipAddr.includes(":") ? `[${server.ipAddr}]` : server.ipAddr
  }:${server.port}`;
  const accept = (msg: Uint8Array) => parseAnswer(msg, id, name, type);
  let ex: Exchange;
  try {
    ex = await udpExchange(query, server, timeoutMs, accept);
    if (ex.answer?.truncated) ex = await tcpExchange(query, server, timeoutMs, accept);
  } catch (e) {
    const why = e instanceof MalformedAnswer ? `malformed answer (${e.message})` : String(e);
    throw new DnsError("server_failure", name, `${qtype} query to ${where}: ${why}`, { cause: e });
  }
  if (ex.timedOut) {
    throw new DnsError("timeout", name, `${qtype} query to ${where}: no answer in ${timeoutMs} ms`);
  }
  const a = ex.answer;
  if (!a || a.truncated) {
    throw new DnsError("server_failure", name, `${qtype} query to ${where}: no usable answer`);
  }
  if (a.rcode !== 0 && a.rcode !== 3) {
    const rc = RCODE_NAMES[a.rcode] ?? `rcode ${a.rcode}`;
    throw new DnsError("server_failure", name, `${qtype} query to ${where}: ${rc}`);
  }
  return { rcode: a.rcode, addresses: a.addresses, ttlMs: a.ttlMs };
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
export function parseHosts(text: string): Map<string, { v4: string[]; v6: string[] }> {
  const out = new Map<string, { v4: string[]; v6: string[] }>();
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

/** Looks both families up on the servers; the cache's upstream. */
function upstream(servers: NameServer[], timeoutMs: number, attempts: number) {
  const family = async (name: string, qtype: "A" | "AAAA"): Promise<DnsAnswer> => {
    let last: unknown = null;
    for (let round = 0; round < attempts; round++) {
      for (const server of servers) {
        try {
          return await queryDns(name, qtype, server, timeoutMs);
        } catch (e) {
          last = e;
        }
      }
    }
    throw last;
  };
  return async (name: string): Promise<DnsLookupResult> => {
    const [a, aaaa] = await Promise.allSettled([family(name, "A"), family(name, "AAAA")]);
    const ok = [a, aaaa].filter((r) => r.status === "fulfilled").map((r) => r.value);
    // NXDOMAIN is about the name, whatever the type
    if (ok.some((r) => r.rcode === 3)) {
      return { v4: [], v6: [], ttlMs: 0, negative: "not_found", partial: false };
    }
    if (ok.length === 0) throw (a as PromiseRejectedResult).reason;
    const v4 = a.status === "fulfilled" ? a.value.addresses : [];
    const v6 = aaaa.status === "fulfilled" ? aaaa.value.addresses : [];
    if (v4.length + v6.length === 0) {
      // one family had no data, the other failed: do not cache a guess
      if (ok.length < 2) throw (a.status === "rejected" ? a : aaaa as PromiseRejectedResult).reason;
      return { v4, v6, ttlMs: 0, negative: "no_data", partial: false };
    }
    const ttls = ok.filter((r) => r.addresses.length > 0).map((r) => r.ttlMs);
    return { v4, v6, ttlMs: Math.min(...ttls), negative: null, partial: ok.length < 2 };
  };
}

/** Resolves backend hosts: IP literal, hosts file, then the DNS cache. */
export class Resolver {
  /** The DNS cache (its `stats` and `kind` are for metrics and logs). */
  readonly cache: DnsCache;
  /** The servers asked, in order. */
  readonly servers: readonly NameServer[];
  readonly #hostsFile: string | null;
  #hosts = new Map<string, { v4: string[]; v6: string[] }>();
  #hostsMtime = -1;
  #hostsCheckedAt = -Infinity;
  readonly #log: DnsLog;

  private constructor(
    cache: DnsCache,
    servers: NameServer[],
    hostsFile: string | null,
    log: DnsLog,
  ) {
    this.cache = cache;
    this.servers = servers;
    this.#hostsFile = hostsFile;
    this.#log = log;
  }

  /**
   * A resolver with its cache. When `options.pinned` is set but the pinned map cannot be used,
   * logs one warning with cause and fix and uses an in-process cache instead.
   * @throws {RangeError} on bad options.
   */
  static open(options: ResolverOptions, log: DnsLog = () => {}): Resolver {
    let servers = options.servers ?? [];
    if (servers.length === 0) {
      try {
        servers = parseResolvConf(Deno.readTextFileSync("/etc/resolv.conf"));
      } catch {
        // no resolv.conf: glibc's default below
      }
    }
    if (servers.length === 0) servers = [{ ipAddr: "127.0.0.1", port: 53 }];
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
    const lookup = upstream(servers, timeoutMs, attempts);
    let cache: DnsCache;
    try {
      cache = DnsCache.open(options, lookup, log);
    } catch (e) {
      if (e instanceof RangeError || !options.pinned) throw e;
      log("warning", `DNS cache: ${(e as Error).message}; using an in-process cache`);
      cache = DnsCache.open({ ...options, pinned: null }, lookup, log);
    }
    const hostsFile = options.hostsFile === undefined ? "/etc/hosts" : options.hostsFile;
    return new Resolver(cache, servers, hostsFile, log);
  }

  /**
   * Addresses to try for `host`, in order (IPv4 first, then IPv6).
   * @throws {DnsError} naming the host and the cause.
   */
  async resolve(host: string): Promise<string[]> {
    if (isIpAddress(host)) return [host];
    const name = normalizeDnsName(host);
    if (this.#hostsFile !== null) {
      await this.#refreshHosts(this.#hostsFile);
      const h = this.#hosts.get(name);
      if (h) return [...h.v4, ...h.v6];
    }
    return await this.cache.resolve(name);
  }

  async #refreshHosts(path: string): Promise<void> {
    const now = Date.now();
    if (now - this.#hostsCheckedAt < HOSTS_CHECK_INTERVAL_MS) return;
    this.#hostsCheckedAt = now;
    let mtime = 0;
    try {
      mtime = (await Deno.stat(path)).mtime?.getTime() ?? 0;
      if (mtime === this.#hostsMtime) return;
      this.#hosts = parseHosts(await Deno.readTextFile(path));
    } catch (e) {
      if (this.#hostsMtime !== 0) this.#log("warning", `cannot read ${path}: ${e}`);
      this.#hosts = new Map();
      mtime = 0;
    }
    this.#hostsMtime = mtime;
  }

  /** Release the cache (a pinned map stays for the next process). */
  close(): void {
    this.cache.close();
  }
}

let current: Resolver | null = null;

/**
 * Replace the process-wide resolver used by {@link resolveHost} (at start and on reload); the
 * previous one is closed. Returns the new one.
 */
export function configureResolver(options: ResolverOptions, log?: DnsLog): Resolver {
  const next = Resolver.open(options, log);
  const prev = current;
  current = next;
  prev?.close();
  return next;
}

/**
 * Resolves a backend host to the addresses to try, in order (IPv4 then IPv6). IP literals pass
 * through. Uses the resolver of {@link configureResolver}, or one with
 * {@link DEFAULT_RESOLVER_OPTIONS} until then.
 * @throws {DnsError} naming the host and the cause.
 */
export function resolveHost(host: string): Promise<string[]> {
  current ??= Resolver.open(DEFAULT_RESOLVER_OPTIONS);
  return current.resolve(host);
}
