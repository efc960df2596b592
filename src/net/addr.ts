/**
 * Socket addresses as the logs and the access log write them.
 *
 * @module
 */

/** `host:port` with brackets around IPv6 hosts. */
export function formatAddr(addr: Deno.Addr): string {
  const a = addr as Deno.NetAddr;
  return a.hostname.includes(":") ? `[${a.hostname}]:${a.port}` : `${a.hostname}:${a.port}`;
}
