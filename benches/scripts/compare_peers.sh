#!/usr/bin/env bash
# moe-infer vs llama.cpp vs transformers on the bench model, measured back to back on this
# machine at the same weight precision; prints a markdown table with ratios (compare ratios,
# not absolute numbers from different runs) and the load average around each run.
#
#   benches/scripts/compare_peers.sh [MODEL_DIR]
#
# MODEL_DIR defaults to $BENCH_MODEL_DIR, else bench-models/qwen3-moe-bench (built by
# make_bench_model.sh when missing). Environment:
#   OURS_DTYPES    moe-infer runs, comma list of compute dtypes (default bf16); `q8` is bf16
#                  compute with int8 routed experts and dense projections
#                  (--expert-dtype q8 --dense-dtype q8), compared with llama.cpp's Q8_0
#   LLAMA_TYPES    GGUF types for llama.cpp (default bf16,f16,q8_0)
#   LLAMA_BENCH_EXTRA / LLAMA_BATCHED_EXTRA
#                  extra llama-bench / llama-batched-bench arguments (see peer_llamacpp.sh;
#                  '--repack 0' / '--no-repack' where Q8_0 repacking crashes)
#   TRANSFORMERS   transformers dtype (bfloat16 or float32), empty to skip (default bfloat16)
#   THREADS        threads of every engine (default 2)
#   REPS           repetitions (default 3)
#   OUT            folder for the raw JSON (default benches/.work/compare/<UTC time>)
#   BANDWIDTH_GB_S memory bandwidth for moe-infer's roofline instead of its probe (optional)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
model="${1:-${BENCH_MODEL_DIR:-$root/bench-models/qwen3-moe-bench}}"
ours_dtypes="${OURS_DTYPES:-bf16}"
llama_types="${LLAMA_TYPES:-bf16,f16,q8_0}"
transformers="${TRANSFORMERS-bfloat16}"
threads="${THREADS:-2}"
reps="${REPS:-3}"
out="${OUT:-$root/benches/.work/compare/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
[[ -f "$model/.complete" || -f "$model/config.json" ]] || benches/scripts/make_bench_model.sh "$model"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}" cargo build --release -q -p moe-infer
bin="${CARGO_TARGET_DIR:-target}/release/moe-infer"
benches/scripts/peer_llamacpp.sh build >&2
benches/scripts/peer_llamacpp.sh convert "$model" "$llama_types" >&2
load() { cut -d' ' -f1-3 /proc/loadavg; }

for d in ${ours_dtypes//,/ }; do
  echo "moe-infer $d ... (load $(load))" >&2
  echo "$(load)" > "$out/load-ours-$d.txt"
  if [[ "$d" == q8 ]]; then
    precision=(--dtype bf16 --expert-dtype q8 --dense-dtype q8)
  else
    precision=(--dtype "$d")
  fi
  "$bin" bench --model "$model" "${precision[@]}" --threads "$threads" --reps "$reps" \
    --prefill 128,512 --concurrency 1,4,16 --decode-tokens 32 --decode-prompt 16 \
    ${BANDWIDTH_GB_S:+--bandwidth-gb-s "$BANDWIDTH_GB_S"} \
    --json --plot "$out/ours-$d.svg" > "$out/ours-$d.json"
done
echo "llama.cpp $llama_types ... (load $(load))" >&2
echo "$(load)" > "$out/load-llama.txt"
THREADS="$threads" REPS="$reps" GEN=64 benches/scripts/peer_llamacpp.sh run "$model" "$llama_types" > "$out/llama.jsonl"
if [[ -n "$transformers" ]]; then
  echo "transformers $transformers ... (load $(load))" >&2
  echo "$(load)" > "$out/load-transformers.txt"
  models/.venv/bin/python benches/scripts/peer_transformers.py "$model" --threads "$threads" \
    --dtype "$transformers" --prompt-len 128 --new 8 --reps "$reps" > "$out/transformers.json"
fi
echo "$(load)" > "$out/load-end.txt"
python3 benches/scripts/peer_table.py "$out"
echo "raw results: $out" >&2
