// Strict check of Kubernetes manifests: unknown or misspelled fields and wrong types, through
// TypeScript's excess-property checks against kubernetes-models' interfaces.
// Usage: node strict-k8s.mjs WORKDIR FILE.yaml [...]
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { join } from "node:path";
import { parseAllDocuments } from "yaml";

const [work, ...files] = process.argv.slice(2);
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
mkdirSync(work, { recursive: true });
let src = "", i = 0;
for (const file of files) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    const o = doc.toJS();
    if (!o || o.kind === "Kustomization") continue;
    const { apiVersion = "", kind = "" } = o;
    const [g, v] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
    const mod = g === "monitoring.coreos.com"
      ? `@kubernetes-models/prometheus-operator/${apiVersion}/${kind}`
      : `kubernetes-models/${g ? g + "/" : ""}${v}/${kind}`;
    src += `import type { I${kind} as T${i} } from "${mod}";\n// ${file}: ${kind}/${o.metadata?.name}\n` +
           `export const d${i}: T${i} = ${JSON.stringify(o, null, 1)};\n`;
    i++;
  }
}
const check = join(work, "check.ts");
writeFileSync(check, src);
try {
  execFileSync(process.execPath, [tsc, "--noEmit", "--strict", "--module", "nodenext",
    "--moduleResolution", "nodenext", "--target", "es2022", "--skipLibCheck", check], { stdio: "inherit" });
  console.log(`${i} passed, 0 failed`);
} catch {
  console.log(`strict check failed (line numbers point into ${check})`);
  process.exit(1);
}
