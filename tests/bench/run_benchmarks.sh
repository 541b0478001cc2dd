#!/usr/bin/env bash
# Builds in Release, generates the ~110M-parameter benchmark model and its adapters (cached in
# build/models) and prints every benchmark's figures.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$root/tests/bench/bench_models.sh"
echo "== decode and load (drops the page cache first when root: a cold load)"
if [[ -w /proc/sys/vm/drop_caches ]]; then sync; echo 3 > /proc/sys/vm/drop_caches; fi
"$bench/decode_bench" "$models/llama_110m" 128
echo "== KV memory: prefix reuse, decode over a long context, chunked prefill, KV dtypes"
"$bench/kv_bench" "$models/llama_110m"
echo "== adapters"
"$bench/adapter_bench" "$models/llama_110m" "$models/adapters/bench_lora_"
echo "== tokenizer (adapterd, then the Rust tokenizers on the same text)"
"$bench/tokenizer_bench" "$root/build/npm" "$root/tests/tokenizer/corpus.json"
node "$root/tests/tokenizer/bench.js" "$root/build/npm/node_modules"
echo "== server"
work=$(mktemp -d)
"$root/build/server/adapterd" serve --model_dir "$models/llama_110m" --adapter_root "$models/adapters" \
  --listen 127.0.0.1:0 --admin_listen 127.0.0.1:0 --metrics_listen 127.0.0.1:0 \
  --port_file "$work/ports.json" --log_level warn &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do [[ -f "$work/ports.json" ]] && break; sleep 0.1; done
read -r listen admin < <(/usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['listen'], d['admin'])" "$work/ports.json")
"$bench/serve_bench" "127.0.0.1:$listen" "127.0.0.1:$admin" bench_lora_0
