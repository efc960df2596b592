/**
 * The config's address strings (`host:port`, `[v6]:port`, a DNS server) and JSON paths: the
 * parsers the checks and the resolving step share, each throwing with a reason.
 *
 * @module
 */
import { isIpAddress } from "../net/ip.ts";

/** A `host:port` backend; `dynamic` means the host is the client's requested name (`$sni`). */
export interface BackendAddress {
  /** As written in the config, for logs. */
  text: string;
  /** IP literal (no brackets) or DNS name; empty for dynamic backends. */
  host: string;
  port: number;
  dynamic: boolean;
}

/** Formats `["routes", 2, "backends", 0]` as `routes[2].backends[0]`. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = "";
  for (const part of path) {
    if (typeof part === "number") out += `[${part}]`;
    else out += out === "" ? String(part) : `.${String(part)}`;
  }
  return out === "" ? "(top level)" : out;
}

/** Splits `host:port` / `[v6]:port`; throws with a reason. */
function splitHostPort(text: string, minPort: number): { host: string; port: number } {
  let host: string;
  let portText: string;
  if (text.startsWith("[")) {
    const close = text.indexOf("]");
    if (close < 0 || text[close + 1] !== ":") throw new Error(`expected "[IPv6]:port"`);
    host = text.slice(1, close);
    portText = text.slice(close + 2);
    if (!isIpAddress(host) || !host.includes(":")) {
      throw new Error(`"${host}" is not an IPv6 address`);
    }
  } else {
    const colon = text.lastIndexOf(":");
    if (colon < 0) throw new Error(`expected "host:port"`);
    host = text.slice(0, colon);
    portText = text.slice(colon + 1);
    if (host.includes(":")) throw new Error(`IPv6 addresses need brackets: "[${host}]:port"`);
  }
  if (!/^[0-9]{1,5}$/.test(portText)) throw new Error(`port "${portText}" is not a number`);
  const port = Number(portText);
  if (port < minPort || port > 65535) throw new Error(`port out of range (${minPort}-65535)`);
  return { host, port };
}

const hostnameRe = /^(?=.{1,253}$)([a-zA-Z0-9_]([a-zA-Z0-9_-]{0,61}[a-zA-Z0-9_])?\.?)+$/;

/** A route's backend: `host:port` with an IP or a DNS name, or `$sni:port`. */
export function parseBackend(text: string): BackendAddress {
  const { host, port } = splitHostPort(text, 1);
  if (host === "$sni") return { text, host: "", port, dynamic: true };
  if (!isIpAddress(host) && !hostnameRe.test(host)) {
    throw new Error(`"${host}" is not an IP address, a host name or $sni`);
  }
  return { text, host, port, dynamic: false };
}

/** A table's `default_backend`: a backend that is not `$sni`. */
export function parseDefaultBackend(text: string): BackendAddress {
  const b = parseBackend(text);
  if (b.dynamic) throw new Error("default_backend cannot be $sni");
  return b;
}

/** A listening address: an IP literal and a port (0: any free one). */
export function parseListener(text: string): { hostname: string; port: number } {
  const { host, port } = splitHostPort(text, 0);
  if (!isIpAddress(host)) throw new Error(`listener host must be an IP address, got "${host}"`);
  return { hostname: host, port };
}

/** `"IP"` (port 53) or `"IP:port"` / `"[IPv6]:port"`. */
export function parseDnsServer(text: string): { ipAddr: string; port: number } {
  const { hostname, port } = text.includes("]") || /:\d+$/.test(text) && !text.includes("::")
    ? parseListener(text)
    : { hostname: text.replace(/^\[|\]$/g, ""), port: 53 };
  if (!isIpAddress(hostname)) throw new Error(`"${text}" is not an IP address`);
  if (port === 0) throw new Error("port out of range (1-65535)");
  return { ipAddr: hostname, port };
}
