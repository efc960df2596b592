/**
 * Binding of the system libbpf (libbpf.so.1, libbpf >= 1.0) over Deno FFI.
 *
 * One typed symbol table, small classes that own what they wrap and free it (`Symbol.dispose`),
 * and {@link BpfError} for every failure. Error conventions of libbpf 1.x: calls returning a
 * pointer return NULL and set errno (read at once, before any other call); calls returning int
 * return -errno. No proxy logic lives here.
 * @module
 */

export * from "./libbpf/core.ts";
export * from "./libbpf/object.ts";
export * from "./libbpf/fd.ts";
export * from "./libbpf/link.ts";
