/**
 * The counters of QUIC listeners (src/conn/quic_listener.ts): flows, datagrams and bytes each
 * way, and datagrams dropped by reason. Plain fields bumped per datagram (no allocation); the
 * drop and close maps are bumped on those paths only.
 *
 * @module
 */
import type { PromText } from "./metrics.ts";

/** QUIC flows and datagrams. */
export class QuicCounters {
  /** Flows open now (routed, and not routed yet). */
  active = 0;
  /** Flows routed to a backend. */
  routed = 0;
  /** Datagrams forwarded client -> backend (`up`) and backend -> client (`down`) in userspace. */
  datagramsUp = 0;
  datagramsDown = 0;
  /** Their bytes (UDP payload). */
  bytesUp = 0;
  bytesDown = 0;
  /** Flows that moved to a new client address (the client rebound). */
  rebinds = 0;
  /** Datagrams dropped, by reason (`not_initial`, `undecryptable`, `flow_limit`, ...). */
  readonly dropped = new Map<string, number>();
  /** Flows ended, by reason (`idle_timeout`, `bad_initial`, `no_route`, ...). */
  readonly closed = new Map<string, number>();
  /** Kernel mode: routed flows forwarded in userspace instead, by why (`map_full`). */
  readonly kernelFallbacks = new Map<string, number>();

  /** Counts one dropped datagram. */
  drop(reason: string): void {
    this.dropped.set(reason, (this.dropped.get(reason) ?? 0) + 1);
  }

  /** As `/stats` shows them (snake_case, maps as objects). */
  snapshot() {
    return {
      flows_active: this.active,
      flows_routed: this.routed,
      rebinds: this.rebinds,
      datagrams: { up: this.datagramsUp, down: this.datagramsDown },
      bytes: { up: this.bytesUp, down: this.bytesDown },
      dropped: Object.fromEntries(this.dropped),
      closed: Object.fromEntries(this.closed),
      kernel_fallbacks: Object.fromEntries(this.kernelFallbacks),
    };
  }
}

/** The QUIC part of a metrics snapshot. */
export type QuicSnapshot = ReturnType<QuicCounters["snapshot"]>;

/** The QUIC families of the Prometheus text. */
export function renderQuic(out: PromText, q: QuicSnapshot): void {
  out.family("quic_flows_active", "gauge", "QUIC flows open now.");
  out.sample("quic_flows_active", q.flows_active);
  out.family("quic_flows_total", "counter", "QUIC flows routed to a backend.");
  out.sample("quic_flows_total", q.flows_routed);
  out.family("quic_rebinds_total", "counter", "QUIC flows that moved to a new client address.");
  out.sample("quic_rebinds_total", q.rebinds);
  out.labelled("quic_flows_closed_total", "QUIC flows ended, by reason.", "reason", q.closed);
  out.family(
    "quic_datagrams_total",
    "counter",
    "QUIC datagrams forwarded by the proxy process, by direction (up: client to backend).",
  );
  out.sample("quic_datagrams_total", q.datagrams.up, { direction: "up" });
  out.sample("quic_datagrams_total", q.datagrams.down, { direction: "down" });
  out.family(
    "quic_bytes_total",
    "counter",
    "Bytes of the QUIC datagrams forwarded by the proxy process, by direction.",
  );
  out.sample("quic_bytes_total", q.bytes.up, { direction: "up" });
  out.sample("quic_bytes_total", q.bytes.down, { direction: "down" });
  out.labelled("quic_dropped_total", "QUIC datagrams dropped, by reason.", "reason", q.dropped);
  out.labelled(
    "quic_kernel_fallbacks_total",
    "Kernel mode: QUIC flows forwarded in userspace instead, by cause.",
    "reason",
    q.kernel_fallbacks,
  );
}
