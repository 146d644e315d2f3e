#!/usr/bin/env bash
# Two "nodes" on 127.0.0.1, to exercise the multi-node code path on one machine (CPU is fine).
#   bash launch/local_two_nodes.sh --config launch/configs/rte.yaml --optim.max_steps=20
#   LAUNCHER=deepspeed NPROC=1 bash launch/local_two_nodes.sh --config ...
# Variables: LAUNCHER (torchrun | deepspeed), NPROC per "node" (1), MASTER_PORT (29511),
# OMP_NUM_THREADS (1), TIMEOUT (seconds for the whole run; 0 = none), TORCHRUN, DEEPSPEED, TRAIN_MODULE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

LAUNCHER=${LAUNCHER:-torchrun}
NPROC=${NPROC:-1}
MASTER_PORT=${MASTER_PORT:-29511}
TIMEOUT=${TIMEOUT:-0}
# Neither launcher sets this for one rank per node, and both "nodes" share this machine's cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if (( $# == 0 )); then set -- --config "$FSAM_DEFAULT_CONFIG"; fi

HOSTFILE=$(mktemp)
printf 'node0 slots=%s\nnode1 slots=%s\n' "$NPROC" "$NPROC" > "$HOSTFILE"
pids=()
cleanup() {
    kill "${pids[@]}" 2>/dev/null || true
    rm -f "$HOSTFILE"
}
trap cleanup EXIT

start_node() {
    local rank=$1; shift
    local cmd
    case "$LAUNCHER" in
        torchrun)
            cmd=("${TORCHRUN:-torchrun}" --nnodes 2 --node_rank "$rank" --nproc_per_node "$NPROC"
                 --master_addr 127.0.0.1 --master_port "$MASTER_PORT" -m "$TRAIN_MODULE") ;;
        deepspeed)
            cmd=("${DEEPSPEED:-deepspeed}" --hostfile "$HOSTFILE" --no_ssh --node_rank "$rank"
                 --master_addr 127.0.0.1 --master_port "$MASTER_PORT" --module "$TRAIN_MODULE") ;;
        *)
            echo "error: LAUNCHER=$LAUNCHER; use torchrun or deepspeed" >&2; return 2 ;;
    esac
    # A rank that fails before the rendezvous leaves its peer waiting, hence the optional timeout.
    echo "+ node $rank: ${cmd[*]} $*" >&2
    # exec: the pid recorded below is then timeout's own, and a kill reaches the launcher.
    exec timeout --kill-after=30 "$TIMEOUT" "${cmd[@]}" "$@"
}

for rank in 0 1; do
    start_node "$rank" "$@" &
    pids+=($!)
done
status=0
for _ in 0 1; do
    if ! wait -n; then
        # One node failed: stop the other instead of letting it wait for its peer forever.
        status=1
        kill "${pids[@]}" 2>/dev/null || true
    fi
done
exit "$status"
