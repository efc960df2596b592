/**
 * In-process counters. Plain numbers and maps, bumped on connection events (never per chunk),
 * read by logs now and by the metrics endpoint later.
 *
 * @module
 */

/** Counters of the userspace side of the proxy. */
export class Metrics {
  accepted = 0;
  active = 0;
  /** Closed connections by close reason. */
  readonly closed = new Map<string, number>();
  /** ClientHello / HTTP head parse errors by kind. */
  readonly helloErrors = new Map<string, number>();
  connectFailures = 0;
  bytesUp = 0;
  bytesDown = 0;

  /** Adds one to `key` in `map`. */
  static bump(map: Map<string, number>, key: string): void {
    map.set(key, (map.get(key) ?? 0) + 1);
  }
}
