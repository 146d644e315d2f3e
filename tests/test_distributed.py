"""DeepSpeed's CPU communication op leaves one /dev/shm segment per rank behind unless we unlink it."""

from __future__ import annotations

import pytest

import ds_workers as w
from dist_harness import run_distributed
from fsam_ds.zero.distributed import SHM_DIR


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
@pytest.mark.parametrize("release", [False, True])
def test_shared_memory_segments_are_unlinked_after_setup(tmp_path, release):
    results = run_distributed(w.run_shm_check, 2, tmp_path, release, use_deepspeed=True, release_shm=release,
                              timeout=120)
    for left, total in results:
        assert total == 3.0  # the mappings keep working after the names are gone
        assert len(left) == (0 if release else 2)  # without the release DeepSpeed leaves both behind


def test_a_failing_rank_is_reported_and_its_blocked_peer_stopped(tmp_path):
    with pytest.raises(RuntimeError, match="rank 1 failed:(.|\n)*rank one gives up"):
        run_distributed(w.fail_on_rank_one, 2, tmp_path, use_deepspeed=False, timeout=120)


def test_unknown_backend_and_too_few_gpus_for_nccl_are_refused_before_any_rank_starts():
    import torch

    from benchmarks.ranks import run_local_ranks

    with pytest.raises(ValueError, match="backend='mpi' is not one of \\['gloo', 'nccl'\\]"):
        run_local_ranks(w.fail_on_rank_one, 2, backend="mpi")
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(ValueError, match=f"world_size={too_many} NCCL ranks need as many visible GPUs"):
        run_local_ranks(w.fail_on_rank_one, too_many, backend="nccl")
