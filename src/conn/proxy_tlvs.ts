/**
 * The PROXY protocol header a session sends its backend ahead of the client's bytes: the values
 * of the v2 TLVs its route asks for (`proxy_protocol_tlvs`), and the connection ids behind
 * `unique_id`.
 *
 * @module
 */
import { proxyHeader, type ProxyTlv, type ProxyTlvValues } from "../proto/proxyproto.ts";
import type { BackendPool } from "../route/backend.ts";
import type { ConnRecord } from "./conn_record.ts";

/** This process's part of every connection id: random, so ids stay unique across restarts. */
const connIdPrefix = Array.from(
  crypto.getRandomValues(new Uint8Array(6)),
  (b) => b.toString(16).padStart(2, "0"),
).join("");
/** Connection ids made by this process so far (process-wide, so no two sessions share one). */
let connIds = 0;

/**
 * The values of the PROXY v2 TLVs `tlvs` for the connection of `record`: the requested name, the
 * application protocol (the proxy does not see the server's choice: for a route with `alpn`
 * (`routeAlpn`) the client's first offer the route lists, else the client's first offer) and a
 * new connection id (noted on the record).
 */
export function tlvValues(
  tlvs: readonly ProxyTlv[],
  record: ConnRecord,
  routeAlpn: readonly string[] | null,
): ProxyTlvValues {
  const offered = record.hello?.alpn ?? [];
  if (tlvs.includes("unique_id")) record.connId = `${connIdPrefix}-${(++connIds).toString(36)}`;
  return {
    authority: tlvs.includes("authority") ? record.sni : null,
    alpn: tlvs.includes("alpn")
      ? (routeAlpn ? offered.find((p) => routeAlpn.includes(p)) : offered[0]) ?? null
      : null,
    uniqueId: record.connId,
  };
}

/**
 * The PROXY protocol header `pool` sends its backends ahead of the bytes of `client`, which
 * connected to `server` (the connection of `record`; `routeAlpn`: its route's `alpn`).
 */
export function proxyHeaderFor(
  pool: BackendPool,
  client: Deno.NetAddr,
  server: Deno.NetAddr,
  record: ConnRecord,
  routeAlpn: readonly string[] | null,
): Uint8Array {
  const tlvs = pool.proxyTlvs;
  const values = tlvs.length ? tlvValues(tlvs, record, routeAlpn) : undefined;
  return proxyHeader(pool.proxyProtocol!, client, server, values);
}
