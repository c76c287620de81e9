#!/usr/bin/env bash
# Builds the benchmark model (random-weight Qwen3-MoE shape, ~2.0 B parameters, 128 experts,
# top-8, bf16; see benches/README.md) in Hugging Face format. Not committed: remade on demand
# in about a minute (plus the one-time venv setup of models/setup_venv.sh).
#
#   benches/scripts/make_bench_model.sh [OUT_DIR]
#
# OUT_DIR (or $BENCH_MODEL_DIR) defaults to bench-models/qwen3-moe-bench in the repository
# (git-ignored). A file OUT_DIR/.complete is written last; if it exists nothing is redone
# (set FORCE=1 to rebuild). Needs ~7 GB of RAM and 4 GB of disk.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-${BENCH_MODEL_DIR:-$root/bench-models/qwen3-moe-bench}}"
if [[ -f "$out/.complete" && -z "${FORCE:-}" ]]; then
  echo "bench model already complete at $out"
  exit 0
fi
"$root/models/setup_venv.sh"
rm -f "$out/.complete"
mkdir -p "$out"
rm -f "$out"/model*.safetensors "$out"/model.safetensors.index.json
"$root/models/.venv/bin/python" "$root/benches/scripts/make_bench_model.py" "$out" \
  --tokenizer-dir "$root/tests/fixtures/qwen3_moe"
touch "$out/.complete"
echo "bench model ready at $out"
