"""Runs a test function on N local processes, over gloo or NCCL (see `benchmarks.ranks.run_local_ranks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from benchmarks.ranks import run_local_ranks
from fsam_ds.zero.distributed import free_port

__all__ = ["free_port", "run_distributed"]


def run_distributed(fn: Callable, world_size: int, tmp_path: Path, *args: Any, timeout: float = 240,
                    use_deepspeed: bool = False, release_shm: bool = True, backend: str = "gloo") -> list[Any]:
    """Returns [fn(0, world_size, *args), fn(1, ...), ...]; raises if any rank failed or timed out.
    `backend="nccl"` puts rank r on GPU r."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return run_local_ranks(fn, world_size, *args, timeout=timeout, init="deepspeed" if use_deepspeed else "plain",
                           release_shm=release_shm, workdir=tmp_path, backend=backend)
