/**
 * The end-to-end test harness: certificates made at test time, real TLS and HTTP backends that
 * say who they are, the real proxy as a child process (`deno run main.ts`, ready by its
 * `--ready-fd` line), and real clients (Deno TLS, node:net, openssl s_client, curl); kernel-mode
 * and network-namespace helpers for the tests that run as root. Each concern is a module here;
 * tests import them from this one.
 *
 * @module
 */
export * from "./scope.ts";
export * from "./certs.ts";
export * from "./bytes.ts";
export * from "./backends.ts";
export * from "./hello.ts";
export * from "./clients.ts";
export * from "./configs.ts";
export * from "./process.ts";
export * from "./access_log.ts";
export * from "./metrics.ts";
export * from "./kernel.ts";
export * from "./syscalls.ts";
export * from "./netns.ts";
