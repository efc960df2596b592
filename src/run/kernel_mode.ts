/**
 * What every proxy process needs to know of kernel mode without loading it: the mode the config
 * asks for and the log the eBPF loaders write to. The eBPF parts themselves (src/run/accel.ts and
 * the loaders and libbpf bindings behind it) are imported only by a process that opens them, so a
 * userspace-mode proxy does not carry their code.
 *
 * @module
 */
import type { Config } from "../config/mod.ts";
import type { EbpfLog } from "../ebpf/loader.ts";
import { logger } from "../ops/log.ts";

/** An eBPF loader's log, into the LogTape category `category`. */
export function ebpfLog(category: string): EbpfLog {
  const to = logger(category);
  return (level, message) => to[level === "warning" ? "warn" : level](message);
}

/**
 * How the config asks kernel mode to move bytes: through splice(2) pipes, the eBPF sockmap, or
 * not at all (userspace mode).
 */
export function kernelMode(config: Config): "pipe" | "sockmap" | null {
  if (!config.ebpf.enabled || !config.ebpf.sockmapEnabled) return null;
  return config.ebpf.spliceMode;
}
