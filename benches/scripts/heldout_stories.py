"""Prints the bundled model's held-out TinyStories validation stories (the split of
models/train_demo.py: same corpus check, normalisation, story split and seeded permutation),
joined by <|endoftext|> as the training stream saw them, up to --bytes bytes of stories.
Needs numpy only; the corpus text is CDLA-Sharing-1.0 and is not committed, so write the output
outside the repository:

    python3 benches/scripts/heldout_stories.py --bytes 8000 > /tmp/heldout.txt
    moe-infer perplexity --model models/tinystories-moe --file /tmp/heldout.txt --json
"""

import argparse
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parents[2] / "models"


class _Absent(types.ModuleType):
    """Stands in for a training dependency the split does not use (torch, transformers, ...)."""

    def __getattr__(self, name):
        return _Absent(name)

    def __call__(self, *args, **kwargs):
        # Decorators such as @torch.no_grad() at module level: hand the function back.
        return args[0] if len(args) == 1 and callable(args[0]) else _Absent("call")


def load_train_demo():
    absent = {top for top in ["safetensors", "tokenizers", "torch", "transformers"]
              if importlib.util.find_spec(top) is None}
    for name in ["safetensors", "tokenizers", "torch", "torch.nn", "torch.nn.functional", "transformers"]:
        if name.split(".")[0] in absent:
            sys.modules[name] = _Absent(name)
    spec = importlib.util.spec_from_file_location("train_demo", MODELS / "train_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    demo = load_train_demo()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=demo.DEFAULT_CORPUS)
    ap.add_argument("--bytes", type=int, default=8000, help="stop after this many bytes of stories")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()
    if demo.sha256_of(args.corpus) != demo.CORPUS_SHA256:
        sys.exit(f"error: {args.corpus} is not the TinyStories subset the model was trained on")
    text, _ = demo.normalise(args.corpus.read_bytes().decode("utf-8"))
    docs = demo.split_stories(text)
    # As train_demo.main: the first draw of the seeded generator is the validation permutation.
    order = np.random.default_rng(args.seed).permutation(len(docs))
    n_val = max(1, round(len(docs) * demo.VAL_FRACTION))
    val_docs = [docs[i] for i in sorted(order[:n_val])]
    picked, size = [], 0
    for doc in val_docs:
        if size >= args.bytes:
            break
        picked.append(doc)
        size += len(doc.encode())
    sys.stdout.write(demo.EOT.join(picked))


if __name__ == "__main__":
    main()
