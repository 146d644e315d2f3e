#!/usr/bin/env bash
# One node, NPROC ranks, DeepSpeed launcher. Arguments go to fsam_ds.train.
#   bash launch/deepspeed_single_node.sh --config launch/configs/rte.yaml --sam.rho=0.05 --seed=1
#   NPROC=2 bash launch/deepspeed_single_node.sh --config launch/configs/rte.yaml --zero_stage=3
# Variables: NPROC, MASTER_PORT (29500), OMP_NUM_THREADS, DEEPSPEED (launcher), TRAIN_MODULE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=${NPROC:-$(fsam_default_nproc)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(fsam_threads_per_rank "$NPROC")}
if (( $# == 0 )); then set -- --config "$FSAM_DEFAULT_CONFIG"; fi

set -x
exec "${DEEPSPEED:-deepspeed}" --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
    --module "$TRAIN_MODULE" "$@"
