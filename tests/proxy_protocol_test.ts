/**
 * PROXY protocol v1/v2 to backends, end to end: a backend that parses the header per the
 * spec (independently of src/) sees the real client and server addresses, the v2 TLVs a route
 * asks for, then the client's hello byte for byte.
 */
import assert from "node:assert/strict";
import { readToEnd, withProxy } from "./harness/mod.ts";

const chromiumHello = await Deno.readFile(
  new URL("./fixtures/hellos/chromium_pq.bin", import.meta.url),
);
const helloName = "pq.example"; // the name the Chromium fixture asked for

interface Seen {
  header: string | { family: number; src: string; dst: string; sport: number; dport: number };
  /** v2: the TLVs after the addresses, by type, values as text. */
  tlvs: Map<number, string>;
  rest: Uint8Array;
}

/** Decodes a v1 line or a v2 binary header (spec section 2.1 / 2.2). */
function decode(bytes: Uint8Array): Seen {
  const sig = [0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a];
  if (sig.every((b, i) => bytes[i] === b)) {
    assert.equal(bytes[12], 0x21, "version 2, PROXY command");
    const family = bytes[13];
    const len = (bytes[14] << 8) | bytes[15];
    const body = bytes.subarray(16, 16 + len);
    const v6 = family === 0x21;
    assert.ok(family === 0x11 || family === 0x21, `family byte ${family}`);
    const addrLen = v6 ? 36 : 12;
    assert.ok(len >= addrLen, `length ${len} holds the addresses`);
    // TLVs (spec 2.2.7): type, 2-byte length, value, filling the rest of the length exactly
    const tlvs = new Map<number, string>();
    for (let p = addrLen; p < len;) {
      assert.ok(p + 3 <= len, "TLV header within the length");
      const size = (body[p + 1] << 8) | body[p + 2];
      assert.ok(p + 3 + size <= len, "TLV value within the length");
      tlvs.set(body[p], new TextDecoder().decode(body.subarray(p + 3, p + 3 + size)));
      p += 3 + size;
    }
    const n = v6 ? 16 : 4;
    const ip = (b: Uint8Array) =>
      v6
        ? Array.from({ length: 8 }, (_, i) => ((b[2 * i] << 8) | b[2 * i + 1]).toString(16)).join(
          ":",
        )
        : [...b].join(".");
    const dv = new DataView(body.buffer, body.byteOffset, body.length);
    return {
      header: {
        family,
        src: ip(body.subarray(0, n)),
        dst: ip(body.subarray(n, 2 * n)),
        sport: dv.getUint16(2 * n),
        dport: dv.getUint16(2 * n + 2),
      },
      tlvs,
      rest: bytes.subarray(16 + len),
    };
  }
  const end = bytes.indexOf(0x0a);
  assert.ok(end > 0 && bytes[end - 1] === 0x0d, "v1 header ends with CRLF");
  return {
    header: new TextDecoder().decode(bytes.subarray(0, end - 1)),
    tlvs: new Map(),
    rest: bytes.subarray(end + 1),
  };
}

/** A plain TCP backend that records everything the proxy sends on one connection. */
function recordingBackend(hostname: string) {
  const listener = Deno.listen({ hostname, port: 0 });
  const seen = (async () => {
    const conn = await listener.accept();
    // the client sends only the hello and then waits: read until the whole hello is in
    const parts: number[] = [];
    const buf = new Uint8Array(4096);
    while (parts.length < chromiumHello.length + 16) {
      const n = await conn.read(buf);
      if (n === null) break;
      parts.push(...buf.subarray(0, n));
      const d = decode(new Uint8Array(parts));
      if (d.rest.length >= chromiumHello.length) break;
    }
    conn.close();
    listener.close();
    return decode(new Uint8Array(parts));
  })();
  const port = (listener.addr as Deno.NetAddr).port;
  return {
    address: hostname.includes(":") ? `[${hostname}]:${port}` : `${hostname}:${port}`,
    seen,
  };
}

/** What the backend saw of one connection, and the proxy's access-log entry for it. */
interface Via {
  seen: Seen;
  client: Deno.NetAddr;
  server: Deno.NetAddr;
  access: Record<string, unknown>;
}

/** One connection (the Chromium hello) through a proxy whose route has `route`'s fields too. */
async function viaProxy(
  version: "v1" | "v2",
  listen: string,
  connectTo: string,
  backendHost: string,
  route: Record<string, unknown> = {},
): Promise<Via> {
  const backend = recordingBackend(backendHost);
  let result!: Via;
  await withProxy({
    listeners: [{ address: listen }],
    routes: [{ match: helloName, backends: [backend.address], proxy_protocol: version, ...route }],
  }, async (p) => {
    const conn = await Deno.connect({ hostname: connectTo, port: p.port() });
    await conn.write(chromiumHello);
    const seen = await backend.seen;
    await readToEnd(conn).catch(() => {});
    conn.close();
    result = {
      seen,
      client: conn.localAddr as Deno.NetAddr,
      server: conn.remoteAddr as Deno.NetAddr,
      access: await p.waitAccess((e) => e.sni === helloName),
    };
  });
  return result;
}

Deno.test("PROXY v1 over IPv4 names the client and the address it connected to", async () => {
  const { seen, client, server } = await viaProxy("v1", "127.0.0.1:0", "127.0.0.1", "127.0.0.1");
  assert.equal(seen.header, `PROXY TCP4 127.0.0.1 127.0.0.1 ${client.port} ${server.port}`);
  assert.deepEqual(seen.rest, chromiumHello, "the hello follows the header unchanged");
});

Deno.test("PROXY v1 over IPv6", async () => {
  const { seen, client, server } = await viaProxy("v1", "[::1]:0", "::1", "::1");
  assert.equal(seen.header, `PROXY TCP6 ::1 ::1 ${client.port} ${server.port}`);
  assert.deepEqual(seen.rest, chromiumHello);
});

Deno.test("PROXY v2 binary header over IPv4 and IPv6", async () => {
  const v4 = await viaProxy("v2", "127.0.0.1:0", "127.0.0.1", "127.0.0.1");
  assert.deepEqual(v4.seen.header, {
    family: 0x11,
    src: "127.0.0.1",
    dst: "127.0.0.1",
    sport: v4.client.port,
    dport: v4.server.port,
  });
  assert.deepEqual(v4.seen.rest, chromiumHello);
  const v6 = await viaProxy("v2", "[::1]:0", "::1", "::1");
  assert.deepEqual(v6.seen.header, {
    family: 0x21,
    src: "0:0:0:0:0:0:0:1",
    dst: "0:0:0:0:0:0:0:1",
    sport: v6.client.port,
    dport: v6.server.port,
  });
  assert.deepEqual(v6.seen.rest, chromiumHello);
  assert.equal(v6.seen.tlvs.size, 0, "no TLVs unless the route asks");
});

const PP2_TYPE_ALPN = 0x01;
const PP2_TYPE_AUTHORITY = 0x02;
const PP2_TYPE_UNIQUE_ID = 0x05;

Deno.test("PROXY v2 TLVs: the SNI as AUTHORITY, ALPN and a connection id the access log names", async () => {
  const tlvs = ["authority", "alpn", "unique_id"];
  const v4 = await viaProxy("v2", "127.0.0.1:0", "127.0.0.1", "127.0.0.1", {
    proxy_protocol_tlvs: tlvs,
  });
  assert.equal((v4.seen.header as { sport: number }).sport, v4.client.port);
  assert.deepEqual([...v4.seen.tlvs.keys()].sort(), [1, 2, 5]);
  assert.equal(v4.seen.tlvs.get(PP2_TYPE_AUTHORITY), helloName);
  assert.equal(v4.seen.tlvs.get(PP2_TYPE_ALPN), "h2", "Chromium's first offer");
  const id = v4.seen.tlvs.get(PP2_TYPE_UNIQUE_ID)!;
  assert.match(id, /^[0-9a-f]{12}-[0-9a-z]+$/);
  assert.equal(v4.access.conn_id, id, "the access log names the id the backend got");
  assert.deepEqual(v4.seen.rest, chromiumHello, "the hello follows the TLVs unchanged");

  const v6 = await viaProxy("v2", "[::1]:0", "::1", "::1", { proxy_protocol_tlvs: tlvs });
  assert.equal((v6.seen.header as { family: number }).family, 0x21);
  assert.equal(v6.seen.tlvs.get(PP2_TYPE_AUTHORITY), helloName);
  assert.notEqual(v6.seen.tlvs.get(PP2_TYPE_UNIQUE_ID), id, "every connection its own id");
  assert.deepEqual(v6.seen.rest, chromiumHello);
});

Deno.test("PROXY v2 ALPN TLV of an ALPN route is the protocol it matched; only asked TLVs go", async () => {
  const via = await viaProxy("v2", "127.0.0.1:0", "127.0.0.1", "127.0.0.1", {
    alpn: ["http/1.1"],
    proxy_protocol_tlvs: ["alpn"],
  });
  assert.deepEqual([...via.seen.tlvs], [[PP2_TYPE_ALPN, "http/1.1"]]);
  assert.equal(via.access.conn_id, undefined, "no id asked, none logged");
  assert.deepEqual(via.seen.rest, chromiumHello);
});

Deno.test("an IPv4 client on a dual-stack listener is announced as IPv4, not IPv4-mapped", async () => {
  const v1 = await viaProxy("v1", "[::]:0", "127.0.0.1", "127.0.0.1");
  assert.equal(
    v1.seen.header,
    `PROXY TCP4 127.0.0.1 127.0.0.1 ${v1.client.port} ${v1.server.port}`,
  );
  const v2 = await viaProxy("v2", "[::]:0", "127.0.0.1", "127.0.0.1");
  assert.equal((v2.seen.header as { family: number }).family, 0x11);
});

/** Sends `prefix` then the Chromium hello from 127.0.0.1 to a proxy that trusts `trusted`. */
async function fromBalancer(
  prefix: Uint8Array,
  opts: { trusted: string[]; deny?: string[] },
) {
  const backend = recordingBackend("127.0.0.1");
  let outcome!: { seen: Seen | null; access: Record<string, unknown> };
  await withProxy({
    listeners: [{ address: "127.0.0.1:0", accept_proxy_protocol: opts.trusted }],
    routes: [{ match: helloName, backends: [backend.address], proxy_protocol: "v1" }],
    acl: { deny: opts.deny ?? [] },
  }, async (p) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: p.port() });
    await conn.write(new Uint8Array([...prefix, ...chromiumHello]));
    const seen = await Promise.race([
      backend.seen,
      new Promise<null>((r) => setTimeout(() => r(null), 1500)),
    ]);
    await readToEnd(conn).catch(() => {});
    conn.close();
    outcome = { seen, access: await p.waitAccess(() => true) };
  });
  return outcome;
}

const v1Line = (src: string, dst: string, sp: number, dp: number) =>
  new TextEncoder().encode(
    `PROXY ${src.includes(":") ? "TCP6" : "TCP4"} ${src} ${dst} ${sp} ${dp}\r\n`,
  );

Deno.test("a trusted balancer's PROXY v1 header names the client for logs, ACL and the backend", async () => {
  const r = await fromBalancer(v1Line("203.0.113.7", "198.51.100.1", 40000, 443), {
    trusted: ["127.0.0.1/32"],
  });
  assert.equal(r.access.client, "203.0.113.7:40000");
  assert.equal(r.access.close_reason, "done");
  assert.equal(r.seen?.header, "PROXY TCP4 203.0.113.7 198.51.100.1 40000 443");
  assert.deepEqual(r.seen?.rest, chromiumHello);
});

Deno.test("a trusted balancer's PROXY v2 header (IPv6 client) is understood", async () => {
  const body = new Uint8Array(36);
  body.set([0x20, 0x01, 0x0d, 0xb8], 0); // 2001:db8::5
  body[15] = 5;
  body.set([0x20, 0x01, 0x0d, 0xb8], 16); // 2001:db8::1
  body[31] = 1;
  new DataView(body.buffer).setUint16(32, 50000);
  new DataView(body.buffer).setUint16(34, 443);
  const header = new Uint8Array([
    0x0d,
    0x0a,
    0x0d,
    0x0a,
    0x00,
    0x0d,
    0x0a,
    0x51,
    0x55,
    0x49,
    0x54,
    0x0a,
    0x21,
    0x21,
    0,
    36,
    ...body,
  ]);
  const r = await fromBalancer(header, { trusted: ["127.0.0.0/8"] });
  assert.equal(r.access.client, "[2001:db8:0:0:0:0:0:5]:50000");
  assert.match(
    String(r.seen?.header),
    /^PROXY TCP6 2001:db8:0:0:0:0:0:5 2001:db8:0:0:0:0:0:1 50000 443$/,
  );
});

Deno.test("the ACL applies to the client the header names, not to the balancer", async () => {
  const r = await fromBalancer(v1Line("203.0.113.7", "198.51.100.1", 40000, 443), {
    trusted: ["127.0.0.1/32"],
    deny: ["203.0.113.0/24"],
  });
  assert.equal(r.seen, null, "nothing reaches the backend");
  assert.equal(r.access.close_reason, "acl_denied");
  assert.equal(r.access.client, "203.0.113.7:40000");
});

Deno.test("a trusted source without a header is refused; an untrusted one's header is not believed", async () => {
  const missing = await fromBalancer(new Uint8Array(), { trusted: ["127.0.0.1/32"] });
  assert.equal(missing.access.close_reason, "bad_proxy_header");
  const untrusted = await fromBalancer(v1Line("203.0.113.7", "198.51.100.1", 1, 2), {
    trusted: ["10.0.0.0/8"],
  });
  assert.equal(untrusted.access.close_reason, "bad_client_hello");
  assert.match(String(untrusted.access.client), /^127\.0\.0\.1:/);
});
