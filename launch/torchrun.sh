#!/usr/bin/env bash
# torchrun on one node, or on several with a static rendezvous (run once per node).
#   bash launch/torchrun.sh --config launch/configs/rte.yaml --seed=1
#   NPROC=4 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh --config ...   # on node 0
#   NPROC=4 NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/torchrun.sh --config ...   # on node 1
# Variables: NPROC, NNODES (1), NODE_RANK (0), MASTER_ADDR, MASTER_PORT, OMP_NUM_THREADS,
# TORCHRUN (launcher), TRAIN_MODULE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=${NPROC:-$(fsam_default_nproc)}
NNODES=${NNODES:-1}
# torchrun sets 1 thread per rank only when NPROC > 1; set it for every case.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(fsam_threads_per_rank "$NPROC")}
if (( $# == 0 )); then set -- --config "$FSAM_DEFAULT_CONFIG"; fi

launcher=("${TORCHRUN:-torchrun}")
if (( NNODES > 1 )); then
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"
    launcher+=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK (0..NNODES-1) on each node}"
               --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
elif [[ -n "${MASTER_PORT:-}" ]]; then
    launcher+=(--master_addr 127.0.0.1 --master_port "$MASTER_PORT")
else
    launcher+=(--standalone)  # picks a free port
fi

set -x
exec "${launcher[@]}" --nproc_per_node "$NPROC" -m "$TRAIN_MODULE" "$@"
