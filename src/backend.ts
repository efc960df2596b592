/**
 * Backend pools: the backends of one route and how a connection picks among them.
 *
 * @module
 */
import type { BackendAddress, Balance } from "./config.ts";

/** One backend with its live-connection count (for least_conn and the access log). */
export interface Backend {
  address: BackendAddress;
  active: number;
}

/** The backends of one route, with the route's balancing mode. */
export class BackendPool {
  readonly backends: Backend[];
  readonly balance: Balance;
  /** PROXY protocol version to send to these backends, or null. */
  readonly proxyProtocol: "v1" | "v2" | null;
  #next = 0;

  constructor(
    addresses: BackendAddress[],
    balance: Balance,
    proxyProtocol: "v1" | "v2" | null = null,
  ) {
    this.backends = addresses.map((address) => ({ address, active: 0 }));
    this.balance = balance;
    this.proxyProtocol = proxyProtocol;
  }

  /** Picks a backend for a client at `clientIp`. The caller brackets its use with acquire/release. */
  pick(clientIp: string): Backend {
    const list = this.backends;
    if (list.length === 1) return list[0];
    switch (this.balance) {
      case "random":
        return list[Math.floor(Math.random() * list.length)];
      case "least_conn": {
        // start after the last pick so ties rotate instead of piling on the first backend
        let best = list[this.#next % list.length];
        for (let i = 1; i < list.length; i++) {
          const b = list[(this.#next + i) % list.length];
          if (b.active < best.active) best = b;
        }
        this.#next = (list.indexOf(best) + 1) % list.length;
        return best;
      }
      case "source_hash":
        return list[fnv1a(clientIp) % list.length];
      default:
        return list[this.#next++ % list.length];
    }
  }
}

/** 32-bit FNV-1a: stable across restarts, so a client keeps its backend. */
function fnv1a(text: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}
