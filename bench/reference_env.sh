#!/usr/bin/env bash
# Creates .venv-ref: the environment in which the official ChatGLM remote code runs.
#
# The official `modeling_chatglm.py` / `tokenization_chatglm.py` need an old `transformers` (4.33; the
# tokenizer breaks from 4.34 on) and NumPy 1.x, which cannot share a venv with the project's own
# dependencies. Idempotent: an existing, complete .venv-ref is left as it is.
#
# absl-py is there for the flags of bench/reference_forward.py.
#
# Usage: bash bench/reference_env.sh [VENV_DIR]   (default: .venv-ref at the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-ref}"
PYTHON="${PYTHON:-python3}"
PACKAGES=(torch==2.13.0 transformers==4.33.3 absl-py==2.5.1 'numpy<2' sentencepiece protobuf)
STAMP="$VENV/.installed-$(printf '%s\n' "${PACKAGES[@]}" | cksum | cut -d' ' -f1)"

if [[ -f "$STAMP" ]]; then
  echo "reference environment ready: $VENV"
  exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${PACKAGES[@]}"
"$VENV/bin/python" -c "import torch, transformers, numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "reference environment ready: $VENV"
