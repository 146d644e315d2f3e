#!/usr/bin/env bash
# Sets up .venv with fsam-ds and its test dependencies.
#   bash install.sh          CPU machine: torch 2.13.0 CPU build, pinned by constraints-cpu.txt
#   bash install.sh --gpu    GPU machine: keeps the torch already in the active environment
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--gpu" ]]; then
    # Install into the current environment (which already has a CUDA torch); never replace torch.
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA torch in this environment')"
    "$PY" -m pip install -e ".[dev]"
    exit 0
fi
[[ -d .venv ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
.venv/bin/python -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
