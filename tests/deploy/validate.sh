#!/usr/bin/env bash
# Checks every file in deploy/ offline: promtool on the Prometheus config, rules and rule unit
# tests; Kubernetes manifests against the 1.27 schemas and strictly through TypeScript; the
# compose file against the compose-spec schema; the dashboard's and rules' metric names
# against the server. Usage: tests/deploy/validate.sh WORKDIR
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
work=${1:?usage: validate.sh WORKDIR}
mkdir -p "$work"
cp "$root"/tests/deploy/*.mjs "$work/"
if ! [[ -f "$work/node_modules/.package-lock.json" ]] || ! cmp -s "$root/tests/deploy/package-lock.json" "$work/package-lock.json"; then
  cp "$root/tests/deploy/package.json" "$root/tests/deploy/package-lock.json" "$work/"
  (cd "$work" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
d="$root/deploy"
echo "== promtool"
promtool check config "$d/prometheus/prometheus.yml"
promtool check rules "$d/prometheus/rules.yml"
(cd "$d/prometheus" && promtool test rules rules_test.yml)
echo "== kubernetes (schema)"
node "$work/validate-k8s.mjs" "$d"/k8s/*.yaml
echo "== kubernetes (strict)"
node "$work/strict-k8s.mjs" "$work/strict" "$d"/k8s/*.yaml
echo "== compose"
node "$work/validate-compose.mjs" "$d/compose.yaml"
echo "== grafana provisioning"
/usr/bin/python3 -c "import json,sys; json.load(open(sys.argv[1]))" "$d/grafana/dashboards/adapterd.json"
for f in "$d"/grafana/provisioning/*/*.yml; do /usr/bin/python3 - "$f" <<'PY'
import sys
text = open(sys.argv[1]).read()
assert text.startswith("apiVersion: 1"), f"{sys.argv[1]}: not a Grafana provisioning file"
PY
done
/usr/bin/python3 "$root/tests/deploy/check_dashboard.py" "$root"
