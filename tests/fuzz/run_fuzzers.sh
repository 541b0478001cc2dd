#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (+ AddressSanitizer and UBSan) and runs each for
# SECONDS (default 60), seeded with the generated fixtures. Exit non-zero on any crash.
# Usage: tests/fuzz/run_fuzzers.sh [SECONDS]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
seconds=${1:-60}
need=()
for p in clang libfuzzer-14-dev libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if (( ${#need[@]} )); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
"$root/deploy/setup.sh" --no-build
out="$root/build-fuzz"
mkdir -p "$out"
absl=$(pkg-config --libs absl_status absl_statusor absl_strings absl_str_format)
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I"$root")
clang++ "${flags[@]}" "$root/tests/fuzz/safetensors_header_fuzz.cc" "$root/core/safetensors.cc" \
  $absl -o "$out/safetensors_header_fuzz"
clang++ "${flags[@]}" "$root/tests/fuzz/model_config_fuzz.cc" "$root/core/model_config.cc" \
  $absl -o "$out/model_config_fuzz"

# Seeds: the fixtures' real files.
fixtures="$out/fixtures"
[[ -d "$fixtures/llama_tied" ]] || /usr/bin/python3 "$root/tests/fixtures/make_fixtures.py" --out "$fixtures" >/dev/null
mkdir -p "$out/corpus/safetensors" "$out/corpus/model_config"
cp "$fixtures"/gpt2/model.safetensors "$out/corpus/safetensors/gpt2" 2>/dev/null || true
for d in "$fixtures"/*/; do
  if [[ -f "$d/config.json" ]]; then
    cp "$d/config.json" "$out/corpus/model_config/$(basename "$d").json"
  fi
done
head -c 4096 "$fixtures/llama_tied/model.safetensors" > "$out/corpus/safetensors/head"
cp "$root"/tests/fuzz/corpus/safetensors/* "$out/corpus/safetensors/" 2>/dev/null || true
cp "$root"/tests/fuzz/corpus/model_config/* "$out/corpus/model_config/" 2>/dev/null || true

"$out/safetensors_header_fuzz" -max_total_time="$seconds" -max_len=65536 \
  -artifact_prefix="$out/" "$out/corpus/safetensors"
"$out/model_config_fuzz" -max_total_time="$seconds" -max_len=8192 \
  -artifact_prefix="$out/" "$out/corpus/model_config"
echo "fuzzers: no crash in ${seconds}s each"
