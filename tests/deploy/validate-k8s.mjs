// Schema check of Kubernetes manifests against Kubernetes 1.27 (kubernetes-models) and the
// prometheus-operator CRDs: required fields, types, formats.
// Usage: node validate-k8s.mjs FILE.yaml [...]   Prints "N passed, N failed".
import { readFileSync } from "node:fs";
import { parseAllDocuments } from "yaml";

let bad = 0, n = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of parseAllDocuments(readFileSync(file, "utf8"))) {
    if (doc.errors.length) { console.error(`${file}: YAML error: ${doc.errors[0].message}`); bad++; continue; }
    const obj = doc.toJS();
    if (!obj) continue;
    n++;
    const { apiVersion = "", kind = "" } = obj;
    if (kind === "Kustomization") { n--; continue; }
    const [group, version] = apiVersion.includes("/") ? apiVersion.split("/") : ["", apiVersion];
    const mod = group === "monitoring.coreos.com"
      ? `@kubernetes-models/prometheus-operator/${apiVersion}/${kind}`
      : `kubernetes-models/${group ? group + "/" : ""}${version}/${kind}`;
    let Model;
    try { Model = (await import(mod))[kind]; } catch {}
    if (!Model) { console.error(`${file}: ${apiVersion} ${kind}: no schema known`); bad++; continue; }
    try { new Model(obj).validate(); console.log(`ok   ${file}: ${kind}/${obj.metadata?.name}`); }
    catch (e) { bad++; console.error(`FAIL ${file}: ${kind}/${obj.metadata?.name}: ${e.message}`); }
  }
}
console.log(`${n - bad} passed, ${bad} failed`);
process.exit(bad ? 1 : 0);
