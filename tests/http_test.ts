/**
 * HTTP/1.x Host parser: routing names from real curl requests captured at test time and from
 * hand-written heads, fed whole, split everywhere and byte by byte; bad, oversized, truncated
 * and non-HTTP input (a real TLS ClientHello included).
 */
import assert from "node:assert/strict";
import {
  HttpHostParser,
  HttpRequestError,
  type HttpRequestErrorKind,
  type HttpRequestHead,
} from "../src/proto/http.ts";

const ascii = (s: string) => new TextEncoder().encode(s);

function outcome(bytes: Uint8Array, max?: number): HttpRequestErrorKind | HttpRequestHead {
  const p = new HttpHostParser(max);
  try {
    p.push(bytes);
    return p.end();
  } catch (e) {
    if (e instanceof HttpRequestError) return e.kind;
    throw e;
  }
}

const host = (head: string) => {
  const r = outcome(ascii(head));
  return typeof r === "string" ? r : r.serverName;
};

/** Records what one curl request sends to a plain-HTTP listener on 127.0.0.1. */
async function captureCurl(args: (port: number) => string[]): Promise<Uint8Array> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const child = new Deno.Command("curl", {
    args: ["-s", "--max-time", "10", ...args(listener.addr.port)],
    stdout: "null",
    stderr: "null",
  }).spawn();
  try {
    const conn = await listener.accept();
    const buf = new Uint8Array(8192);
    let got = new Uint8Array(0);
    while (!new TextDecoder().decode(got).includes("\r\n\r\n")) {
      const n = await conn.read(buf);
      if (n === null) break;
      const next = new Uint8Array(got.length + n);
      next.set(got);
      next.set(buf.subarray(0, n), got.length);
      got = next;
    }
    conn.close();
    return got;
  } finally {
    listener.close();
    try {
      child.kill("SIGKILL");
    } catch { /* exited */ }
    await child.status;
  }
}

/** Whole, every two-piece split and byte by byte: the same head, null before the blank line. */
function assertEverySplit(bytes: Uint8Array, expect: HttpRequestHead) {
  for (let cut = 0; cut <= bytes.length; cut++) {
    const p = new HttpHostParser();
    const first = p.push(bytes.subarray(0, cut));
    if (cut < expect.headBytes) assert.equal(first, null, `cut at ${cut}`);
    else assert.deepEqual(first, expect, `cut at ${cut}`);
    assert.deepEqual(p.push(bytes.subarray(cut)), expect, `cut at ${cut}`);
    assert.deepEqual(p.data, bytes);
    assert.deepEqual(p.end(), expect);
  }
  const p = new HttpHostParser();
  for (let i = 0; i < bytes.length; i++) {
    const r = p.push(bytes.subarray(i, i + 1));
    if (i + 1 < expect.headBytes) assert.equal(r, null, `byte ${i}`);
    else assert.deepEqual(r, expect, `byte ${i}`);
  }
  assert.deepEqual(p.data, bytes);
}

Deno.test("real curl requests route by their Host, fed whole, split anywhere and byte by byte", async () => {
  const plain = await captureCurl((port) => [
    "--resolve",
    `Www.Curl.Example:${port}:127.0.0.1`,
    `http://Www.Curl.Example:${port}/path?q=1`,
  ]);
  const text = new TextDecoder().decode(plain);
  assert.match(text, /^GET \/path\?q=1 HTTP\/1\.1\r\n/);
  assertEverySplit(plain, { serverName: "www.curl.example", headBytes: plain.length });

  const post = await captureCurl((port) => [
    "--http1.0",
    "-H",
    "Host:",
    "--data-binary",
    "body-bytes",
    `http://127.0.0.1:${port}/`,
  ]);
  const head = new TextDecoder().decode(post).indexOf("\r\n\r\n") + 4;
  assert.ok(head < post.length, "curl sent the body with the head");
  assertEverySplit(post, { serverName: null, headBytes: head });
});

Deno.test("Host: case, trailing dot, ports and IPv6 literals are normalized", () => {
  const get = (h: string) => host(`GET / HTTP/1.1\r\nHost: ${h}\r\n\r\n`);
  assert.equal(get("Example.COM"), "example.com");
  assert.equal(get("example.com."), "example.com");
  assert.equal(get("example.com:8080"), "example.com");
  assert.equal(get("example.com.:80"), "example.com");
  assert.equal(get("127.0.0.1:8080"), "127.0.0.1");
  assert.equal(get("[::1]:8080"), "::1");
  assert.equal(get("[2001:DB8::1]"), "2001:db8::1");
  assert.equal(get("_svc.a-b.test"), "_svc.a-b.test");
  assert.equal(host("GET / HTTP/1.1\r\nHOST:\t a.test \t\r\n\r\n"), "a.test");
  assert.equal(host("GET / HTTP/1.1\r\nhost:a.test\r\nX-A: b\r\n\r\n"), "a.test");
});

Deno.test("bad Host values and duplicate Host headers are 'bad_host'", () => {
  const get = (h: string) => host(`GET / HTTP/1.1\r\nHost: ${h}\r\n\r\n`);
  for (
    const bad of [
      "",
      "a b",
      "a..b",
      ".a",
      "a/b",
      "user@a.test",
      "a.test:",
      "a.test:http",
      "a.test:123456",
      "a.test:80:80",
      "[::1",
      "[::1]x",
      "[]",
      "[a.test]",
      "caf\u00e9.test",
      "a".repeat(64) + ".test",
    ]
  ) {
    assert.equal(get(bad), "bad_host", JSON.stringify(bad));
  }
  assert.equal(
    host("GET / HTTP/1.1\r\nHost: a.test\r\nhost: b.test\r\n\r\n"),
    "bad_host",
  );
  assert.equal(host("GET / HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n"), "bad_host");
});

Deno.test("no Host: null for HTTP/1.0, 'bad_host' for HTTP/1.1 (RFC 9112 3.2)", () => {
  assert.deepEqual(outcome(ascii("GET / HTTP/1.0\r\n\r\n")), { serverName: null, headBytes: 18 });
  assert.equal(host("GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"), null);
  assert.equal(host("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"), "bad_host");
});

Deno.test("an absolute-form target's host wins over the Host header (RFC 9112 3.2.2)", () => {
  assert.equal(host("GET http://A.test:8080/x HTTP/1.1\r\nHost: b.test\r\n\r\n"), "a.test");
  assert.equal(host("GET https://[::1]/ HTTP/1.0\r\n\r\n"), "::1");
  assert.equal(host("GET http://u@a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"), "bad_host");
});

Deno.test("bare LF line ends are accepted; headBytes counts the head only", () => {
  const bytes = ascii("GET / HTTP/1.1\nHost: lf.test\n\nBODY");
  assertEverySplit(bytes, { serverName: "lf.test", headBytes: bytes.length - 4 });
  assert.equal(host("GET / HTTP/1.1\r\nHost: mixed.test\n\r\n"), "mixed.test");
});

Deno.test("TLS bytes, binary and non-HTTP lines are 'not_http', from the first byte when possible", () => {
  const hello = Deno.readFileSync(new URL("./fixtures/hellos/curl_http2.bin", import.meta.url));
  const p = new HttpHostParser();
  assert.throws(
    () => p.push(hello.subarray(0, 1)),
    (e) => (e as HttpRequestError).kind === "not_http",
  );
  assert.equal(outcome(hello), "not_http");
  for (
    const bad of [
      " GET / HTTP/1.1\r\n\r\n",
      "G(T / HTTP/1.1\r\n\r\n",
      "GET / HTTP/2.0\r\n\r\n",
      "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
      "GET /\r\n\r\n",
      "GET  / HTTP/1.1\r\n\r\n",
      "GET / HTTP/1.1 \r\n\r\n",
      "GET / HTTP/1.1\r\nHost : a.test\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: a.test\r\n folded\r\n\r\n",
      "GET / HTTP/1.1\r\nno colon\r\n\r\n",
      "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
      "\r\n\r\n",
      "A".repeat(40) + " / HTTP/1.1\r\n\r\n",
    ]
  ) {
    assert.equal(outcome(ascii(bad)), "not_http", JSON.stringify(bad));
  }
  assert.equal(outcome(new Uint8Array([0x47, 0x45, 0x54, 0x00])), "not_http");
});

Deno.test("a head over maxBytes is 'too_large' once that many bytes arrive without a blank line", () => {
  const big = ascii("GET / HTTP/1.1\r\nHost: a.test\r\nX-Big: " + "x".repeat(20000) + "\r\n\r\n");
  assert.equal(outcome(big), "too_large");
  const p = new HttpHostParser();
  assert.equal(p.push(big.subarray(0, 16383)), null);
  assert.throws(
    () => p.push(big.subarray(16383, 16384)),
    (e) => (e as HttpRequestError).kind === "too_large",
  );
  const small = ascii("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
  assert.equal(outcome(small, small.length - 1), "too_large");
  assert.equal((outcome(small, small.length) as HttpRequestHead).serverName, "a.test");
  // body bytes beyond the limit do not matter once the head is complete
  const withBody = new Uint8Array(small.length + 50000);
  withBody.set(small);
  assert.equal((outcome(withBody) as HttpRequestHead).headBytes, small.length);
});

Deno.test("EOF before the blank line is 'truncated' at every byte", () => {
  const bytes = ascii("GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
  for (let cut = 0; cut < bytes.length; cut++) {
    const p = new HttpHostParser();
    assert.equal(p.push(bytes.subarray(0, cut)), null);
    assert.throws(() => p.end(), (e) => (e as HttpRequestError).kind === "truncated");
  }
});

Deno.test("random bytes and mutated requests only ever throw HttpRequestError", () => {
  let seed = 7;
  const rand = () => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed / 0x80000000;
  };
  const base = ascii("GET /a HTTP/1.1\r\nHost: Route.Example:8080\r\nUser-Agent: t\r\n\r\nbody");
  for (let round = 0; round < 3000; round++) {
    const b = base.slice();
    for (let e = 0; e < 1 + Math.floor(rand() * 3); e++) {
      b[Math.floor(rand() * b.length)] = Math.floor(rand() * 256);
    }
    const p = new HttpHostParser(round % 5 === 0 ? 1 + Math.floor(rand() * 60) : undefined);
    try {
      for (let i = 0; i < b.length;) {
        const to = i + 1 + Math.floor(rand() * 10);
        p.push(b.subarray(i, to));
        i = to;
      }
      const r = p.end();
      assert.ok(r.serverName === null || /^[a-z0-9_.:-]+$/.test(r.serverName), r.serverName ?? "");
    } catch (e) {
      if (!(e instanceof HttpRequestError)) throw new Error(`round ${round}: ${e}`, { cause: e });
    }
  }
});
