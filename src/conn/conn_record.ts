/**
 * What is known of one connection and what becomes of it: why it ended, the admin API's view
 * while it lives, and the byte counts of its kernel-mode part.
 *
 * @module
 */
import type { RelayEnd } from "./relay.ts";

/** Why a session ended, as written to the access log. */
export type CloseReason =
  | RelayEnd
  | "client_hello_timeout"
  | "bad_client_hello"
  | "no_route"
  | "connect_failed"
  | "no_backend"
  | "address_denied"
  | "resource_exhausted"
  | "bad_proxy_header"
  | "acl_denied"
  | "fingerprint_denied"
  | "backend_full"
  | "source_connections"
  | "source_rate"
  | "admin";

/** One live session as the admin API lists it. */
export interface SessionInfo {
  client: string;
  listener: string;
  table: string;
  sni: string | null;
  /** The route's `match`, `default_backend`, or null while not routed yet. */
  route: string | null;
  /** As dialled (a `$sni` backend by the requested name), or null while not connected. */
  backend: string | null;
  /** As configured (`$sni:443`): what drain / disable name. */
  backend_config: string | null;
  age_ms: number;
  /** Bytes so far (in `ebpf.splice_mode` "sockmap" the kernel's are counted at the end only). */
  bytes_up: number;
  bytes_down: number;
  mode: "userspace" | "kernel";
}

/** Bytes of each direction: `up` client → backend, `down` backend → client. */
export interface ByteCounts {
  up: number;
  down: number;
}

/** What the record reads of a connection's kernel-mode part (src/conn/kernel_handoff.ts). */
export interface KernelPart {
  /** "kernel" once the kernel relays the pair. */
  readonly mode: "userspace" | "kernel";
  /** Bytes the kernel redirected each way (known once the pairing is removed). */
  readonly kernelBytes: ByteCounts;
  /** Bytes known not delivered when a stalled drain cut the connection. */
  readonly undelivered: ByteCounts;
}
