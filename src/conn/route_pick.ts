/**
 * A session's route: the pool its name (and ALPN offer) takes in its table, or why the client
 * is refused (no route takes the name, or a TLS fingerprint the ACL or the route denies).
 *
 * @module
 */
import type { BackendPool } from "../route/backend.ts";
import type { FingerprintPatterns } from "../proto/fingerprint.ts";
import type { Refusal } from "../proto/protocol.ts";
import type { RoutingTable } from "../route/table.ts";
import { BurstLog, logger } from "../ops/log.ts";
import type { CloseReason, ConnRecord } from "./conn_record.ts";

const log = logger("session");
/** Warnings that can come once per connection: logged once per burst. */
const bursts = new BurstLog(log);

/** The route taken, or the refusal: what the client is told and the reason logged. */
export type PickedRoute =
  | {
    pool: BackendPool;
    /** The ALPN protocols of the route (null: a route without `alpn`). */
    alpn: readonly string[] | null;
  }
  | { reason: CloseReason; refusal: Refusal };

/**
 * The route `name` takes in `table` for the connection of `record` (whose `hello` is read):
 * notes the route on the record.
 */
export function pickRoute(
  table: RoutingTable,
  record: ConnRecord,
  name: string | null,
): PickedRoute {
  if (fingerprintDenied(record, table.config.acl.denyFingerprints, "acl")) {
    return { reason: "fingerprint_denied", refusal: "forbidden" };
  }
  const picked = poolFor(table, record, name);
  if (!picked) return { reason: "no_route", refusal: "misdirected" };
  if (fingerprintDenied(record, picked.pool.denyFingerprints, `route "${picked.pool.name}"`)) {
    return { reason: "fingerprint_denied", refusal: "forbidden" };
  }
  return picked;
}

/** The pool for `name`, or null when the connection must be refused. */
function poolFor(
  table: RoutingTable,
  record: ConnRecord,
  name: string | null,
): { pool: BackendPool; alpn: readonly string[] | null } | null {
  const { router, defaultPool } = table;
  const client = record.client;
  const found = router.lookup(name, record.hello?.alpn);
  if (found.kind === "route") {
    record.route = found.route.target.name;
    return { pool: found.route.target, alpn: found.route.alpn };
  }
  if (found.kind === "not_allowed") {
    log.info(
      `${client}: name "${name}" matches route "${found.route.pattern.text}" but not its allow list`,
    );
    return null;
  }
  if (defaultPool) {
    record.route = "default_backend";
    return { pool: defaultPool, alpn: null };
  }
  log.info(`${client}: no route for ${name === null ? "a hello without SNI" : `"${name}"`}`);
  return null;
}

/**
 * Whether `patterns` refuse the client's fingerprint (logged once per burst of `by`, which
 * names the ACL or the route).
 */
function fingerprintDenied(
  record: ConnRecord,
  patterns: FingerprintPatterns | null,
  by: string,
): boolean {
  const fp = record.hello?.fingerprints;
  const hit = patterns && fp ? patterns.match(fp.ja4, fp.ja3) : null;
  if (hit === null) return false;
  bursts.warn(
    `fingerprint:${by}:${hit}`,
    `${by}: refusing ${record.client}: its TLS fingerprint matches "${hit}" ` +
      `(ja4 ${fp!.ja4}, ja3 ${fp!.ja3})`,
  );
  return true;
}
