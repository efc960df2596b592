/**
 * The stub DNS client the cache looks names up with: UDP (TCP when the answer is truncated)
 * rather than Deno.resolveDns, because Deno.resolveDns (Deno 2.9) returns addresses without
 * their TTL, and the cache must honour TTLs. It sends one question with RD set and an EDNS0 OPT
 * record, uses a fresh socket (random source port) and a random id per query, accepts only a
 * reply from the server asked with the same id and question, follows CNAME chains inside the
 * answer, and tries the servers in order (`attempts` rounds) on timeout, SERVFAIL or REFUSED.
 * Needs `--unstable-net` (Deno.listenDatagram).
 * @module
 */

import { DnsError, type DnsLookup, type DnsLookupResult } from "./dnscache.ts";
import {
  buildQuery,
  type DnsAnswer,
  MalformedAnswer,
  parseAnswer,
  type ParsedAnswer,
  RCODE_NAMES,
  TYPE_A,
  TYPE_AAAA,
} from "./wire.ts";
import { writeAll } from "../net/bytes.ts";

export type { DnsAnswer };

/** A DNS server to ask. */
export interface NameServer {
  ipAddr: string;
  port: number;
}

type Exchange = { answer: ParsedAnswer | null; timedOut: boolean };

async function udpExchange(
  query: Uint8Array<ArrayBuffer>,
  server: NameServer,
  timeoutMs: number,
  accept: (msg: Uint8Array) => ParsedAnswer | null,
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
  accept: (msg: Uint8Array) => ParsedAnswer | null,
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

/** Looks both families up on `servers` (in order, `attempts` rounds): the cache's upstream. */
export function serversLookup(
  servers: NameServer[],
  timeoutMs: number,
  attempts: number,
): DnsLookup {
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
