#!/usr/bin/env bash
# Adapters at scale, printed figures (not a test): 1,000 LoRA adapter folders (ranks 8/16/32/64
# on q/k/v/o of the ~110M benchmark model, seeded, bfloat16 files), request popularity
# Zipf(s = 1.1) over them, 32 concurrent closed-loop streams of 32 tokens, adapterd with
# --load_on_demand and a resident set of 64 adapters. Prints aggregate tokens/s against the same
# load on the base model, TTFT p50/p99 for resident hits and on-demand misses, loads, evictions,
# failed requests and adapterd's peak RSS; then the engine alone: 32 rows over 32 distinct
# adapters against 32 base rows, and the segmented LoRA kernel's bandwidth.
# The closed loop's throughput swings by a third from run to run (32 streams fall into and out
# of step), so base and adapter runs alternate ROUNDS times; each round's ratio is printed and
# the figure is the ratio of the medians.
# Env: COUNT (1000), REQUESTS per run (1024), RESIDENT (64), ROUNDS (3).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
count=${COUNT:-1000}
requests=${REQUESTS:-1024}
resident=${RESIDENT:-64}
rounds=${ROUNDS:-3}
source "$root/tests/bench/bench_models.sh"
pool="$models/many_$count"
/usr/bin/python3 "$root/tests/bench/make_many_adapters.py" --base "$models/llama_110m" --out "$pool" --count "$count"
work=$(mktemp -d)

"$root/build/server/adapterd" serve --model_dir "$models/llama_110m" --adapter_root "$pool" --load_on_demand \
  --max_adapters "$resident" --max_batch_rows 32 --max_queue 1024 --listen 127.0.0.1:0 --admin_listen 127.0.0.1:0 \
  --metrics_listen 127.0.0.1:0 --port_file "$work/ports.json" --log_level warn &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do [[ -f "$work/ports.json" ]] && break; sleep 0.1; done
read -r listen metrics < <(/usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['listen'], d['metrics'])" "$work/ports.json")
bench() {
  "$root/build/server/adapterctl" --addr "127.0.0.1:$listen" bench --concurrency 32 --requests "$requests" \
    --duration_s 3600 --warmup 32 --prompt_tokens uniform:16:64 --output_tokens 32 --metrics_url "http://127.0.0.1:$metrics/metrics" "$@" \
    > "$work/bench.log" 2>&1 || { cat "$work/bench.log"; exit 1; }
}
echo "== server: $count adapters on disk, Zipf(1.1), 32 streams x 32 tokens, $resident resident"
bench --adapter_choice none --out "$work/base_1.json"
peak_base=$(awk '/VmHWM/ {print $2 * 1024}' "/proc/$server/status")
bench --adapter_dir "$pool" --adapter_choice zipf --zipf_s 1.1 --out "$work/adapters_1.json"
for round in $(seq 2 "$rounds"); do
  bench --adapter_choice none --out "$work/base_$round.json"
  bench --adapter_dir "$pool" --adapter_choice zipf --zipf_s 1.1 --out "$work/adapters_$round.json"
done
peak=$(awk '/VmHWM/ {print $2 * 1024}' "/proc/$server/status")
/usr/bin/python3 - "$work" "$rounds" "$peak" "$resident" "$pool" "$peak_base" <<'PY'
import json, os, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
peak, resident, many, peak_base = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
bases = [json.load(open(f"{work}/base_{i}.json")) for i in range(1, rounds + 1)]
runs = [json.load(open(f"{work}/adapters_{i}.json")) for i in range(1, rounds + 1)]
ms = lambda s, p: 1000 * s[p]
for i, (base, run) in enumerate(zip(bases, runs)):
    b, a = base["levels"][0], run["levels"][0]
    m0, m1 = run["metrics"]["before"], run["metrics"]["after"]
    def delta(prefix):
        return sum(v - m0.get(k, 0) for k, v in m1.items() if k.startswith(prefix))
    print(f"-- round {i + 1}{' (cold: nothing resident)' if i == 0 else ''}")
    print(f"base model       {b['output_tokens_per_s']:.1f} tokens/s ({b['ok']} requests)")
    print(f"1000-adapter mix {a['output_tokens_per_s']:.1f} tokens/s ({a['ok']} requests); "
          f"ratio {a['output_tokens_per_s'] / b['output_tokens_per_s']:.3f}")
    for name, s in (("base model", b["ttft_s"]), ("resident hits", a["ttft_adapter_resident_s"]),
                    ("on-demand miss", a["ttft_adapter_loaded_s"])):
        print(f"TTFT {name:14s} p50 {ms(s, 'p50'):7.1f} ms  p99 {ms(s, 'p99'):7.1f} ms  ({s['count']} requests)")
    loads = delta('adapterd_adapter_loads_total{result="loaded",trigger="on_demand"}')
    evictions = delta("adapterd_adapter_evictions_total")
    print(f"loads            {loads:.0f} on demand, {evictions:.0f} evictions")
    failed = {k: v for k, v in a["by_status"].items() if k != "OK"}
    failed_base = {k: v for k, v in b["by_status"].items() if k != "OK"}
    print(f"failed requests  {sum(failed.values())} {failed or ''} (base run: {sum(failed_base.values())})")
base_tps = statistics.median(b["levels"][0]["output_tokens_per_s"] for b in bases)
mix_tps = statistics.median(a["levels"][0]["output_tokens_per_s"] for a in runs)
print(f"-- {rounds} rounds: median {mix_tps:.1f} tokens/s with adapters, {base_tps:.1f} on the base model; "
      f"ratio {mix_tps / base_tps:.3f} (target >= 0.7)")
sizes = [os.path.getsize(os.path.join(many, d, "adapter_model.safetensors")) for d in os.listdir(many)]
mean_held = sum(sizes) / len(sizes)  # bfloat16 files, whose LoRA factors stay bfloat16.
print(f"peak RSS         {peak_base / 1e6:.0f} MB after the base run, {peak / 1e6:.0f} MB after the adapter run "
      f"(+{(peak - peak_base) / 1e6:.0f} MB); resident budget {resident} adapters x {mean_held / 1e6:.1f} MB mean "
      f"= {resident * mean_held / 1e6:.0f} MB")
PY
echo "== engine: 32 rows over 32 distinct adapters (ranks 8-64) vs 32 base rows"
"$bench/adapter_bench" "$models/llama_110m" "$models/adapters/bench_lora_" | grep -E "32 rows|32 distinct"
"$bench/lora_kernel_bench"
