/**
 * Which errors mean "out of a local resource": descriptors, buffers, memory, source ports. Such a
 * failure is this host's, not the far end's, so it must never count against a backend's health.
 *
 * @module
 */

/** errno values of failures that are this host's, not the far end's. */
const LOCAL_ERRNOS: Record<number, string> = {
  12: "ENOMEM",
  23: "ENFILE",
  24: "EMFILE",
  99: "EADDRNOTAVAIL",
  105: "ENOBUFS",
};
const LOCAL_CODES = new Set(Object.values(LOCAL_ERRNOS));

/**
 * The errno name (`EMFILE`) when `e`, or an error it was caused by (a DNS query's socket, say),
 * failed for lack of a local resource: descriptors, buffers, memory, source ports. Null for any
 * other failure.
 */
export function localResourceError(e: unknown): string | null {
  let x = e;
  for (let depth = 0; x instanceof Error && depth < 4; depth++, x = x.cause) {
    const code = (x as { code?: unknown }).code;
    if (typeof code === "string" && LOCAL_CODES.has(code)) return code;
    const os = /\(os error (\d+)\)/.exec(x.message);
    if (os && LOCAL_ERRNOS[Number(os[1])]) return LOCAL_ERRNOS[Number(os[1])];
  }
  return null;
}

/** What to do about a {@link localResourceError}, for log lines. */
export function localResourceHint(code: string): string {
  switch (code) {
    case "EMFILE":
      return "Raise the descriptor limit (LimitNOFILE, ulimit -n) or lower limits.max_connections.";
    case "ENFILE":
      return "The system-wide descriptor table is full: raise fs.file-max.";
    case "EADDRNOTAVAIL":
      return "Out of source ports: widen net.ipv4.ip_local_port_range, " +
        "set net.ipv4.tcp_tw_reuse=1.";
    default:
      return "The kernel is short of memory for sockets.";
  }
}
