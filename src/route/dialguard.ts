/**
 * Which resolved backend addresses the proxy may connect to.
 *
 * A dynamic (`$sni`) backend is dialled at whatever address the client's name resolves to, so an
 * allowed name that resolves to an internal address (loopback, private, link-local, ...) would
 * let any client reach the hosts behind the proxy, the proxy host included. Such addresses are
 * refused unless the route opts in (`allow_private`, or the blocks in `allow_addresses`). No
 * backend, configured or dynamic, is ever one of the proxy's own listening sockets: that would be
 * a loop.
 *
 * The check runs on the very addresses the connect uses (after resolution; IP literals too), so
 * a name that resolves elsewhere a moment later (DNS rebinding) gains nothing.
 *
 * @module
 */
import { type Cidr, cidrContains, type IpWords, parseCidr, parseIpWords } from "./acl.ts";

/** Why an address is internal (not globally routed). */
export type AddressKind =
  | "unspecified"
  | "loopback"
  | "private"
  | "link_local"
  | "multicast"
  | "reserved";

/** Why an address may not be dialled: internal without the route's opt-in, or a loop. */
export type DeniedKind = AddressKind | "own_listener";

/** IANA special-purpose blocks a client must not reach through a `$sni` name. */
const INTERNAL: [Cidr, AddressKind][] = ([
  ["0.0.0.0/8", "unspecified"], // "this network"; a connect to 0.0.0.0 reaches this host
  ["127.0.0.0/8", "loopback"],
  ["10.0.0.0/8", "private"],
  ["172.16.0.0/12", "private"],
  ["192.168.0.0/16", "private"],
  ["100.64.0.0/10", "private"], // shared address space (carrier-grade NAT)
  ["169.254.0.0/16", "link_local"], // cloud metadata services live here
  ["192.0.0.0/24", "reserved"], // IETF protocol assignments
  ["198.18.0.0/15", "reserved"], // benchmarking
  ["224.0.0.0/4", "multicast"],
  ["240.0.0.0/4", "reserved"], // and 255.255.255.255
  ["::/128", "unspecified"],
  ["::1/128", "loopback"],
  ["::/96", "reserved"], // IPv4-compatible (deprecated)
  ["100::/64", "reserved"], // discard-only
  ["64:ff9b:1::/48", "private"], // local-use NAT64
  ["fc00::/7", "private"], // unique local
  ["fec0::/10", "private"], // site-local (deprecated)
  ["fe80::/10", "link_local"],
  ["ff00::/8", "multicast"],
] as const).map(([text, kind]) => [parseCidr(text), kind]);

/** The IPv4 address a NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address carries, or null. */
function embeddedIpv4(ip: IpWords): IpWords | null {
  const w = ip.words;
  if (w[0] === 0x0064ff9b && w[1] === 0 && w[2] === 0) return { v6: false, words: [0, 0, 0, w[3]] };
  if (w[0] >>> 16 === 0x2002) {
    return { v6: false, words: [0, 0, 0, (((w[0] & 0xffff) << 16) | (w[1] >>> 16)) >>> 0] };
  }
  return null;
}

/** The kind of internal address `ip` is, or null for a globally routed one. */
export function internalKind(ip: IpWords): AddressKind | null {
  for (const [cidr, kind] of INTERNAL) if (cidrContains(cidr, ip)) return kind;
  const inner = ip.v6 ? embeddedIpv4(ip) : null;
  return inner ? internalKind(inner) : null;
}

/** A route's opt-in to internal addresses for its `$sni` backends. */
export interface InternalPolicy {
  /** Every internal address may be dialled. */
  allowPrivate: boolean;
  /** Internal addresses in these blocks may be dialled. */
  allowAddresses: Cidr[];
  /** The route's JSON path (`routes[2]`), for log lines that say how to opt in. */
  path: string;
}

/** A listening socket of this process. */
export interface OwnSocket {
  hostname: string;
  port: number;
}

/** How long the host's interface addresses are reused before they are read again. */
const INTERFACES_TTL_MS = 5_000;

/** A dial refused: the address and why. */
export interface DeniedAddress {
  address: string;
  kind: DeniedKind;
}

/** Every address a backend name resolved to was refused; nothing was dialled. */
export class AddressDeniedError extends Error {
  readonly denied: DeniedAddress[];
  constructor(host: string, port: number, denied: DeniedAddress[]) {
    super(
      `no address of ${host}:${port} may be dialled: ` +
        denied.map((d) => `${d.address} (${d.kind})`).join(", "),
    );
    this.name = "AddressDenied";
    this.denied = denied;
  }
}

/** Decides, per resolved address, whether a backend connect may go there. */
export class DialGuard {
  readonly #own: { ip: IpWords; wildcard: boolean; port: number }[];
  readonly #ports: Set<number>;
  #local: IpWords[] = [];
  #localAt = -Infinity;

  /** `own`: this process's listening sockets (bound addresses, real ports). */
  constructor(own: OwnSocket[]) {
    this.#own = own.flatMap((s) => {
      const ip = parseIpWords(s.hostname);
      if (!ip) return [];
      return [{ ip, wildcard: internalKind(ip) === "unspecified", port: s.port }];
    });
    this.#ports = new Set(this.#own.map((s) => s.port));
  }

  /**
   * Why `address:port` must not be dialled, or null when it may. `policy`: the route's opt-in
   * for a dynamic backend; null for a configured one (the operator chose it: only the loop
   * check applies). An address that does not parse is refused as reserved.
   */
  check(address: string, port: number, policy: InternalPolicy | null): DeniedKind | null {
    const ownPort = this.#ports.has(port);
    if (!ownPort && (!policy || policy.allowPrivate)) return null;
    const ip = parseIpWords(address);
    if (!ip) return "reserved";
    if (ownPort && this.#isOwn(ip, port)) return "own_listener";
    if (!policy || policy.allowPrivate) return null;
    const kind = internalKind(ip);
    if (kind === null || policy.allowAddresses.some((c) => cidrContains(c, ip))) return null;
    return kind;
  }

  /** Whether a connect to `ip:port` would reach one of our own listening sockets. */
  #isOwn(ip: IpWords, port: number): boolean {
    // a connect to the unspecified address goes to this host, whatever it listens on
    const kind = internalKind(ip);
    if (kind === "unspecified") return true;
    for (const s of this.#own) {
      if (s.port !== port) continue;
      if (!s.wildcard) {
        if (sameIp(s.ip, ip)) return true;
        continue;
      }
      // 0.0.0.0 takes IPv4 only; [::] takes both families (dual-stack)
      if (!s.ip.v6 && ip.v6) continue;
      if (kind === "loopback" || this.#localAddresses().some((l) => sameIp(l, ip))) return true;
    }
    return false;
  }

  /** This host's interface addresses (re-read every few seconds). */
  #localAddresses(): IpWords[] {
    const now = Date.now();
    if (now - this.#localAt < INTERFACES_TTL_MS) return this.#local;
    this.#localAt = now;
    try {
      this.#local = Deno.networkInterfaces().map((i) => parseIpWords(i.address))
        .filter((ip): ip is IpWords => ip !== null);
    } catch {
      // no permission to list interfaces: loopback and the unspecified address still count
      this.#local = [];
    }
    return this.#local;
  }
}

function sameIp(a: IpWords, b: IpWords): boolean {
  return a.v6 === b.v6 && a.words.every((w, i) => w === b.words[i]);
}
