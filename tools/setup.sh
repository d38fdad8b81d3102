#!/usr/bin/env bash
# Set up a development environment in .venv: a CPU build of PyTorch, then this project (editable) with its dev tools.
# Usage: bash tools/setup.sh        (TORCH_SPEC="..." to choose another torch; PYTHON=python3.x to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# fastai's own ranges would pull a ~6 GB CUDA build of torch; the CPU build with a matching torchvision is ~1.7 GB.
TORCH_SPEC=${TORCH_SPEC:-"torch==2.13.0 torchvision==0.28.0"}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  $PIP install -q --progress-bar off $TORCH_SPEC
fi
$PIP install -q --progress-bar off -e '.[dev]'
.venv/bin/python -c "import fastai_memmap, fastai, torch; print('fastai_memmap', fastai_memmap.__version__, '| fastai', fastai.__version__, '| torch', torch.__version__)"
