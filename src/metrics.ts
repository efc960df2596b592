/**
 * Counters: userspace ones are plain numbers and maps bumped on connection events (never per
 * chunk); kernel ones are read from the per-CPU maps when asked. Rendered as Prometheus text
 * and as JSON.
 *
 * @module
 */

/** Kernel-side counters, summed over CPUs (see src/kernel.ts and src/xdp.ts). */
export type KernelCounters = Record<string, number>;

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
  /** Resolved backend addresses refused, by why (see src/dialguard.ts). */
  readonly addressDenied = new Map<string, number>();
  /** Failures for lack of a local resource, by `operation:errno` (`connect:EMFILE`). */
  readonly localErrors = new Map<string, number>();
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
  dnsSource:
    | (() => { hits: number; negativeHits: number; lookups: number; coalesced: number })
    | null = null;
  /** Sources of kernel counters, by prefix (e.g. `sockmap`, `xdp`). */
  readonly kernelSources = new Map<string, () => KernelCounters>();

  /** Adds one to `key` in `map`. */
  static bump(map: Map<string, number>, key: string): void {
    map.set(key, (map.get(key) ?? 0) + 1);
  }

  /** Everything as one plain object (the `/stats` JSON). */
  snapshot(): MetricsSnapshot {
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
      },
      backend_address_denied: Object.fromEntries(this.addressDenied),
      local_resource_errors: Object.fromEntries(this.localErrors),
      fds: this.fdSource?.() ?? {},
      hello_errors: Object.fromEntries(this.helloErrors),
      bytes: { up: this.bytesUp, down: this.bytesDown, userspace: this.bytesUserspace },
      dns: this.dnsSource?.() ?? {},
      kernel,
    };
  }

  /** Prometheus text exposition format 0.0.4. */
  prometheus(): string {
    return renderPrometheus(this.snapshot());
  }
}

/** The counters as plain data: the `/stats` JSON, and what worker processes report. */
export interface MetricsSnapshot {
  connections: {
    accepted: number;
    active: number;
    closed: Record<string, number>;
    by_route: Record<string, number>;
    by_backend: Record<string, number>;
    by_mode: Record<string, number>;
    connect_failures: number;
    kernel_fallbacks: Record<string, number>;
    accept_paused: Record<string, number>;
  };
  backend_address_denied: Record<string, number>;
  local_resource_errors: Record<string, number>;
  fds: { open?: number; limit?: number };
  hello_errors: Record<string, number>;
  bytes: { up: number; down: number; userspace: number };
  dns: { hits?: number; negativeHits?: number; lookups?: number; coalesced?: number };
  kernel: Record<string, KernelCounters>;
}

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
  const out: string[] = [];
  const family = (name: string, type: "counter" | "gauge", help: string) => {
    out.push(`# HELP sni_proxy_${name} ${help}`, `# TYPE sni_proxy_${name} ${type}`);
  };
  const sample = (name: string, value: number, labels?: Record<string, string>) => {
    const l = labels
      ? `{${Object.entries(labels).map(([k, v]) => `${k}="${escapeLabel(v)}"`).join(",")}}`
      : "";
    out.push(`sni_proxy_${name}${l} ${value}`);
  };
  const labelled = (name: string, help: string, label: string, map: Record<string, number>) => {
    family(name, "counter", help);
    for (const [k, v] of Object.entries(map)) sample(name, v, { [label]: k });
  };
  const c = snap.connections;
  family("connections_accepted_total", "counter", "Connections accepted.");
  sample("connections_accepted_total", c.accepted);
  family("connections_active", "gauge", "Connections open now.");
  sample("connections_active", c.active);
  labelled("connections_closed_total", "Connections closed, by reason.", "reason", c.closed);
  labelled("connections_route_total", "Connections routed, by route.", "route", c.by_route);
  labelled(
    "connections_backend_total",
    "Connections sent to a backend.",
    "backend",
    c.by_backend,
  );
  labelled("connections_mode_total", "Connections by relay mode.", "mode", c.by_mode);
  labelled(
    "hello_errors_total",
    "Bad ClientHellos / HTTP heads, by kind.",
    "kind",
    snap.hello_errors,
  );
  labelled(
    "kernel_fallbacks_total",
    "Kernel mode: connections relayed in userspace instead, by cause.",
    "reason",
    c.kernel_fallbacks,
  );
  family("connect_failures_total", "counter", "Backend connects that failed.");
  sample("connect_failures_total", c.connect_failures);
  labelled(
    "backend_address_denied_total",
    "Resolved backend addresses refused: internal without the route's opt-in, or a loop.",
    "kind",
    snap.backend_address_denied,
  );
  family(
    "local_resource_errors_total",
    "counter",
    "Failures for lack of a local resource (descriptors, buffers, ports), not a backend's.",
  );
  for (const [key, v] of Object.entries(snap.local_resource_errors)) {
    const [op, code] = key.split(":");
    sample("local_resource_errors_total", v, { op, code });
  }
  labelled(
    "accept_paused_total",
    "Times accepting paused, by the limit reached.",
    "reason",
    c.accept_paused,
  );
  if (snap.fds.limit !== undefined) {
    family("open_fds", "gauge", "Open file descriptors.");
    sample("open_fds", snap.fds.open ?? 0);
    family("max_fds", "gauge", "The soft limit on open file descriptors (RLIMIT_NOFILE).");
    sample("max_fds", snap.fds.limit);
  }
  family("bytes_total", "counter", "Bytes relayed, by direction (up: client to backend).");
  sample("bytes_total", snap.bytes.up, { direction: "up" });
  sample("bytes_total", snap.bytes.down, { direction: "down" });
  family("userspace_bytes_total", "counter", "Bytes copied by the proxy process itself.");
  sample("userspace_bytes_total", snap.bytes.userspace);
  const dns = snap.dns;
  if (dns.hits !== undefined) {
    family("dns_cache_total", "counter", "Backend name lookups, by how they were answered.");
    sample("dns_cache_total", dns.hits, { result: "hit" });
    sample("dns_cache_total", dns.negativeHits ?? 0, { result: "negative_hit" });
    sample("dns_cache_total", dns.coalesced ?? 0, { result: "coalesced" });
    sample("dns_cache_total", dns.lookups ?? 0, { result: "miss" });
  }
  for (const [source, counters] of Object.entries(snap.kernel)) {
    for (const [key, value] of Object.entries(counters)) {
      const name = `kernel_${source}_${snake(key)}_total`;
      family(name, "counter", `eBPF ${source} counter ${key} (summed over CPUs).`);
      sample(name, value);
    }
  }
  return out.join("\n") + "\n";
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
