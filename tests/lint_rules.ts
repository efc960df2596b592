/**
 * Size rules for `deno lint` (registered in deno.json), so that a module keeps one job and a
 * function can be read at once:
 *
 * - `sni/max-file-lines`: a source file of more than 500 lines.
 * - `sni/max-function-lines`: a function or method of more than 80 lines, first line to last.
 * - `sni/ignore-needs-reason`: an ignore comment for one of these rules without a reason
 *   (`// deno-lint-ignore sni/max-function-lines -- why it is long`).
 *
 * They apply to the program (`main.ts`, `src/`, `ffi/`, `bench/`), not to the tests, whose
 * long tables of cases read best whole.
 *
 * @module
 */

/** The most lines a source file may have without a reason written in it. */
export const MAX_FILE_LINES = 500;
/** The most lines a function may have without a reason written beside it. */
export const MAX_FUNCTION_LINES = 80;

const RULES = ["sni/max-file-lines", "sni/max-function-lines"];

function applies(filename: string): boolean {
  return !/(^|\/)tests\//.test(filename);
}

function lineCount(text: string, start: number, end: number): number {
  let lines = 1;
  for (let i = start; i < end; i++) if (text.charCodeAt(i) === 10) lines++;
  return lines;
}

const plugin: Deno.lint.Plugin = {
  name: "sni",
  rules: {
    "max-file-lines": {
      create(context) {
        return {
          Program(node) {
            if (!applies(context.filename)) return;
            const text = context.sourceCode.text;
            const lines = lineCount(text, 0, text.trimEnd().length);
            if (lines <= MAX_FILE_LINES) return;
            context.report({
              range: [0, Math.min(text.length, 1)],
              message: `${lines} lines, more than ${MAX_FILE_LINES}: split the file along a ` +
                `seam, or write why it is one file (deno-lint-ignore-file sni/max-file-lines -- ` +
                `reason)`,
            });
            void node;
          },
        };
      },
    },
    "max-function-lines": {
      create(context) {
        const check = (
          node:
            | Deno.lint.FunctionDeclaration
            | Deno.lint.FunctionExpression
            | Deno.lint.ArrowFunctionExpression,
        ) => {
          if (!applies(context.filename)) return;
          const [start, end] = node.range;
          const lines = lineCount(context.sourceCode.text, start, end);
          if (lines <= MAX_FUNCTION_LINES) return;
          context.report({
            node,
            message: `function of ${lines} lines, more than ${MAX_FUNCTION_LINES}: split it, or ` +
              `write why it is one piece (deno-lint-ignore sni/max-function-lines -- reason)`,
          });
        };
        return {
          FunctionDeclaration: check,
          FunctionExpression: check,
          ArrowFunctionExpression: check,
        };
      },
    },
    "ignore-needs-reason": {
      create(context) {
        return {
          Program() {
            for (const c of context.sourceCode.getAllComments()) {
              const m = /^\s*deno-lint-ignore(?:-file)?\s+([^\n]*)$/.exec(c.value);
              if (!m || !RULES.some((r) => m[1].includes(r))) continue;
              if (/\s--\s*\S/.test(m[1])) continue;
              context.report({
                range: c.range,
                message: "an ignored size rule needs its reason: `-- why`",
              });
            }
          },
        };
      },
    },
  },
};

export default plugin;
