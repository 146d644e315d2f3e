"""Runs a function on N local processes over gloo; results come back from files, never hangs.

Each worker sets the usual launcher environment, initialises the process group, runs the
function, writes its result (or traceback) to a file, tears the group down and leaves with
os._exit, because gloo can abort at interpreter exit after a good run. The parent reads the
result files and kills whatever is still alive after `timeout` seconds.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from fsam_ds.distributed import free_port, release_shm_buffer, shm_buffer_names


def _worker(fn: Callable, rank: int, world_size: int, port: int, out: str, args: tuple, use_deepspeed: bool,
            release_shm: bool = True) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            if release_shm:
                release_shm_buffer()
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the traceback goes back to the parent
        result = ("error", traceback.format_exc())
    torch.save(result, f"{out}.part")
    os.replace(f"{out}.part", out)
    try:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
    finally:
        os._exit(0)


def _failed(out: str) -> bool:
    return os.path.exists(out) and torch.load(out, weights_only=False)[0] != "ok"


def _wait(procs: list, outs: list[str], timeout: float) -> list[int]:
    """Waits for every rank; once one has reported a failure the others (likely blocked in a
    collective) get a short grace and are killed, as is everything still running at `timeout`.
    Returns the ranks that had to be killed."""
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(_failed(out) for out in outs):
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    return hung


def run_distributed(fn: Callable, world_size: int, tmp_path: Path, *args: Any, timeout: float = 240,
                    use_deepspeed: bool = False, release_shm: bool = True) -> list[Any]:
    """Returns [fn(0, world_size, *args), fn(1, ...), ...]; raises if any rank failed or timed out."""
    ctx = mp.get_context("spawn")
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, outs[r], args, use_deepspeed,
                                                     release_shm))
             for r in range(world_size)]
    for p in procs:
        p.start()
    hung = _wait(procs, outs, timeout)
    for path in shm_buffer_names(port, world_size=world_size):  # left behind by a killed rank
        path.unlink(missing_ok=True)
    results = []
    for r, out in enumerate(outs):
        if not os.path.exists(out):
            state = "timed out" if r in hung else f"exited with code {procs[r].exitcode}"
            raise RuntimeError(f"rank {r} wrote no result ({state})")
        status, value = torch.load(out, weights_only=False)
        if status != "ok":
            raise RuntimeError(f"rank {r} failed:\n{value}")
        results.append(value)
    return results
