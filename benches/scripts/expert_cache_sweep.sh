#!/usr/bin/env bash
# Expert cache sweep: `moe-infer generate` (bf16, greedy, a fixed 16-token prompt, N new tokens,
# --ignore-eos --json) on one model for budgets 25/50/100 % of the routed-expert bytes × policies
# lru, lfu-decay, next-use, prefetch, plus the fully-resident run; prints one table row per configuration.
# With REPS=N every configuration runs N times, the rounds interleaved (so a load spike hits all
# configurations alike); decode tok/s is then the median [min–max].
# usage: [BUDGETS="25 50 100"] [POLICIES="lru lfu-decay next-use prefetch"] [REPS=1] [EXTRA="--keep-page-cache"]
#        benches/scripts/expert_cache_sweep.sh [MODEL_DIR] [NEW_TOKENS]
#   default: bench-models/qwen3-moe-bench (made by benches/scripts/make_bench_model.sh), 32 new tokens.
# Build first: cargo build --release -p moe-infer. Timings vary with machine load (printed).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-bench-models/qwen3-moe-bench}
NEW=${2:-32}
BUDGETS=${BUDGETS:-25 50 100}
POLICIES=${POLICIES:-lru lfu-decay next-use prefetch}
REPS=${REPS:-1}
EXTRA=${EXTRA:-}
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
for r in $(seq 1 "$REPS"); do
    run "resident-$r"
    for budget in $BUDGETS; do
        for policy in $POLICIES; do
            # shellcheck disable=SC2086
            run "$budget-$policy-$r" --expert-budget "$budget%" --expert-policy "$policy" \
                --stats $EXTRA 2>/dev/null
        done
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

python3 - "$OUT" "$REPS" "$POLICIES" $BUDGETS <<'PY'
import json, os, statistics, sys
out, reps, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
rows = [("resident", "-")] + [(f"{b}%", p) for b in sys.argv[4:] for p in policies]
base = json.load(open(os.path.join(out, "resident-1.json")))

def tok_s(name):
    v = [json.load(open(os.path.join(out, f"{name}-{r}.json")))["timings"]["decode_tokens_per_second"]
         for r in range(1, reps + 1)]
    return f"{statistics.median(v):.2f}" + (f" [{min(v):.2f}–{max(v):.2f}]" if reps > 1 else "")

print("| budget | policy | hit rate | prefetch accuracy | prefetch used / read ahead | MiB read per token | stall s | decode tok/s | tokens = resident |")
print("|---|---|---|---|---|---|---|---|---|")
for budget, policy in rows:
    name = "resident" if budget == "resident" else f"{budget[:-1]}-{policy}"
    d = json.load(open(os.path.join(out, name + "-1.json")))
    same = "yes" if d["generated_token_ids"] == base["generated_token_ids"] else "NO"
    c = d.get("expert_cache")
    if c is None:
        print(f"| all resident | - | - | - | - | - | - | {tok_s(name)} | {same} |")
        continue
    acc = f"{100 * c['guess_accuracy']:.1f} %" if c["policy"] == "prefetch" else "-"
    used = f"{c['prefetch_hits']} / {c['prefetches']}" if c["policy"] == "prefetch" else "-"
    print(f"| {budget} | {policy} | {100 * c['hit_rate']:.1f} % | {acc} | {used} | "
          f"{c['bytes_per_token'] / 2**20:.1f} | {c['stall_seconds']:.2f} | "
          f"{tok_s(name)} | {same} |")
PY
