#!/usr/bin/env bash
# Creates models/.venv with the pinned Python packages that models/train_demo.py needs.
# Safe to run again: an existing venv is reused and pip skips what is already installed.
#
#   models/setup_venv.sh && models/.venv/bin/python models/train_demo.py
#
# Environment:
#   PYTHON            interpreter used to create the venv (default: python3, needs >= 3.10)
#   TORCH_INDEX_URL   optional extra index for torch, e.g. https://download.pytorch.org/whl/cpu
#                     to get the small CPU-only wheel instead of the CUDA one from PyPI
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"

pins=(
  "torch==2.15.0"
  "transformers==5.23.0"
  "tokenizers==0.23.3"
  "safetensors==0.8.0"
  "numpy"
)

if [[ ! -x "$venv/bin/python" ]]; then
  echo "creating $venv with $("$python" --version 2>&1)"
  "$python" -m venv "$venv"
else
  echo "reusing $venv"
fi

extra=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  extra+=(--extra-index-url "$TORCH_INDEX_URL")
fi

"$venv/bin/python" -m pip install --disable-pip-version-check -q ${extra[@]+"${extra[@]}"} "${pins[@]}"
"$venv/bin/python" - <<'EOF'
import torch, transformers, tokenizers, safetensors, numpy
print("ok: torch", torch.__version__, "| transformers", transformers.__version__,
      "| tokenizers", tokenizers.__version__, "| safetensors", safetensors.__version__,
      "| numpy", numpy.__version__)
EOF
