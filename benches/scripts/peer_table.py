"""Markdown table of one compare_peers.sh run: moe-infer (ours-*.json, from `moe-infer bench
--json`), llama.cpp (llama.jsonl, from peer_llamacpp.sh run) and transformers
(transformers.json, from peer_transformers.py), with ratios ours / peer.

usage: peer_table.py RESULTS_DIR
"""
import glob, json, os, sys

d = sys.argv[1]
ours = {}
for f in sorted(glob.glob(os.path.join(d, "ours-*.json"))):
    r = json.load(open(f))
    # int8 experts and dense projections (compare_peers.sh's `q8` run) are named q8
    q8 = r.get("expert_dtype") == "q8" and r.get("dense_dtype") == "q8"
    ours["q8" if q8 else r["dtype"]] = r
llama = {}
if os.path.exists(os.path.join(d, "llama.jsonl")):
    for line in open(os.path.join(d, "llama.jsonl")):
        if line.strip():
            r = json.loads(line)
            llama[r["type"]] = r
tf = json.load(open(os.path.join(d, "transformers.json"))) if os.path.exists(os.path.join(d, "transformers.json")) else None
loads = {os.path.basename(f)[5:-4]: open(f).read().strip() for f in glob.glob(os.path.join(d, "load-*.txt"))}

def ours_row(r):
    pf = {p["prompt_tokens"]: p for p in r["prefill"]}
    dc = {x["concurrency"]: x for x in r["decode"]}
    g = lambda m, k, f: m[k][f]["median"] if k in m else None
    return {
        "prefill 128 tok/s": g(pf, 128, "tokens_per_second"),
        "prefill 512 tok/s": g(pf, 512, "tokens_per_second"),
        "TTFT 128 s": g(pf, 128, "ttft_seconds"),
        "decode 1 seq tok/s": g(dc, 1, "aggregate_tokens_per_second"),
        "decode 4 seqs aggregate tok/s": g(dc, 4, "aggregate_tokens_per_second"),
        "decode 16 seqs aggregate tok/s": g(dc, 16, "aggregate_tokens_per_second"),
    }

def llama_row(r):
    return {
        "prefill 128 tok/s": r.get("prefill_128_tok_s"),
        "prefill 512 tok/s": r.get("prefill_512_tok_s"),
        "TTFT 128 s": 128 / r["prefill_128_tok_s"] if r.get("prefill_128_tok_s") else None,
        "decode 1 seq tok/s": r.get("decode_agg_tok_s_1"),
        "decode 4 seqs aggregate tok/s": r.get("decode_agg_tok_s_4"),
        "decode 16 seqs aggregate tok/s": r.get("decode_agg_tok_s_16"),
        "llama-bench tg64 tok/s": r.get("decode_tok_s"),
    }

def tf_row(r):
    return {"prefill 128 tok/s": r["prefill_tok_s"], "TTFT 128 s": 128 / r["prefill_tok_s"],
            "decode 1 seq tok/s": r["decode_tok_s"]}

cols = [(f"moe-infer {k}", ours_row(v)) for k, v in ours.items()]
cols += [(f"llama.cpp {k.upper()}", llama_row(v)) for k, v in llama.items()]
if tf:
    cols.append((f"transformers {tf.get('dtype', 'float32')}", tf_row(tf)))
# Ratios: each moe-infer run against the peers at its precision (bf16 vs BF16, q8 vs Q8_0),
# and the first moe-infer run against transformers.
same = {"bf16": "BF16", "f16": "F16", "f32": "F32", "q8": "Q8_0"}
pairs = []
for i, (k, r) in enumerate(ours.items()):
    mine = cols[i]
    for c in cols[len(ours):]:
        peer_type = c[0].split(" ", 1)[1]
        if peer_type == same.get(k) or (i == 0 and c[0].startswith("transformers")):
            pairs.append((mine, c))
rows = ["prefill 128 tok/s", "prefill 512 tok/s", "TTFT 128 s", "decode 1 seq tok/s",
        "decode 4 seqs aggregate tok/s", "decode 16 seqs aggregate tok/s", "llama-bench tg64 tok/s"]
fmt = lambda v: "–" if v is None else (f"{v:.3f}" if v < 1 else f"{v:.1f}" if v < 100 else f"{v:.0f}")
head = ["", *[c[0] for c in cols], *[f"{a[0]} ÷ {b[0]}" for a, b in pairs]]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for row in rows:
    vals = [c[1].get(row) for c in cols]
    if all(v is None for v in vals):
        continue
    ratios = []
    for mine, c in pairs:
        a, b = mine[1].get(row), c[1].get(row)
        if a and b:
            ratios.append(f"{(b / a if row.startswith('TTFT') else a / b):.2f}×")
        else:
            ratios.append("–")
    print("| " + " | ".join([row, *map(fmt, vals), *ratios]) + " |")
print()
for k, r in ours.items():
    roof = r["roofline"]
    if roof.get("roofline_tokens_per_second"):
        print(f"moe-infer {k}: {roof['weight_bytes_per_token'] / 1e9:.3f} GB of weights per decode token, "
              f"bandwidth {roof['bandwidth_gb_per_s']:.1f} GB/s ({roof.get('bandwidth_source', 'measured')}, {roof['bandwidth_threads']} threads) → roofline "
              f"{roof['roofline_tokens_per_second']:.1f} tok/s; batch-1 decode at {100 * roof['fraction_of_roofline']:.0f} % of it; "
              f"peak RSS {r['memory']['peak_rss_bytes'] / 1e9:.2f} GB")
print("Ratios are ours ÷ peer for tok/s and peer ÷ ours for TTFT (above 1: moe-infer is faster). "
      "moe-infer: median of the repetitions; llama.cpp: llama-bench mean (prefill, tg64) and "
      "llama-batched-bench (decode at 1/4/16 sequences, 16-token prompts, 32 new tokens, as ours); "
      "llama.cpp and transformers TTFT = 128 / prefill tok/s.")
print("load average (1/5/15 min) at the start of each run: " + "; ".join(f"{k} {v}" for k, v in sorted(loads.items())))
