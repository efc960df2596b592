/** Which errors are this host's own (out of a local resource), not the far end's. */
import assert from "node:assert/strict";
import { DnsError } from "../src/dnscache.ts";
import { localResourceError } from "../src/fdbudget.ts";

Deno.test("local resource errors are told from the far end's, also behind a cause", () => {
  const emfile = Object.assign(new Error("Too many open files (os error 24)"), { code: "EMFILE" });
  assert.equal(localResourceError(emfile), "EMFILE");
  assert.equal(
    localResourceError(new Error("Cannot assign requested address (os error 99)")),
    "EADDRNOTAVAIL",
  );
  assert.equal(
    localResourceError(new Error("No buffer space available (os error 105)")),
    "ENOBUFS",
  );
  const dns = new DnsError("server_failure", "a.test", "A query: failed", { cause: emfile });
  assert.equal(localResourceError(dns), "EMFILE", "a DNS query that had no socket");
  const refused = Object.assign(new Error("Connection refused (os error 111)"), {
    code: "ECONNREFUSED",
  });
  assert.equal(localResourceError(refused), null);
  assert.equal(localResourceError(new Error("timed out after 5000 ms")), null);
  assert.equal(localResourceError("EMFILE"), null, "only errors");
});
