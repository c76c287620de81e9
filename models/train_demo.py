#!/usr/bin/env python3
"""Trains the small bundled demo model of moe-infer (models/tinystories-moe/).

What it makes: a 6.7M-parameter Mixtral-style MoE (4 layers, 8 experts, top-2) and a 4096-entry
byte-level BPE tokenizer, trained on CPU from a TinyStories subset for a fixed wall-clock budget.
What it is not: a general training tool. The recipe is fixed on purpose; the arguments only say
where the corpus is, where the output goes, and how long to train.

Run from anywhere (after models/setup_venv.sh):

    models/.venv/bin/python models/train_demo.py [--corpus PATH] [--minutes 22]

The corpus is not in the repository (CDLA-Sharing-1.0 text, see models/tinystories-moe/README.md);
its SHA-256 is checked so that a rebuilt model is trained on the same text.

The schedule follows wall-clock time, so two runs on different machines see a different number of
steps and do not give bit-identical weights; the seeds fix everything else.
"""

import os

# Must be set before torch (and its OpenMP runtime) loads: with spin-waiting OpenMP threads, a
# 2-core box shared with other jobs trains several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import hashlib
import json
import math
import platform
import random
import re
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import safetensors
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MixtralConfig, MixtralForCausalLM

MODELS_DIR = Path(__file__).resolve().parent
REPO_ROOT = MODELS_DIR.parent
DEFAULT_CORPUS = REPO_ROOT / ".." / "shared" / "corpora" / "tinystories-subset.txt"
DEFAULT_OUT = MODELS_DIR / "tinystories-moe"
CORPUS_SHA256 = "f38a9dcb4ee70b34c924380f63df3d054c2f5ceae02c875e2a89d782cacdde9b"

EOT = "<|endoftext|>"  # id 0: document separator, BOS and EOS at once
PROMPT = "Once upon a time"

# Recipe (see /work/shared/demo-model.md for the measurements behind it).
VOCAB_SIZE = 4096
SEQ_LEN = 128
BATCH_SIZE = 16
PEAK_LR = 3e-3
MIN_LR_FRACTION = 0.1
WARMUP_STEPS = 30
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
VAL_FRACTION = 0.01
AUX_LOSS_COEF = 0.01
EVAL_EVERY_S = 90.0

# Engine-side sampling defaults, written to generation_config.json.
GEN_DEFAULTS = dict(do_sample=True, temperature=0.8, top_k=40, top_p=0.95, repetition_penalty=1.1)


def model_config() -> MixtralConfig:
    return MixtralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=192,
        intermediate_size=256,  # per expert
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=3,  # GQA, head_dim 32
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        router_aux_loss_coef=AUX_LOSS_COEF,
        output_router_logits=True,  # training only; switched off before saving
    )


# ----------------------------------------------------------------------------------------------
# Corpus


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# The subset was lower-cased after someone had decoded UTF-8 as Windows-1252, so curly quotes and
# dashes appear as "â€œ", "â€™", ... and the closing double quote lost its last byte ("â€").
# Longest sequences first; the bare "â€" (a broken closing quote) must come last.
MOJIBAKE = [
    ("â€œ", '"'), ("â€\u009d", '"'), ("â€˜", "'"), ("â€™", "'"),
    ("â€“", "-"), ("â€”", "-"), ("â€¦", "..."),
    ("â€", '"'),
    ("â«", '"'), ("â»", '"'), ("â¡", ""), ("â¿", ""),  # lower-cased Â« Â» Â¡ Â¿
]
# Proper Unicode punctuation, should any be present.
PUNCT = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2010": "-", "\u2011": "-", "\u2012": "-", "\u2013": "-", "\u2014": "-", "\u2015": "-",
    "\u2212": "-", "\u2026": "...", "\u00a0": " ", "\u00a1": "", "\u00bf": "",
}


def normalise(text: str) -> tuple[str, dict]:
    """Repairs the mojibake, maps quotes and dashes to ASCII, folds accents, drops the rest."""
    stats = {}
    for bad, good in MOJIBAKE:
        stats[f"{bad!r} -> {good!r}"] = text.count(bad)
        text = text.replace(bad, good)
    # Lower-cased two-byte mojibake of accented letters: "ã©" was "Ã©" = UTF-8 of "é".
    def fix_latin(m: re.Match) -> str:
        try:
            return ("Ã" + m.group(1)).encode("cp1252").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return m.group(0)
    text, stats["ã + one byte (lower-cased accented letter)"] = re.subn(r"ã([\u00a0-\u00bf])", fix_latin, text)
    text = text.translate(str.maketrans(PUNCT))
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    stats["dropped_non_ascii"] = sum(1 for c in text if ord(c) > 127)
    text = "".join(c for c in text if ord(c) < 128)
    # The re-caser upstream could not see through the mojibake quotes; redo its two simplest
    # rules where they now apply: the pronoun "I", and a capital after a quote that opens a sentence.
    text = re.sub(r"\bi(?=\b|'[a-z])", "I", text)
    text = re.sub(r'(^|[.!?]\s+|\n\s*|[,:] )"([a-z])', lambda m: m.group(1) + '"' + m.group(2).upper(),
                  text, flags=re.M)
    return text, stats


def split_stories(text: str) -> list[str]:
    # Stories are separated by single newlines; a blank line separates paragraphs inside a story.
    parts = re.split(r"(?<!\n)\n(?!\n)", text)
    return [re.sub(r"\n{3,}", "\n\n", p).strip() for p in parts if p.strip()]


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(docs: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    assert tok.token_to_id(EOT) == 0, "<|endoftext|> must be id 0"
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    return tok


def token_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    # <eot> doc <eot> doc ... : every document is seen right after id 0, as the engine prompts it.
    out = []
    for enc in tok.encode_batch(docs):
        out.append(0)
        out.extend(enc.ids)
    return np.asarray(out, dtype=np.uint16)


# ----------------------------------------------------------------------------------------------
# Training


def lm_loss(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # logits [B, T, V], x [B, T]: predict x[:, 1:] from positions :-1
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), x[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: MixtralForCausalLM, windows: torch.Tensor) -> float:
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(windows), 32):
        x = windows[i : i + 32]
        logits = model(input_ids=x, use_cache=False, output_router_logits=False).logits
        total += lm_loss(logits, x).item() * x.size(0)
        n += x.size(0)
    model.train()
    return total / n


def lr_at(step: int, frac: float) -> float:
    # Linear warm-up over steps, then cosine over the fraction of the time budget used, down to 10%.
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    frac = min(max(frac, 0.0), 1.0)
    cos = MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * frac))
    return PEAK_LR * warm * cos


def train(model, train_ids, val_windows, budget_s, rng, bytes_per_token, log):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=BETAS,
    )
    model.train()
    history, recent = [], []
    step, tokens = 0, 0
    start = time.time()
    next_eval = EVAL_EVERY_S
    while True:
        elapsed = time.time() - start
        if elapsed >= budget_s:
            break
        lr = lr_at(step, elapsed / budget_s)
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.integers(0, len(train_ids) - SEQ_LEN, size=BATCH_SIZE)
        x = torch.from_numpy(np.stack([train_ids[s : s + SEQ_LEN] for s in starts]).astype(np.int64))
        out = model(input_ids=x, use_cache=False, output_router_logits=True)
        ce = lm_loss(out.logits, x)
        loss = ce + AUX_LOSS_COEF * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += BATCH_SIZE * SEQ_LEN
        recent.append((ce.item(), out.aux_loss.item()))
        recent = recent[-100:]
        elapsed = time.time() - start
        if elapsed >= next_eval or step == 1:
            next_eval = (elapsed // EVAL_EVERY_S + 1) * EVAL_EVERY_S
            val = evaluate(model, val_windows)
            tr = sum(c for c, _ in recent) / len(recent)
            aux = sum(a for _, a in recent) / len(recent)
            history.append(dict(step=step, tokens=tokens, elapsed_s=round(elapsed, 1), lr=lr,
                                train_loss=round(tr, 4), aux_loss=round(aux, 4), val_loss=round(val, 4)))
            log(f"step {step:5d}  tokens {tokens / 1e6:6.2f}M  {elapsed / 60:5.1f} min  "
                f"{tokens / elapsed:6.0f} tok/s  lr {lr:.2e}  train {tr:.3f}  aux {aux:.3f}  "
                f"val {val:.3f} ({val / math.log(2) / bytes_per_token:.3f} bits/byte)")
    wall = time.time() - start
    train_loss = sum(c for c, _ in recent) / len(recent)
    val = evaluate(model, val_windows)
    history.append(dict(step=step, tokens=tokens, elapsed_s=round(wall, 1), lr=lr,
                        train_loss=round(train_loss, 4), val_loss=round(val, 4)))
    log(f"done: {step} steps, {tokens / 1e6:.2f}M tokens in {wall / 60:.1f} min "
        f"({tokens / wall:.0f} tok/s); train {train_loss:.3f}, val {val:.3f} "
        f"({val / math.log(2) / bytes_per_token:.3f} bits/byte)")
    return dict(steps=step, tokens_seen=tokens, train_wall_s=round(wall, 1),
                tokens_per_s=round(tokens / wall, 1), final_train_loss=round(train_loss, 4),
                final_val_loss=round(val, 4),
                final_val_bits_per_byte=round(val / math.log(2) / bytes_per_token, 4),
                history=history)


# ----------------------------------------------------------------------------------------------
# Saving and checking


def save(model: MixtralForCausalLM, tok: Tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    gen = model.generation_config
    gen.bos_token_id = 0
    gen.eos_token_id = 0
    for k, v in GEN_DEFAULTS.items():
        setattr(gen, k, v)
    model.to(torch.bfloat16)
    model.save_pretrained(out_dir)

    # config.json: add a top-level rope_theta next to rope_parameters for loaders that expect the
    # transformers 4.x form, and make the fields the engine reads explicit.
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_theta"] = float(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    cfg["output_router_logits"] = False
    cfg["dtype"] = "bfloat16"
    cfg["bos_token_id"] = 0
    cfg["eos_token_id"] = 0
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    gen_path = out_dir / "generation_config.json"
    g = json.loads(gen_path.read_text())
    g.update(dict(bos_token_id=0, eos_token_id=0, **GEN_DEFAULTS))
    g.pop("_from_model_config", None)  # hand-set sampling defaults, not derived from config.json
    gen_path.write_text(json.dumps(g, indent=2, sort_keys=True) + "\n")

    tok.save(str(out_dir / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def check_tensor_names(out_dir: Path, cfg: MixtralConfig) -> dict:
    """The engine loads the classic Mixtral names; fail here rather than in Rust."""
    from safetensors import safe_open

    with safe_open(str(out_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for l in range(cfg.num_hidden_layers):
        p = f"model.layers.{l}."
        want |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                 p + "block_sparse_moe.gate.weight"}
        want |= {p + f"self_attn.{n}_proj.weight" for n in "qkvo"}
        want |= {p + f"block_sparse_moe.experts.{e}.{w}.weight"
                 for e in range(cfg.num_local_experts) for w in ("w1", "w2", "w3")}
    missing, extra = sorted(want - names), sorted(names - want)
    if missing or extra:
        raise SystemExit(f"unexpected tensor names in model.safetensors: missing {missing[:5]}, "
                         f"extra {extra[:5]}")
    if dtypes != {"BF16"}:
        raise SystemExit(f"model.safetensors should be all BF16, found {dtypes}")
    return dict(n_tensors=len(names), dtypes=sorted(dtypes))


@torch.no_grad()
def greedy_ids(model: MixtralForCausalLM, prompt_ids: list[int], n_new: int) -> tuple[list[int], list]:
    """Plain argmax loop over full forwards (no KV cache), so the reference is easy to trust."""
    ids = list(prompt_ids)
    first_top5 = None
    for i in range(n_new):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
        if i == 0:
            v, k = logits.topk(5)
            first_top5 = [[int(a), round(float(b), 4)] for a, b in zip(k, v)]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids):], first_top5


@torch.no_grad()
def reload_and_sample(out_dir: Path, tok: Tokenizer, seed: int, log) -> dict:
    prompt_ids = [0] + tok.encode(PROMPT).ids
    x = torch.tensor([prompt_ids])
    result = {"prompt": EOT + PROMPT, "prompt_ids": prompt_ids}
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        model = MixtralForCausalLM.from_pretrained(out_dir, dtype=dtype)
        model.eval()
        samples = []
        for i in range(3):
            torch.manual_seed(seed + i)
            y = model.generate(x, max_new_tokens=100, do_sample=True, temperature=0.8, top_k=40,
                               top_p=1.0, repetition_penalty=1.0, pad_token_id=0)
            samples.append(tok.decode(y[0].tolist(), skip_special_tokens=True))
        y = model.generate(x, max_new_tokens=60, do_sample=False, repetition_penalty=1.0,
                           pad_token_id=0)
        greedy = tok.decode(y[0].tolist(), skip_special_tokens=True)
        result[name] = {"samples_t0.8_k40": samples, "greedy": greedy}
        log(f"--- {name} reload: 3 samples (temperature 0.8, top-k 40), then greedy")
        for s in samples + [greedy]:
            log("  " + s.replace("\n", "\n  "))
    # Reference for the engine: f32 arithmetic over the bf16 weights (loading upcasts exactly).
    model = MixtralForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.eval()
    ids, top5 = greedy_ids(model, prompt_ids, 20)
    result["reference_greedy_f32"] = {
        "about": "float32 forward over the bf16 weights; prompt_ids = [0] + encode(prompt); "
                 "argmax each step, no sampling, no repetition penalty",
        "prompt_ids": prompt_ids,
        "generated_ids": ids,
        "text": tok.decode(ids),
        "first_step_top5_id_logit": top5,
    }
    log(f"reference greedy (f32 over bf16 weights), prompt {prompt_ids}: {ids}")
    log(f"  = {tok.decode(ids)!r}; first-step top-5 {top5}")
    return result


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=cpu, n_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), platform=platform.platform())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                    help="tinystories-subset.txt (default: ../shared/corpora/ from the repo root)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--minutes", type=float, default=22.0, help="training time budget (wall clock)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    corpus = args.corpus.resolve()
    if not corpus.is_file():
        sys.exit(f"error: corpus not found: {corpus}\n"
                 f"  pass --corpus PATH to tinystories-subset.txt (SHA-256 {CORPUS_SHA256})")
    digest = sha256_of(corpus)
    if digest != CORPUS_SHA256:
        sys.exit(f"error: {corpus} has SHA-256 {digest},\n"
                 f"  expected {CORPUS_SHA256} (the TinyStories subset this model is trained on)")
    raw = corpus.read_bytes()
    text, fixes = normalise(raw.decode("utf-8"))
    docs = split_stories(text)
    log(f"corpus {corpus} ({len(raw):,} bytes, SHA-256 ok): {len(docs)} stories; "
        f"repairs {({k: v for k, v in fixes.items() if v})}")

    order = rng.permutation(len(docs))
    n_val = max(1, round(len(docs) * VAL_FRACTION))
    val_docs = [docs[i] for i in sorted(order[:n_val])]
    train_docs = [docs[i] for i in sorted(order[n_val:])]

    tok = train_tokenizer(train_docs)
    train_ids = token_stream(tok, train_docs)
    val_ids = token_stream(tok, val_docs)
    val_bytes = sum(len(d.encode()) for d in val_docs)
    bytes_per_token = val_bytes / (len(val_ids) - len(val_docs))
    n_win = (len(val_ids) - 1) // SEQ_LEN
    val_windows = torch.from_numpy(val_ids[: n_win * SEQ_LEN].astype(np.int64).reshape(n_win, SEQ_LEN))
    log(f"tokenizer: vocab {tok.get_vocab_size()}; train {len(train_docs)} stories, "
        f"{len(train_ids):,} tokens; val {len(val_docs)} stories, {len(val_ids):,} tokens "
        f"({n_win} windows); {bytes_per_token:.2f} bytes/token")

    cfg = model_config()
    cfg._attn_implementation = "sdpa"
    model = MixtralForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters; training for {args.minutes:g} min on "
        f"{torch.get_num_threads()} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})")

    stats = train(model, train_ids, val_windows, args.minutes * 60, rng, bytes_per_token, log)

    out_dir = args.out.resolve()
    save(model, tok, out_dir)
    names = check_tensor_names(out_dir, cfg)
    log(f"saved to {out_dir}: {names['n_tensors']} tensors, {names['dtypes']}")
    checks = reload_and_sample(out_dir, tok, args.seed, log)

    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    training_log = {
        "model": "MixtralForCausalLM",
        "n_params": n_params,
        "corpus": dict(file=corpus.name, sha256=digest, bytes=len(raw), stories=len(docs),
                       train_stories=len(train_docs), val_stories=len(val_docs),
                       train_tokens=int(len(train_ids)), val_tokens=int(len(val_ids)),
                       normalisation_repairs={k: v for k, v in fixes.items() if v}),
        "tokenizer": dict(kind="byte-level BPE", vocab_size=tok.get_vocab_size(), eot_id=0,
                          bytes_per_token=round(bytes_per_token, 3)),
        "recipe": dict(batch_size=BATCH_SIZE, seq_len=SEQ_LEN, peak_lr=PEAK_LR,
                       min_lr_fraction=MIN_LR_FRACTION, warmup_steps=WARMUP_STEPS,
                       schedule="cosine over the fraction of the wall-clock budget used",
                       weight_decay=WEIGHT_DECAY, betas=list(BETAS), grad_clip=GRAD_CLIP,
                       aux_loss_coef=AUX_LOSS_COEF, budget_minutes=args.minutes, seed=args.seed),
        "steps": stats["steps"],
        "tokens_seen": stats["tokens_seen"],
        "epochs": round(stats["tokens_seen"] / len(train_ids), 2),
        "train_wall_s": stats["train_wall_s"],
        "tokens_per_s": stats["tokens_per_s"],
        "final_train_loss": stats["final_train_loss"],
        "final_val_loss": stats["final_val_loss"],
        "final_val_bits_per_byte": stats["final_val_bits_per_byte"],
        "loss_units": "nats per token; train loss is the mean LM loss of the last 100 steps "
                      "(without the router aux loss)",
        "history": stats["history"],
        "checks": checks,
        "files_bytes": files,
        "total_wall_s": round(time.time() - t0, 1),
        "versions": dict(python=platform.python_version(), torch=torch.__version__,
                         transformers=transformers.__version__, tokenizers=tokenizers.__version__,
                         safetensors=safetensors.__version__, numpy=np.__version__),
        "machine": machine_info(),
    }
    log_text = json.dumps(training_log, indent=2, ensure_ascii=False) + "\n"
    (out_dir / "training_log.json").write_text(log_text, encoding="utf-8")
    log(f"wrote {out_dir / 'training_log.json'}; files {files}")


if __name__ == "__main__":
    main()
