/**
 * Errors as log lines and the access log write them.
 *
 * @module
 */

/** A short text for an error, for logs: its message, after its class name unless a plain Error. */
export function errText(e: unknown): string {
  return e instanceof Error ? `${e.name === "Error" ? "" : e.name + ": "}${e.message}` : String(e);
}
