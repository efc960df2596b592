/**
 * The ALPN TLV of a PROXY v2 header carries the protocol name's bytes as the client sent them:
 * the ClientHello parser reads a name as one character per byte, so the header writes one byte
 * per character (UTF-8 would turn a byte 0x80–0xff, e.g. a GREASE value 0xcaca, into two).
 */
import assert from "node:assert/strict";
import { proxyHeader } from "../src/proto/proxyproto.ts";
import { latin1String } from "../src/net/bytes.ts";

Deno.test("the PROXY v2 ALPN TLV holds the client's ALPN bytes, also those over 0x7f", () => {
  const offered = new Uint8Array([0xca, 0xca, 0x68, 0x32, 0xff]);
  const alpn = latin1String(offered, 0, offered.length);
  const addr = (port: number): Deno.NetAddr => ({ transport: "tcp", hostname: "127.0.0.1", port });
  const h = proxyHeader("v2", addr(1000), addr(443), { alpn, authority: "a.test" });
  const tlvs = h.subarray(16 + 12);
  assert.deepEqual([...tlvs.subarray(0, 3 + offered.length)], [
    0x01,
    0,
    offered.length,
    ...offered,
  ]);
  assert.deepEqual([...tlvs.subarray(3 + offered.length, 6 + offered.length)], [0x02, 0, 6]);
  assert.equal(new TextDecoder().decode(tlvs.subarray(6 + offered.length)), "a.test");
  assert.equal((h[14] << 8) | h[15], 12 + tlvs.length, "the length covers the TLVs");
});
