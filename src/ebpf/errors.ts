/**
 * The errors and log type of the eBPF parts, apart from their loaders: what code that may meet
 * them (a session's kernel handoff, the DNS cache) needs without loading libbpf's bindings.
 *
 * @module
 */

/** Log sink of a loader (same levels as the proxy's logger). */
export type EbpfLog = (level: "debug" | "info" | "warning" | "error", message: string) => void;

/** Why an eBPF feature is unavailable or failed: `message` names the cause and the fix. */
export class EbpfError extends Error {
  /** Short machine-readable cause, e.g. `not_root`, `no_libbpf`, `load_failed`. */
  readonly reason: string;
  /** What the operator can do about it. */
  readonly fix: string;
  /** The network interface concerned, when there is one. */
  readonly interface?: string;
  constructor(
    reason: string,
    cause: string,
    fix: string,
    options?: { cause?: unknown; interface?: string },
  ) {
    super(`${cause}; ${fix}`, options);
    this.name = "EbpfError";
    this.reason = reason;
    this.fix = fix;
    this.interface = options?.interface;
  }
}

/** Why the sockmap fast path (or the pinned DNS cache) is unavailable. */
export class KernelAccelError extends EbpfError {
  override name = "KernelAccelError";
}
