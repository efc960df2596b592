/**
 * The README's file table is the map a newcomer reads first: it must name every module of the
 * program and nothing that is gone.
 */

import assert from "node:assert/strict";

const ROOT = new URL("..", import.meta.url).pathname;

/** Paths in the first column of the README's file table (`| \`src/x.ts\` | ... |`). */
async function tablePaths(): Promise<string[]> {
  const readme = await Deno.readTextFile(`${ROOT}README.md`);
  const start = readme.indexOf("| file ");
  assert.ok(start >= 0, "README has a file table");
  const paths: string[] = [];
  for (const line of readme.slice(start).split("\n")) {
    if (!line.startsWith("|")) break;
    const m = /^\|\s*`([^`]+)`\s*\|/.exec(line);
    if (m) paths.push(m[1]);
  }
  return paths;
}

/** Every `.ts` file below `dir` (relative to the checkout), sorted. */
function modules(dir: string): string[] {
  const out: string[] = [];
  const walk = (rel: string) => {
    for (const e of Deno.readDirSync(`${ROOT}${rel}`)) {
      if (e.isDirectory) walk(`${rel}/${e.name}`);
      else if (e.name.endsWith(".ts")) out.push(`${rel}/${e.name}`);
    }
  };
  walk(dir);
  return out.sort();
}

Deno.test("the README's file table names every module of src/ and ffi/", async () => {
  const listed = new Set(await tablePaths());
  // a folder row (`ffi/`) stands for all below it
  const folders = [...listed].filter((p) => p.endsWith("/"));
  const missing = [...modules("src"), ...modules("ffi")].filter((f) =>
    !listed.has(f) && !folders.some((d) => f.startsWith(d))
  );
  assert.deepEqual(missing, [], `not in the README's file table: ${missing.join(", ")}`);
});

Deno.test("every path in the README's file table exists", async () => {
  const gone = (await tablePaths()).filter((p) => {
    try {
      Deno.statSync(`${ROOT}${p}`);
      return false;
    } catch {
      return true;
    }
  });
  assert.deepEqual(gone, [], `in the README's file table but not in the tree: ${gone.join(", ")}`);
});
