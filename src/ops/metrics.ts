/**
 * Counters: userspace ones are plain numbers and maps bumped on connection events (never per
 * chunk); kernel ones are read from the per-CPU maps when asked. Rendered as Prometheus text
 * and as JSON.
 *
 * @module
 */
import { QuicCounters, renderQuic } from "./quic_metrics.ts";

/** The XDP block set (src/ebpf/xdpblock.ts), as `/stats` shows it. */
export interface XdpBlockSnapshot {
  /** Blocks set since start. */
  blocked_total: number;
  /** Sources blocked now. */
  blocked_sources: number;
  /** Each blocked source: seconds left and packets dropped. */
  blocked: Record<string, { seconds_left: number; hits: number }>;
  /** Offences counted (per-source limit refusals, bad hellos), from blocked sources too. */
  offences_total: number;
  /**
   * With workers: offences a worker could not report to the supervisor (its queue was full),
   * so never counted.
   */
  offences_dropped?: number;
}

/** Kernel-side counters, summed over CPUs (see src/ebpf/sockmap.ts and src/ebpf/xdp.ts). */
export type KernelCounters = Record<string, number>;

/**
 * One histogram series as plain data: cumulative counts keyed by upper bound (`le`, `+Inf`
 * last), the sum and the count of what was observed. Keyed objects, not arrays, so that
 * {@link addSnapshot} sums several processes' series bucket by bucket.
 */
export interface HistogramSnapshot {
  buckets: Record<string, number>;
  sum: number;
  count: number;
}

/** Upper bounds of the latency histograms, in seconds. */
const SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
/** Upper bounds of the connection-duration histogram, in seconds. */
const DURATION_BUCKETS = [0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600];
/** Upper bounds of the bytes-per-connection histograms: 256 B to 1 GiB, by fours. */
const BYTES_BUCKETS = Array.from({ length: 12 }, (_, i) => 256 * 4 ** i);

/** Observations of one value by route: per-bucket counts (not cumulative), sum and count. */
export class Histogram {
  readonly bounds: readonly number[];
  readonly #series = new Map<string, { counts: number[]; sum: number; count: number }>();

  constructor(bounds: readonly number[]) {
    this.bounds = bounds;
  }

  /** Counts `value` in the series of `route`. */
  observe(route: string, value: number): void {
    let s = this.#series.get(route);
    if (!s) {
      s = { counts: new Array(this.bounds.length + 1).fill(0), sum: 0, count: 0 };
      this.#series.set(route, s);
    }
    let i = 0;
    while (i < this.bounds.length && value > this.bounds[i]) i++;
    s.counts[i]++;
    s.sum += value;
    s.count++;
  }

  /** Every series, with cumulative bucket counts. */
  snapshot(): Record<string, HistogramSnapshot> {
    const out: Record<string, HistogramSnapshot> = {};
    for (const [route, s] of this.#series) {
      const buckets: Record<string, number> = {};
      let total = 0;
      this.bounds.forEach((le, i) => buckets[String(le)] = total += s.counts[i]);
      buckets["+Inf"] = s.count;
      out[route] = { buckets, sum: s.sum, count: s.count };
    }
    return out;
  }
}

/** The DNS cache's counters (src/dns/dnscache.ts). */
interface DnsCounters {
  hits: number;
  negativeHits: number;
  lookups: number;
  coalesced: number;
}

/** The route label of a connection that was not routed (no name, bad hello, no route). */
export const NO_ROUTE = "(none)";

/** Counters of the proxy. */
export class Metrics {
  accepted = 0;
  active = 0;
  /** Closed connections by close reason. */
  readonly closed = new Map<string, number>();
  /** Connections routed, by route `match` (or `default_backend`). */
  readonly byRoute = new Map<string, number>();
  /**
   * Connections sent, by backend as configured: a dynamic backend counts as its `$sni:PORT`,
   * never by the name a client asked for (which would make one series per name).
   */
  readonly byBackend = new Map<string, number>();
  /** ClientHello / HTTP head parse errors by kind. */
  readonly helloErrors = new Map<string, number>();
  connectFailures = 0;
  /** Resolved backend addresses refused, by why (see src/route/dialguard.ts). */
  readonly addressDenied = new Map<string, number>();
  /** Failures for lack of a local resource, by `operation:errno` (`connect:EMFILE`). */
  readonly localErrors = new Map<string, number>();
  /** Refused clients in their lingering close now (src/conn/linger.ts). */
  lingering = 0;
  /** Lingering closes by how they ended (`eof`, `reset`, `timeout`, `bytes`, `over_limit`, `fd_reserve`). */
  readonly lingerCloses = new Map<string, number>();
  /** Times the accept loops paused, by the limit reached. */
  readonly acceptPauses = new Map<string, number>();
  /** Open descriptors and their limit, when known. */
  fdSource: (() => { open: number; limit: number }) | null = null;
  /** Connections relayed in userspace / spliced in the kernel. */
  readonly byMode = new Map<string, number>();
  /** Kernel mode: connections that ran in userspace instead, by why (e.g. `map_full`). */
  readonly kernelFallbacks = new Map<string, number>();
  /** Bytes each way (userspace and kernel paths together). */
  bytesUp = 0;
  bytesDown = 0;
  /** Bytes the Deno process itself copied (userspace mode and the hello). */
  bytesUserspace = 0;
  /** DNS cache counters, when a resolver is configured. */
  dnsSource: (() => DnsCounters) | null = null;
  /**
   * The XDP block set of misbehaving sources (`ebpf.xdp.block`), when on; in a worker, what
   * it could not report of its offences.
   */
  blockSource: (() => Partial<XdpBlockSnapshot>) | null = null;
  /** Sources of kernel counters, by prefix (e.g. `sockmap`, `xdp`). */
  readonly kernelSources = new Map<string, () => KernelCounters>();
  /** Accept to a complete ClientHello / HTTP head, by route. */
  readonly helloSeconds = new Histogram(SECONDS_BUCKETS);
  /** The backend connect that succeeded (name resolution included), by route. */
  readonly connectSeconds = new Histogram(SECONDS_BUCKETS);
  /** Accept to close, by route ({@link NO_ROUTE} for connections never routed). */
  readonly durationSeconds = new Histogram(DURATION_BUCKETS);
  /** Bytes of one connection each way, by route. */
  readonly bytesUpHistogram = new Histogram(BYTES_BUCKETS);
  readonly bytesDownHistogram = new Histogram(BYTES_BUCKETS);
  /** QUIC listeners' flows and datagrams. */
  readonly quic = new QuicCounters();

  /** Adds one to `key` in `map`. */
  static bump(map: Map<string, number>, key: string): void {
    map.set(key, (map.get(key) ?? 0) + 1);
  }

  /**
   * Everything as one plain object (the `/stats` JSON): snake_case keys, maps as objects, empty
   * objects for the parts that are off (`fds`, `dns`, `xdp_block`).
   */
  snapshot() {
    const kernel: Record<string, KernelCounters> = {};
    for (const [name, read] of this.kernelSources) kernel[name] = safeRead(read);
    return {
      connections: {
        accepted: this.accepted,
        active: this.active,
        closed: Object.fromEntries(this.closed),
        by_route: Object.fromEntries(this.byRoute),
        by_backend: Object.fromEntries(this.byBackend),
        by_mode: Object.fromEntries(this.byMode),
        connect_failures: this.connectFailures,
        kernel_fallbacks: Object.fromEntries(this.kernelFallbacks),
        accept_paused: Object.fromEntries(this.acceptPauses),
        lingering: this.lingering,
        lingering_closes: Object.fromEntries(this.lingerCloses),
      },
      backend_address_denied: Object.fromEntries(this.addressDenied),
      local_resource_errors: Object.fromEntries(this.localErrors),
      fds: this.fdSource?.() ?? {} as { open?: number; limit?: number },
      hello_errors: Object.fromEntries(this.helloErrors),
      bytes: { up: this.bytesUp, down: this.bytesDown, userspace: this.bytesUserspace },
      dns: this.dnsSource?.() ?? {} as Partial<DnsCounters>,
      /** `ebpf.xdp.block`: empty when off. */
      xdp_block: this.blockSource?.() ?? {} as Partial<XdpBlockSnapshot>,
      kernel,
      quic: this.quic.snapshot(),
      histograms: {
        hello_seconds: this.helloSeconds.snapshot(),
        connect_seconds: this.connectSeconds.snapshot(),
        duration_seconds: this.durationSeconds.snapshot(),
        bytes_up: this.bytesUpHistogram.snapshot(),
        bytes_down: this.bytesDownHistogram.snapshot(),
      },
    };
  }

  /** Prometheus text exposition format 0.0.4. */
  prometheus(): string {
    return renderPrometheus(this.snapshot());
  }
}

/**
 * The counters as plain data: the `/stats` JSON, and what worker processes report. Its shape is
 * {@link Metrics.snapshot}'s, so a counter is named once there.
 */
export type MetricsSnapshot = ReturnType<Metrics["snapshot"]>;

/**
 * Adds `b` into `a`, field by field (numbers are summed, objects merged the same way): the
 * counters of several worker processes as one proxy's. Returns `a`.
 */
export function addSnapshot(a: MetricsSnapshot, b: MetricsSnapshot): MetricsSnapshot {
  const add = (x: Record<string, unknown>, y: Record<string, unknown>) => {
    for (const [k, v] of Object.entries(y)) {
      if (typeof v === "number") x[k] = ((x[k] as number | undefined) ?? 0) + v;
      else if (v && typeof v === "object") {
        x[k] ??= {};
        add(x[k] as Record<string, unknown>, v as Record<string, unknown>);
      }
    }
  };
  add(a as unknown as Record<string, unknown>, b as unknown as Record<string, unknown>);
  return a;
}

/** An all-zero snapshot (the start of a sum). */
export function emptySnapshot(): MetricsSnapshot {
  return new Metrics().snapshot();
}

/** Prometheus text exposition format 0.0.4 of a snapshot. */
export function renderPrometheus(snap: MetricsSnapshot): string {
  const out = new PromText();
  renderConnections(out, snap);
  renderResources(out, snap);
  renderDns(out, snap.dns);
  renderXdpBlock(out, snap.xdp_block);
  renderQuic(out, snap.quic);
  renderHistograms(out, snap.histograms);
  renderKernel(out, snap.kernel);
  return out.text();
}

/** Lines of the exposition format, every metric name prefixed `sni_proxy_`. */
export class PromText {
  readonly #lines: string[] = [];

  /** The HELP and TYPE lines of a metric family. */
  family(name: string, type: "counter" | "gauge" | "histogram", help: string): void {
    this.#lines.push(`# HELP sni_proxy_${name} ${help}`, `# TYPE sni_proxy_${name} ${type}`);
  }

  /** One sample, with its labels (values escaped). */
  sample(name: string, value: number, labels?: Record<string, string>): void {
    const l = labels
      ? `{${Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(",")}}`
      : "";
    this.#lines.push(`sni_proxy_${name}${l} ${value}`);
  }

  /** A counter family with one sample per key of `map`, the key as label `label`. */
  labelled(name: string, help: string, label: string, map: Record<string, number>): void {
    this.family(name, "counter", help);
    for (const [k, v] of Object.entries(map)) this.sample(name, v, { [label]: k });
  }

  /** A histogram family: per route of each series, its buckets, sum and count. */
  histogram(
    name: string,
    help: string,
    parts: [Record<string, HistogramSnapshot>, Record<string, string>][],
  ): void {
    this.family(name, "histogram", help);
    for (const [series, extra] of parts) {
      for (const [route, h] of Object.entries(series)) {
        const labels = { route, ...extra };
        // the keys of numeric bounds do not keep their order in an object: sort by value
        const bounds = Object.keys(h.buckets).sort((a, b) => leValue(a) - leValue(b));
        for (const le of bounds) this.sample(`${name}_bucket`, h.buckets[le], { ...labels, le });
        this.sample(`${name}_sum`, h.sum, labels);
        this.sample(`${name}_count`, h.count, labels);
      }
    }
  }

  text(): string {
    return this.#lines.join("\n") + "\n";
  }
}

/** Connections: accepted, active, how they ended, where they went, what failed. */
function renderConnections(out: PromText, snap: MetricsSnapshot): void {
  const c = snap.connections;
  out.family("connections_accepted_total", "counter", "Connections accepted.");
  out.sample("connections_accepted_total", c.accepted);
  out.family("connections_active", "gauge", "Connections open now.");
  out.sample("connections_active", c.active);
  out.labelled("connections_closed_total", "Connections closed, by reason.", "reason", c.closed);
  out.labelled("connections_route_total", "Connections routed, by route.", "route", c.by_route);
  out.labelled(
    "connections_backend_total",
    "Connections sent to a backend.",
    "backend",
    c.by_backend,
  );
  out.labelled("connections_mode_total", "Connections by relay mode.", "mode", c.by_mode);
  out.labelled(
    "hello_errors_total",
    "Bad ClientHellos / HTTP heads, by kind.",
    "kind",
    snap.hello_errors,
  );
  out.labelled(
    "kernel_fallbacks_total",
    "Kernel mode: connections relayed in userspace instead, by cause.",
    "reason",
    c.kernel_fallbacks,
  );
  out.family("connect_failures_total", "counter", "Backend connects that failed.");
  out.sample("connect_failures_total", c.connect_failures);
  out.labelled(
    "backend_address_denied_total",
    "Resolved backend addresses refused: internal without the route's opt-in, or a loop.",
    "kind",
    snap.backend_address_denied,
  );
  out.family(
    "local_resource_errors_total",
    "counter",
    "Failures for lack of a local resource (descriptors, buffers, ports), not a backend's.",
  );
  for (const [key, v] of Object.entries(snap.local_resource_errors)) {
    const [op, code] = key.split(":");
    out.sample("local_resource_errors_total", v, { op, code });
  }
  out.labelled(
    "accept_paused_total",
    "Times accepting paused, by the limit reached.",
    "reason",
    c.accept_paused,
  );
  out.family("lingering_connections", "gauge", "Refused clients in their lingering close now.");
  out.sample("lingering_connections", c.lingering);
  out.labelled(
    "lingering_closes_total",
    "Lingering closes of refused clients, by how they ended.",
    "result",
    c.lingering_closes,
  );
}

/** Descriptors (when known) and bytes relayed. */
function renderResources(out: PromText, snap: MetricsSnapshot): void {
  if (snap.fds.limit !== undefined) {
    out.family("open_fds", "gauge", "Open file descriptors.");
    out.sample("open_fds", snap.fds.open ?? 0);
    out.family("max_fds", "gauge", "The soft limit on open file descriptors (RLIMIT_NOFILE).");
    out.sample("max_fds", snap.fds.limit);
  }
  out.family("bytes_total", "counter", "Bytes relayed, by direction (up: client to backend).");
  out.sample("bytes_total", snap.bytes.up, { direction: "up" });
  out.sample("bytes_total", snap.bytes.down, { direction: "down" });
  out.family("userspace_bytes_total", "counter", "Bytes copied by the proxy process itself.");
  out.sample("userspace_bytes_total", snap.bytes.userspace);
}

/** The DNS cache's counters, when there is a resolver. */
function renderDns(out: PromText, dns: MetricsSnapshot["dns"]): void {
  if (dns.hits === undefined) return;
  out.family("dns_cache_total", "counter", "Backend name lookups, by how they were answered.");
  out.sample("dns_cache_total", dns.hits, { result: "hit" });
  out.sample("dns_cache_total", dns.negativeHits ?? 0, { result: "negative_hit" });
  out.sample("dns_cache_total", dns.coalesced ?? 0, { result: "coalesced" });
  out.sample("dns_cache_total", dns.lookups ?? 0, { result: "miss" });
}

/** The XDP block set (`ebpf.xdp.block`), when on. */
function renderXdpBlock(out: PromText, block: MetricsSnapshot["xdp_block"]): void {
  if (block.blocked_total === undefined) return;
  out.family("xdp_blocked_total", "counter", "Sources put into the XDP block set.");
  out.sample("xdp_blocked_total", block.blocked_total);
  out.family("xdp_blocked_sources", "gauge", "Sources in the XDP block set now.");
  out.sample("xdp_blocked_sources", block.blocked_sources ?? 0);
  // one series per blocked source: bounded by ebpf.xdp.block.max_entries
  out.family("xdp_blocked_seconds", "gauge", "Seconds left of each blocked source's XDP block.");
  for (const [source, b] of Object.entries(block.blocked ?? {})) {
    out.sample("xdp_blocked_seconds", b.seconds_left, { source });
  }
  out.family(
    "xdp_offences_total",
    "counter",
    "Offences counted: per-source limit refusals, bad hellos.",
  );
  out.sample("xdp_offences_total", block.offences_total ?? 0);
  out.family(
    "xdp_offences_dropped_total",
    "counter",
    "Offences a worker could not report to the supervisor (its queue was full).",
  );
  out.sample("xdp_offences_dropped_total", block.offences_dropped ?? 0);
}

/** The per-connection distributions, by route. */
function renderHistograms(out: PromText, hist: MetricsSnapshot["histograms"]): void {
  out.histogram(
    "hello_duration_seconds",
    "Accept to a complete ClientHello / HTTP head, by route.",
    [[hist.hello_seconds, {}]],
  );
  out.histogram(
    "backend_connect_duration_seconds",
    "Backend connects that succeeded (name resolution included), by route.",
    [[hist.connect_seconds, {}]],
  );
  out.histogram(
    "connection_duration_seconds",
    "Connections from accept to close, by route.",
    [[hist.duration_seconds, {}]],
  );
  out.histogram(
    "connection_bytes",
    "Bytes of one connection, by route and direction (up: client to backend).",
    [[hist.bytes_up, { direction: "up" }], [hist.bytes_down, { direction: "down" }]],
  );
}

/** Every kernel counter, one counter family each. */
function renderKernel(out: PromText, kernel: MetricsSnapshot["kernel"]): void {
  for (const [source, counters] of Object.entries(kernel)) {
    for (const [key, value] of Object.entries(counters)) {
      const name = `kernel_${source}_${snake(key)}_total`;
      out.family(name, "counter", `eBPF ${source} counter ${key} (summed over CPUs).`);
      out.sample(name, value);
    }
  }
}

function leValue(le: string): number {
  return le === "+Inf" ? Infinity : Number(le);
}

function safeRead(read: () => KernelCounters): KernelCounters {
  try {
    return read();
  } catch {
    return {};
  }
}

function snake(key: string): string {
  return key.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase()).replace(/[^a-z0-9_]/g, "_");
}

function escapeLabel(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}
