#!/usr/bin/env bash
# Expert cache sweep: `moe-infer generate` (bf16, greedy, a fixed 16-token prompt, N new tokens,
# --ignore-eos --json) on one model for budgets 25/50/100 % of the routed-expert bytes × policies
# lru, lfu-decay, prefetch, plus the fully-resident run; prints one table row per run.
# usage: [BUDGETS="25 50 100"] benches/scripts/expert_cache_sweep.sh [MODEL_DIR] [NEW_TOKENS]
#   default: bench-models/qwen3-moe-bench (made by benches/scripts/make_bench_model.sh), 32 new tokens.
# Build first: cargo build --release -p moe-infer. Timings vary with machine load (printed).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-bench-models/qwen3-moe-bench}
NEW=${2:-32}
BUDGETS=${BUDGETS:-25 50 100}
BIN=${MOE_INFER:-target/release/moe-infer}
PROMPT=11,42,7,300,5,99,120,64,33,250,18,77,401,2,90,16
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

run() { # name, extra args...
    local name=$1
    shift
    "$BIN" generate --model "$MODEL" --token-ids "$PROMPT" --max-new-tokens "$NEW" \
        --ignore-eos --temperature 0 --dtype bf16 --json "$@" >"$OUT/$name.json"
}

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
run resident
for budget in $BUDGETS; do
    for policy in lru lfu-decay prefetch; do
        run "$budget-$policy" --expert-budget "$budget%" --expert-policy "$policy" --stats 2>/dev/null
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$OUT" $BUDGETS <<'PY'
import json, os, sys
out = sys.argv[1]
rows = [("resident", "-")] + [(f"{b}%", p) for b in sys.argv[2:] for p in ("lru", "lfu-decay", "prefetch")]
base = json.load(open(os.path.join(out, "resident.json")))
print("| budget | policy | hit rate | prefetch accuracy | prefetch used / read ahead | MiB read per token | stall s | decode tok/s | tokens = resident |")
print("|---|---|---|---|---|---|---|---|---|")
for budget, policy in rows:
    name = "resident" if budget == "resident" else f"{budget[:-1]}-{policy}"
    d = json.load(open(os.path.join(out, name + ".json")))
    t = d["timings"]
    same = "yes" if d["generated_token_ids"] == base["generated_token_ids"] else "NO"
    c = d.get("expert_cache")
    if c is None:
        print(f"| all resident | - | - | - | - | - | - | {t['decode_tokens_per_second']:.2f} | {same} |")
        continue
    acc = f"{100 * c['guess_accuracy']:.1f} %" if c["policy"] == "prefetch" else "-"
    used = f"{c['prefetch_hits']} / {c['prefetches']}" if c["policy"] == "prefetch" else "-"
    print(f"| {budget} | {policy} | {100 * c['hit_rate']:.1f} % | {acc} | {used} | "
          f"{c['bytes_per_token'] / 2**20:.1f} | {c['stall_seconds']:.2f} | "
          f"{t['decode_tokens_per_second']:.2f} | {same} |")
PY
