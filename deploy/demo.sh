#!/usr/bin/env bash
# Sets up, builds, generates the default model (a seeded ~110M-parameter Llama-shaped
# checkpoint in Hugging Face layout) and runs adapterd on it.
# Usage: deploy/demo.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/deploy/setup.sh" "$root/build"
models="$root/build/models"
if [[ ! -f "$models/llama_110m/config.json" ]]; then
  /usr/bin/python3 "$root/tests/fixtures/make_fixtures.py" --out "$models" --only llama_110m --big
fi
model="$models/llama_110m"
bin="$root/build/server/adapterd"
"$bin" inspect --model_dir "$model"
"$bin" generate --model_dir "$model" --prompt_ids 1,450,4996,17354,1701 --max_new_tokens 16
