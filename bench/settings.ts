/**
 * The bench's command line, read once into {@link Settings}, and the issue's {@link TARGETS}.
 *
 * @module
 */
import { parseArgs } from "node:util";
import type { BusyOptions, WrkOptions } from "./load.ts";
import type { QuicOptions } from "./quic.ts";
import type { StarveOptions } from "./starve.ts";
import { DEFAULT_COLUMNS } from "./subjects.ts";

/** The usage line printed by `--help`. */
export const USAGE = "usage: deno task bench [--quick] [--modes " +
  "direct,userspace,kernel,sockmap,nginx-stream,haproxy,workers] [--idle N] [--busy N] " +
  "[--busy-rate 1m] [--starve N] [--starve-seconds S] [--churn N] [--syscall-seconds S] " +
  "[--duration 5s] [--rounds 3] [--quic N] [--quic-only] [--idle-only]";

/** The numbers in issue 18's targets (see targetRows in report.ts). */
export const TARGETS = {
  /** proxy CPU per new connection and per keep-alive request: at most this times the peer's */
  cpuVsBetterPeer: 0.9,
  idleTotalConns: 10_000,
  idleTotalMB: 60,
  /** short connections of the churn test */
  churnConns: 50_000,
  /** RSS 15 s after them, at most this % of the baseline ("back within 10 %") */
  churnSettledPct: 110,
  /** duplex transfers of the starvation test */
  starveTransfers: 200,
};

/** What one run measures and how long, from its command line. */
export interface Settings {
  /** `--help`: print the usage and do nothing else */
  help: boolean;
  /** The exact command of this run, for the header. */
  command: string;
  /** The columns asked for (`--modes`), as given. */
  modes: string[];
  /** `--idle-only`: only the idle-connection test */
  idleOnly: boolean;
  /**
   * Idle connections. The target is about 10,000, but a process may open 20,000 descriptors
   * here and a proxied connection takes two: 9,000 is what fits with the proxy's descriptor
   * reserve.
   */
  idleConns: number;
  /** Bulk transfers running during the busy test. */
  busyConns: number;
  /** Size of one bulk download. */
  bigBytes: number;
  /** Rounds of bulk + keep-alive + new-connection runs, every column once per round. */
  rounds: number;
  wrk: WrkOptions;
  /**
   * The busy test: new connections, 4 at a time, while `busyConns` downloads run, each sent by
   * nginx at a fixed rate (the same offered load for every column, below what each column
   * moves at full speed).
   */
  busy: BusyOptions;
  /** New connections every 50 ms while duplex transfers run unthrottled (0 transfers: skip). */
  starve: StarveOptions;
  /** Short connections of the churn test, on a fresh instance of each subject (0: skip). */
  churnConns: number;
  /** Seconds of new connections counted with perf for syscalls per connection (0: skip). */
  syscallSeconds: number;
  /** The QUIC test (`--quic N`: N short downloads, new flows; 0: skip). */
  quic: QuicOptions;
  /** `--quic-only`: only the QUIC test */
  quicOnly: boolean;
}

/** Reads the command line; throws on an unknown flag. */
export function parseSettings(argv: string[]): Settings {
  const args = parseArgs({
    args: argv,
    options: {
      quick: { type: "boolean", default: false },
      idle: { type: "string" },
      busy: { type: "string", default: "200" },
      "busy-rate": { type: "string", default: "1m" },
      starve: { type: "string", default: String(TARGETS.starveTransfers) },
      "starve-seconds": { type: "string" },
      churn: { type: "string" },
      "syscall-seconds": { type: "string", default: "2" },
      modes: { type: "string", default: DEFAULT_COLUMNS.join(",") },
      duration: { type: "string" },
      rounds: { type: "string" },
      "idle-only": { type: "boolean", default: false },
      quic: { type: "string" },
      "quic-only": { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  }).values;
  const busyConns = Number(args.busy);
  return {
    help: args.help,
    command: ["deno task bench", ...argv].join(" "),
    modes: args.modes.split(",").map((s) => s.trim()).filter(Boolean),
    idleOnly: args["idle-only"],
    idleConns: Number(args.idle ?? (args.quick ? 2000 : 9000)),
    busyConns,
    bigBytes: (args.quick ? 256 : 1024) * 2 ** 20,
    rounds: Number(args.rounds ?? (args.quick ? 2 : 3)),
    wrk: { threads: 1, connections: 50, duration: args.duration ?? (args.quick ? "2s" : "5s") },
    busy: {
      bulkConns: busyConns,
      bulkRate: args["busy-rate"],
      seconds: args.quick ? 3 : 5,
      concurrency: 4,
    },
    starve: {
      transfers: Number(args.starve),
      seconds: Number(args["starve-seconds"] ?? (args.quick ? 4 : 10)),
    },
    churnConns: Number(args.churn ?? (args.quick ? 10_000 : TARGETS.churnConns)),
    syscallSeconds: Number(args["syscall-seconds"]),
    quic: {
      flows: Number(args.quic ?? (args.quick ? 60 : 300)),
      downloads: args.quick ? 2 : 3,
      fileBytes: (args.quick ? 16 : 64) * 2 ** 20,
      handshakes: args.quick ? 8 : 20,
    },
    quicOnly: args["quic-only"],
  };
}
