/** The descriptor budget: its limit and count, and which errors are this host's own. */
import assert from "node:assert/strict";
import { DnsError } from "../src/dns/dnscache.ts";
import { FdBudget, localResourceError } from "../src/conn/fdbudget.ts";

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

Deno.test("the budget reads the soft limit and counts the open descriptors", () => {
  const budget = FdBudget.open();
  assert.ok(budget instanceof FdBudget, String(budget));
  const limits = Deno.readTextFileSync("/proc/self/limits");
  const soft = /^Max open files\s+(\d+)/m.exec(limits)![1];
  assert.equal(budget.limit, Number(soft));
  const open = [...Deno.readDirSync("/proc/self/fd")].length - 1;
  assert.ok(Math.abs(budget.open - open) <= 2, `counted ${budget.open}, /proc says ${open}`);
  assert.ok(budget.reserve >= 32 && budget.reserve <= 1024);
  assert.equal(budget.hasRoom(), true);
  budget.sessionStarted();
  assert.equal(budget.committed, budget.open + 1, "a session without its backend yet");
  budget.backendOpened();
  assert.equal(budget.committed, budget.open);
  budget.backendClosed();
  budget.sessionEnded();
});
