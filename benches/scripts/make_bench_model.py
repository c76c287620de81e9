"""Builds the random-weight Qwen3-MoE-shaped benchmark model (see benches/README.md) in
Hugging Face format: bf16, 5 safetensors shards of <= 1 GB + index, per-expert tensor names,
with the fixtures' 512-token tokenizer. Run with models/.venv/bin/python (transformers 5.23).

usage: make_bench_model.py OUT_DIR [--tokenizer-dir tests/fixtures/qwen3_moe]
"""
import argparse, json, os, shutil, time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--tokenizer-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "qwen3_moe"))
a = ap.parse_args()

config = Qwen3MoeConfig(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,  # dense MLP size; unused, every layer is sparse
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=128,
    num_experts=128,
    num_experts_per_tok=8,
    moe_intermediate_size=256,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rope_theta=1e6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
)
t = time.time()
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
model = Qwen3MoeForCausalLM(config).eval()
model.config.dtype = torch.bfloat16
n = sum(p.numel() for p in model.parameters())
print(f"built {n / 1e9:.3f} B parameters in {time.time() - t:.0f} s")
os.makedirs(a.out, exist_ok=True)
model.save_pretrained(a.out, max_shard_size="1GB", safe_serialization=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(a.tokenizer_dir, f), os.path.join(a.out, f))
with open(os.path.join(a.out, "model.safetensors.index.json")) as f:
    names = list(json.load(f)["weight_map"])
assert any(".mlp.experts.127.down_proj.weight" in k for k in names), "expected per-expert tensor names"
shards = sorted(x for x in os.listdir(a.out) if x.endswith(".safetensors"))
size = sum(os.path.getsize(os.path.join(a.out, x)) for x in shards)
print(f"saved {len(shards)} shards, {size:,} bytes, to {a.out} in {time.time() - t:.0f} s")
