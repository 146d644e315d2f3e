# Sourced by the launch scripts: defaults shared by all of them.
#   TRAIN_MODULE   python module each rank runs (fsam_ds.train)
#   NPROC          processes per node (default: number of GPUs, else 1)
#   OMP_NUM_THREADS threads per rank (default: cores / NPROC)

TRAIN_MODULE=${TRAIN_MODULE:-fsam_ds.train}
FSAM_LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

fsam_gpu_count() {
    local count=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    echo "${count:-0}"
}

# Without --num_gpus/--nproc_per_node on a CPU machine DeepSpeed counts NUMA nodes instead.
fsam_default_nproc() {
    local gpus
    gpus=$(fsam_gpu_count)
    if (( gpus > 0 )); then echo "$gpus"; else echo 1; fi
}

# The deepspeed launcher does not set OMP_NUM_THREADS; every rank would then use every core.
fsam_threads_per_rank() {
    local ranks=$1 cores
    cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
    if (( cores / ranks > 0 )); then echo $(( cores / ranks )); else echo 1; fi
}

FSAM_DEFAULT_CONFIG=$FSAM_LAUNCH_DIR/configs/rte.yaml
