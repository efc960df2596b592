/**
 * A test's life: bounded time and guaranteed cleanup. Everything a test starts is registered in
 * its {@linkcode Scope} and torn down when the test ends, fails or runs out of time.
 *
 * @module
 */

/** The repository root (where main.ts lives), with a trailing slash. */
export const ROOT: string = new URL("../..", import.meta.url).pathname;

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Collects cleanups of one test; they run in reverse order when the test ends. `await using
 * scope = new Scope()` closes it at the end of a block.
 */
export class Scope implements AsyncDisposable {
  readonly #cleanups: (() => void | Promise<void>)[] = [];

  /** Registers `cleanup` to run when the test ends (last registered runs first). */
  defer(cleanup: () => void | Promise<void>): void {
    this.#cleanups.push(cleanup);
  }

  /** Runs every cleanup once, never throwing. */
  async close(): Promise<void> {
    while (this.#cleanups.length > 0) {
      const cleanup = this.#cleanups.pop()!;
      try {
        await cleanup();
      } catch { /* best effort: the test result is decided elsewhere */ }
    }
  }

  /** {@linkcode close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/**
 * Declares an end-to-end test bounded by `timeoutMs`: on timeout the scope is torn down (which
 * kills the proxy and closes the backends, so pending I/O settles) and the test fails.
 */
export function e2eTest(
  name: string,
  fn: (scope: Scope) => Promise<void>,
  opts: { timeoutMs?: number; ignore?: boolean } = {},
): void {
  const timeoutMs = opts.timeoutMs ?? 30_000;
  Deno.test({
    name,
    ignore: opts.ignore,
    // child processes and sockets are torn down by the scope; the timer race can leave an op
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      const scope = new Scope();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timedOut = new Promise<"timeout">((resolve) => {
        timer = setTimeout(() => resolve("timeout"), timeoutMs);
      });
      const run = fn(scope);
      try {
        const first = await Promise.race([run.then(() => "done" as const), timedOut]);
        if (first === "timeout") {
          await scope.close();
          await Promise.race([run.catch(() => {}), sleep(2000)]);
          throw new Error(`test did not finish within ${timeoutMs} ms`);
        }
      } finally {
        clearTimeout(timer);
        await scope.close();
      }
    },
  });
}

/** Races `p` against a timer; rejects with `what` in the message when the timer wins. */
export async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}
