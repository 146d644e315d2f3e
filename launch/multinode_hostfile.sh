#!/usr/bin/env bash
# Several nodes from a DeepSpeed hostfile ("host slots=N" lines, see launch/hostfile).
#
# ssh mode (run once, on node 0; DeepSpeed reaches the others with pdsh over passwordless ssh):
#   HOSTFILE=launch/hostfile bash launch/multinode_hostfile.sh --config launch/configs/sst2.yaml
#   Only variables listed in ./.deepspeed_env (lines NAME=value, e.g. OMP_NUM_THREADS=8) reach the
#   other nodes in this mode.
# no-ssh mode (run once per node, e.g. from a scheduler; each node gets its own NODE_RANK):
#   HOSTFILE=launch/hostfile NODE_RANK=1 MASTER_ADDR=worker-0 bash launch/multinode_hostfile.sh --config ...
#
# Variables: HOSTFILE, NODE_RANK (unset = ssh mode), MASTER_ADDR (default: first host of the
# hostfile), MASTER_PORT (29500), OMP_NUM_THREADS, DEEPSPEED (launcher), TRAIN_MODULE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

HOSTFILE=${HOSTFILE:-$FSAM_LAUNCH_DIR/hostfile}
[[ -r "$HOSTFILE" ]] || { echo "error: hostfile '$HOSTFILE' not found; set HOSTFILE" >&2; exit 2; }
# Without an address DeepSpeed would ask node 0 over ssh ('hostname -I'), which --no_ssh forbids.
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    slots=$(awk '!/^[[:space:]]*(#|$)/ {split($2, s, "="); print s[2]; exit}' "$HOSTFILE")
    export OMP_NUM_THREADS=$(fsam_threads_per_rank "${slots:-1}")
fi
if (( $# == 0 )); then set -- --config "$FSAM_DEFAULT_CONFIG"; fi

launcher=("${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE"
          --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${NODE_RANK:-}" ]]; then
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi

set -x
exec "${launcher[@]}" --module "$TRAIN_MODULE" "$@"
