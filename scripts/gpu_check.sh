#!/usr/bin/env bash
# GPU readiness check, under 10 minutes on one H200-class GPU: the CUDA tests on NCCL (every visible
# GPU a rank) and the ZeRO benchmark ratios, summarised in OUT_DIR/summary.json and a printed table.
#   bash scripts/gpu_check.sh OUT_DIR             run it (after `bash install.sh --gpu`, in that environment)
#   bash scripts/gpu_check.sh OUT_DIR --dry-run   print the commands and their time limits only
# Installs nothing. PYTHON picks the interpreter (default: python). Details: benchmarks/gpu_check.py.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
