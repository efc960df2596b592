/** Which backend addresses the proxy may dial: internal kinds, opt-ins, its own listeners. */
import assert from "node:assert/strict";
import { parseCidr, parseIpWords } from "../src/route/acl.ts";
import { DialGuard, internalKind, type InternalPolicy } from "../src/route/dialguard.ts";

const policy = (allowPrivate: boolean, allowAddresses: string[] = []): InternalPolicy => ({
  allowPrivate,
  allowAddresses: allowAddresses.map(parseCidr),
  path: "routes[0]",
});

Deno.test("internal addresses by kind; public ones, and what NAT64 and 6to4 carry", () => {
  const cases: [string, string | null][] = [
    ["127.0.0.1", "loopback"],
    ["127.255.0.9", "loopback"],
    ["10.1.2.3", "private"],
    ["172.16.0.1", "private"],
    ["172.31.255.255", "private"],
    ["172.32.0.1", null],
    ["192.168.1.1", "private"],
    ["100.64.0.1", "private"],
    ["169.254.169.254", "link_local"],
    ["0.0.0.0", "unspecified"],
    ["224.0.0.1", "multicast"],
    ["255.255.255.255", "reserved"],
    ["8.8.8.8", null],
    ["::1", "loopback"],
    ["::", "unspecified"],
    ["fd00::1", "private"],
    ["fe80::1", "link_local"],
    ["ff02::1", "multicast"],
    ["2001:4860:4860::8888", null],
    ["::ffff:127.0.0.1", "loopback"], // IPv4-mapped
    ["::ffff:7f00:1", "loopback"],
    ["64:ff9b::a00:1", "private"], // NAT64 of 10.0.0.1
    ["64:ff9b::808:808", null],
    ["2002:7f00:1::1", "loopback"], // 6to4 of 127.0.0.1
    ["2002:808:808::1", null],
  ];
  for (const [address, kind] of cases) {
    assert.equal(internalKind(parseIpWords(address)!), kind, address);
  }
});

Deno.test("a $sni backend's internal addresses need the route's opt-in; configured ones do not", () => {
  const guard = new DialGuard([]);
  assert.equal(guard.check("127.0.0.1", 443, policy(false)), "loopback");
  assert.equal(guard.check("::1", 443, policy(false)), "loopback");
  assert.equal(guard.check("8.8.8.8", 443, policy(false)), null);
  assert.equal(guard.check("127.0.0.1", 443, policy(true)), null);
  assert.equal(guard.check("127.0.0.1", 443, null), null, "a configured backend");
  const some = policy(false, ["10.0.0.0/8"]);
  assert.equal(guard.check("10.9.9.9", 443, some), null);
  assert.equal(guard.check("192.168.1.1", 443, some), "private");
  assert.equal(guard.check("127.0.0.1", 443, some), "loopback");
});

Deno.test("the proxy's own listening sockets are never dialled, opt-in or not", () => {
  const guard = new DialGuard([
    { hostname: "127.0.0.1", port: 8443 },
    { hostname: "0.0.0.0", port: 9443 },
    { hostname: "::", port: 7443 },
  ]);
  const any = policy(true);
  assert.equal(guard.check("127.0.0.1", 8443, null), "own_listener");
  assert.equal(guard.check("127.0.0.1", 8443, any), "own_listener");
  assert.equal(guard.check("::ffff:127.0.0.1", 8443, any), "own_listener");
  assert.equal(guard.check("127.0.0.2", 8443, any), null, "another address, not ours");
  assert.equal(guard.check("127.0.0.1", 8444, any), null, "another port");
  assert.equal(guard.check("127.0.0.2", 9443, any), "own_listener", "0.0.0.0 takes loopback");
  assert.equal(guard.check("::1", 9443, any), null, "0.0.0.0 takes no IPv6");
  assert.equal(guard.check("::1", 7443, any), "own_listener");
  assert.equal(guard.check("127.0.0.1", 7443, any), "own_listener", "[::] is dual-stack");
  assert.equal(guard.check("0.0.0.0", 8443, null), "own_listener", "0.0.0.0 reaches this host");
  const local = Deno.networkInterfaces().find((i) =>
    i.family === "IPv4" && !i.address.startsWith("127.")
  );
  if (local) assert.equal(guard.check(local.address, 9443, any), "own_listener", local.address);
});
