/**
 * Byte strings as text (src/net/bytes.ts), as the ClientHello parser takes a server name and
 * ALPN names: one character per byte (ISO-8859-1, so JA4 sees an ALPN name's real bytes; a
 * "latin1" TextDecoder is windows-1252 and maps 0x80–0x9f elsewhere), for every byte value and
 * length, host names in lower case.
 */
import assert from "node:assert/strict";
import { latin1String } from "../src/net/bytes.ts";

const lowerAscii = (b: Uint8Array, s: number, e: number) => latin1String(b, s, e, true);
/** What lowering ASCII letters only gives. */
const asciiLower = (t: string) => t.replace(/[A-Z]/g, (c) => c.toLowerCase());

/** One character per byte, the slow obvious way. */
const charPerByte = (b: Uint8Array) => Array.from(b, (c) => String.fromCharCode(c)).join("");

Deno.test("byte strings read as one character per byte, at every length and offset", () => {
  const b = new Uint8Array(1200);
  for (let i = 0; i < b.length; i++) b[i] = (i * 37 + 11) & 0xff;
  for (const len of [0, 1, 2, 63, 64, 255, 256, 257, 300, 513, 1000]) {
    for (const start of [0, 7, 150]) {
      const want = charPerByte(b.subarray(start, start + len));
      assert.equal(latin1String(b, start, start + len), want, `len ${len} at ${start}`);
      assert.equal(lowerAscii(b, start, start + len), asciiLower(want), `lower ${len}`);
    }
  }
});

Deno.test("host names come out in lower case; other bytes are left as they are", () => {
  const name = new TextEncoder().encode("xxWWW.Example-HOST_1.COM.");
  assert.equal(lowerAscii(name, 2, name.length - 1), "www.example-host_1.com");
  const odd = Uint8Array.of(0x40, 0x41, 0x5a, 0x5b, 0x60, 0x61, 0x7a, 0x7b, 0xc0, 0xff);
  assert.equal(lowerAscii(odd, 0, odd.length), "@az[`az{\u00c0\u00ff");
  // longer than one step: made in pieces
  const long = new Uint8Array(400).fill(0x41);
  assert.equal(lowerAscii(long, 0, 400), "a".repeat(400));
});
