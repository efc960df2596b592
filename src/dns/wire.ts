/**
 * The DNS wire format (RFC 1035) as the stub client needs it: a query of one question with RD
 * and an EDNS0 OPT record, and the parse of its answer (compressed names, CNAME chains inside
 * the answer, A and AAAA data, TTLs).
 * @module
 */

import { formatIpv6 } from "../net/ip.ts";

export const TYPE_A = 1;
const TYPE_CNAME = 5;
export const TYPE_AAAA = 28;
const TYPE_OPT = 41;
/** Names of the rcodes that make a server's answer unusable. */
export const RCODE_NAMES: Record<number, string> = {
  1: "FORMERR",
  2: "SERVFAIL",
  3: "NXDOMAIN",
  4: "NOTIMP",
  5: "REFUSED",
};
const EDNS_UDP_SIZE = 1232;

/** One server's answer to one question. */
export interface DnsAnswer {
  /** 0 NOERROR, 3 NXDOMAIN (others are turned into errors before they get here). */
  rcode: number;
  /** Addresses of the asked type (after following CNAMEs), in answer order. */
  addresses: string[];
  /** Smallest TTL of the records used, ms (0 when there is no address). */
  ttlMs: number;
}

/** An answer as parsed from the message, before its rcode is judged. */
export type ParsedAnswer = DnsAnswer & { truncated: boolean };

/** A message that is a reply to the question asked but cannot be parsed. */
export class MalformedAnswer extends Error {}

/** Builds the query message: one question, RD, EDNS0 OPT advertising 1232 bytes. */
export function buildQuery(id: number, name: string, qtype: number): Uint8Array<ArrayBuffer> {
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

/** A resource record of the answer section: where its data is. */
interface AnswerRecord {
  owner: string;
  type: number;
  ttl: number;
  at: number;
  len: number;
}

/**
 * Parses a reply to (id, name, qtype); null when it is not one (other id or question).
 * @throws {MalformedAnswer} when it is one but cannot be parsed.
 */
export function parseAnswer(
  msg: Uint8Array,
  id: number,
  name: string,
  qtype: number,
): ParsedAnswer | null {
  if (msg.length < 12) return null;
  const v = new DataView(msg.buffer, msg.byteOffset, msg.byteLength);
  const flags = v.getUint16(2);
  if (v.getUint16(0) !== id || !(flags & 0x8000) || v.getUint16(4) !== 1) return null;
  const [qname, qend] = readName(msg, 12);
  if (qend + 4 > msg.length) throw new MalformedAnswer("question runs past the message");
  if (qname !== name || v.getUint16(qend) !== qtype) return null;
  const truncated = (flags & 0x0200) !== 0;
  const rcode = flags & 0x000f;
  const records = truncated ? [] : readRecords(msg, v, qend + 4);
  const { chain, ttl } = cnameChain(msg, records, name);
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

/** The answer section's records (ANCOUNT of them), from `off` on. */
function readRecords(msg: Uint8Array, v: DataView, off: number): AnswerRecord[] {
  const records: AnswerRecord[] = [];
  const ancount = v.getUint16(6);
  for (let i = 0; i < ancount; i++) {
    const [owner, end] = readName(msg, off);
    if (end + 10 > msg.length) throw new MalformedAnswer("record runs past the message");
    const len = v.getUint16(end + 8);
    if (end + 10 + len > msg.length) throw new MalformedAnswer("rdata runs past the message");
    // RFC 2181 8: a TTL with the top bit set is 0
    const ttl = v.getUint32(end + 4) & 0x80000000 ? 0 : v.getUint32(end + 4);
    records.push({ owner, type: v.getUint16(end), ttl, at: end + 10, len });
    off = end + 10 + len;
  }
  return records;
}

/** The names that lead to `name` through CNAMEs in this answer, and the smallest CNAME TTL. */
function cnameChain(
  msg: Uint8Array,
  records: AnswerRecord[],
  name: string,
): { chain: Set<string>; ttl: number } {
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
  return { chain, ttl };
}
