/**
 * Micro-benchmark of the QUIC Initial reader (src/proto/quic.ts) on the captured first flights
 * of tests/fixtures/quic: the cost of classifying a datagram (every datagram of the hot path),
 * of a one-datagram hello (gtlsclient: key derivation, one decryption, the hello parse) and of
 * Chromium's two-datagram post-quantum hello, with and without fingerprints.
 *
 *   deno bench bench/quic_reader_bench.ts
 *
 * @module
 */
import { classifyDatagram, QuicInitialReader } from "../src/proto/quic.ts";
import { InitialOpener } from "../src/proto/quic_crypto.ts";

const dir = new URL("../tests/fixtures/quic/", import.meta.url);

function datagrams(file: string): Uint8Array[] {
  const b = Deno.readFileSync(new URL(file, dir));
  const out: Uint8Array[] = [];
  for (let at = 0; at + 2 <= b.length; at += 2 + ((b[at] << 8) | b[at + 1])) {
    out.push(b.subarray(at + 2, at + 2 + ((b[at] << 8) | b[at + 1])));
  }
  return out;
}

const gtls = datagrams("gtlsclient.bin");
const chromium = datagrams("chromium.bin").slice(0, 2);
const short = new Uint8Array(1200);
short[0] = 0x41;

Deno.bench("classifyDatagram: an Initial", () => {
  classifyDatagram(chromium[0]);
});

Deno.bench("classifyDatagram: a short header", () => {
  classifyDatagram(short);
});

Deno.bench("Initial keys of one Destination Connection ID", () => {
  new InitialOpener(1, gtls[0].subarray(6, 6 + gtls[0][5]));
});

Deno.bench("gtlsclient hello: 1 datagram, 1 Initial", () => {
  const r = new QuicInitialReader({ maxBytes: 16384 });
  if (r.push(gtls[0]).kind !== "hello") throw new Error("no hello");
});

Deno.bench("Chromium post-quantum hello: 2 datagrams, 2 Initials", () => {
  const r = new QuicInitialReader({ maxBytes: 16384 });
  r.push(chromium[0]);
  if (r.push(chromium[1]).kind !== "hello") throw new Error("no hello");
});

Deno.bench("Chromium post-quantum hello with JA4 and JA3", () => {
  const r = new QuicInitialReader({ maxBytes: 16384, fingerprint: true });
  r.push(chromium[0]);
  if (r.push(chromium[1]).kind !== "hello") throw new Error("no hello");
});
