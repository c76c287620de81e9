#!/usr/bin/env bash
# Prefill and decode speed of moe-infer vs Hugging Face transformers on one model, measured back
# to back on this machine (ratios are what to compare; absolute numbers vary with load).
# usage: benches/scripts/compare_transformers.sh [MODEL_DIR]   (default: the bundled model)
set -euo pipefail
cd "$(dirname "$0")/../.."
model=${1:-models/tinystories-moe}
models/setup_venv.sh >/dev/null
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target} cargo build --release -q -p moe-infer
bin=${CARGO_TARGET_DIR:-target}/release/moe-infer
vocab=$(python3 -c "import json; print(json.load(open('$model/config.json'))['vocab_size'])")
prompt=$(python3 -c "import random; random.seed(0); print(','.join(str(random.randint(2, $vocab - 1)) for _ in range(200)))")
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ours_prefill=$(for _ in 1 2 3 4 5; do $bin generate --model "$model" --token-ids "$prompt" --max-new-tokens 1 --json \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['timings']['prefill_tokens_per_second'])"; done | median)
ours_decode=$(for _ in 1 2 3; do $bin generate --model "$model" --token-ids 0,1,2,3,4 --temperature 0 --max-new-tokens 200 --ignore-eos --json \
  | python3 -c "import json,sys; print(json.load(sys.stdin)['timings']['decode_tokens_per_second'])"; done | median)
peer=$(models/.venv/bin/python benches/scripts/peer_transformers.py "$model" --threads 2 --new 200 --prompt-len 200)
python3 - "$ours_prefill" "$ours_decode" "$peer" <<'PY'
import json, sys
ours_prefill, ours_decode, peer = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
print(f"{'':<22}{'moe-infer':>12}{'transformers':>14}{'ratio':>8}")
print(f"{'prefill 200 tok/s':<22}{ours_prefill:>12.0f}{peer['prefill_tok_s']:>14.0f}{ours_prefill / peer['prefill_tok_s']:>8.2f}")
print(f"{'decode tok/s':<22}{ours_decode:>12.1f}{peer['decode_tok_s']:>14.1f}{ours_decode / peer['decode_tok_s']:>8.2f}")
PY
