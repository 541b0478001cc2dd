#!/usr/bin/env bash
# Builds in Release, generates the ~110M-parameter benchmark model (cached in build/models)
# and prints the benchmark figures. Usage: tests/bench/run_benchmarks.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
"$root/deploy/setup.sh" "$root/build"
models="$root/build/models"
[[ -f "$models/llama_110m/config.json" ]] ||
  /usr/bin/python3 "$root/tests/fixtures/make_fixtures.py" --out "$models" --only llama_110m --big
# A cold load needs the page cache dropped (root only); otherwise the load is warm.
if [[ -w /proc/sys/vm/drop_caches ]]; then sync; echo 3 > /proc/sys/vm/drop_caches; echo "(page cache dropped: cold load)"; fi
"$root/build/tests/bench/decode_bench" "$models/llama_110m" 128
