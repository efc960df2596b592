/**
 * Certificates made at test time with openssl: a CA and a leaf signed by it.
 *
 * @module
 */

const decoder = new TextDecoder();

/** Names the test leaf certificate is valid for. */
export const CERT_NAMES: readonly string[] = [
  "a.test",
  "b.test",
  "*.b.test",
  "x.y.b.test",
  "api7.c.test",
  "api42.c.test",
  "apix.c.test",
  "other.test",
  "evil.test",
  "nomatch.test",
  "localhost",
  "allowed.localhost",
];

/** A test CA and one leaf certificate signed by it for every {@linkcode CERT_NAMES} entry. */
export interface TestCerts {
  dir: string;
  caPem: string;
  caFile: string;
  certPem: string;
  keyPem: string;
}

let certsOnce: Promise<TestCerts> | null = null;

async function runChecked(cmd: string, args: string[], cwd?: string): Promise<void> {
  const out = await new Deno.Command(cmd, { args, cwd, stdin: "null" }).output();
  if (!out.success) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${out.code}:\n${decoder.decode(out.stderr)}`,
    );
  }
}

/** Makes (once per test file) a CA and a leaf certificate with openssl, in a temp dir. */
export function testCerts(): Promise<TestCerts> {
  certsOnce ??= makeCerts(CERT_NAMES);
  return certsOnce;
}

/** A new CA, and a leaf signed by it for `names` (and 127.0.0.1, ::1), made with openssl. */
export async function makeCerts(names: readonly string[]): Promise<TestCerts> {
  const dir = await Deno.makeTempDir({ prefix: "sni-e2e-certs-" });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await runChecked("openssl", [
    "req",
    "-x509",
    ...ec,
    "-days",
    "1",
    "-subj",
    "/CN=sni-proxy e2e CA",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
    "-keyout",
    "ca.key",
    "-out",
    "ca.pem",
  ], dir);
  await runChecked("openssl", [
    "req",
    ...ec,
    "-subj",
    "/CN=a.test",
    "-keyout",
    "leaf.key",
    "-out",
    "leaf.csr",
  ], dir);
  const san = [...names.map((n) => `DNS:${n}`), "IP:127.0.0.1", "IP:::1"].join(",");
  await Deno.writeTextFile(
    `${dir}/leaf.ext`,
    `subjectAltName=${san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n`,
  );
  await runChecked("openssl", [
    "x509",
    "-req",
    "-in",
    "leaf.csr",
    "-CA",
    "ca.pem",
    "-CAkey",
    "ca.key",
    "-CAcreateserial",
    "-days",
    "1",
    "-extfile",
    "leaf.ext",
    "-out",
    "leaf.pem",
  ], dir);
  return {
    dir,
    caPem: await Deno.readTextFile(`${dir}/ca.pem`),
    caFile: `${dir}/ca.pem`,
    certPem: await Deno.readTextFile(`${dir}/leaf.pem`),
    keyPem: await Deno.readTextFile(`${dir}/leaf.key`),
  };
}
