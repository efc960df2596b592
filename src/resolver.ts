/**
 * Name resolution for hostname and dynamic (`$sni`) backends, through the system resolver
 * (getaddrinfo: /etc/hosts, then DNS).
 *
 * @module
 */
import { lookup } from "node:dns/promises";
import { isIpAddress } from "./acl.ts";

/** Resolves a backend host to the addresses to try, in order. IP literals pass through. */
export async function resolveHost(host: string): Promise<string[]> {
  if (isIpAddress(host)) return [host];
  const found = await lookup(host, { all: true, verbatim: true });
  if (found.length === 0) throw new Error(`no address for ${host}`);
  return found.map((a) => a.address);
}
