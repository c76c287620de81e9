"""Decode and prefill speed of Hugging Face transformers on a model folder, for a ratio against
moe-infer measured back to back on the same machine. Run with models/.venv/bin/python.

usage: peer_transformers.py MODEL_DIR [--threads 2] [--new 200] [--prompt-len 200]
                             [--reps 3] [--dtype float32|bfloat16|float16]
"""
import argparse, json, os, time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--new", type=int, default=200)
ap.add_argument("--prompt-len", type=int, default=200)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
a = ap.parse_args()
torch.set_num_threads(a.threads)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype)).eval()
vocab = model.config.vocab_size
g = torch.Generator().manual_seed(0)
prompt = torch.randint(2, vocab, (1, a.prompt_len), generator=g)
short = prompt[:, :5]
decode, prefill = [], []
with torch.no_grad():
    for _ in range(a.reps):
        t = time.perf_counter()
        model(prompt)
        prefill.append(a.prompt_len / (time.perf_counter() - t))
        t0 = time.perf_counter()
        model.generate(short, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter()
        model.generate(short, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False)
        t2 = time.perf_counter()
        decode.append((a.new - 1) / ((t2 - t1) - (t1 - t0)))
med = lambda v: sorted(v)[len(v) // 2]
print(json.dumps({"peer": "transformers " + __import__("transformers").__version__, "threads": a.threads,
                  "dtype": a.dtype, "prompt_len": a.prompt_len, "new": a.new,
                  "prefill_tok_s": med(prefill), "decode_tok_s": med(decode)}))
