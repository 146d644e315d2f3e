"""Local multi-process runs for the tests and the benchmarks: `world_size` spawned ranks on this
machine (gloo on the CPU, or NCCL with one GPU per rank), each rank's result or traceback read back."""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsam_ds.zero.distributed import free_port, init_distributed, shm_buffer_names, teardown


# the DeepSpeed accelerator each backend runs on: gloo ranks stay on the CPU, NCCL rank r drives GPU r
# (init_distributed sets the device from LOCAL_RANK)
ACCELERATOR = {"gloo": "cpu", "nccl": "cuda"}


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, out: str, args: tuple,
               init: str | None, release_shm: bool, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR=ACCELERATOR[backend])
    # one thread per rank: the ranks share the machine's cores, more threads oversubscribe them
    torch.set_num_threads(1)
    try:
        if init == "deepspeed":
            init_distributed(backend, release_shm=release_shm)
        elif init == "plain":
            if backend == "nccl":
                torch.cuda.set_device(rank)
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - the traceback goes back to the parent
        result = ("error", traceback.format_exc())
    torch.save(result, f"{out}.part")
    os.replace(f"{out}.part", out)
    try:
        if result[0] == "ok":
            teardown()
        elif dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may never get there
    finally:
        os._exit(0)  # gloo can abort at interpreter exit after a good run


def _wait(procs: list, outs: list[str], timeout: float) -> tuple[list[tuple | None], list[int]]:
    """Waits for every rank and reads each report once, as it appears; once a rank has reported a
    failure the others (likely blocked in a collective) get a short grace and are killed, as is
    everything still running at `timeout`. Returns the reports (None: none written) and the ranks
    that had to be killed."""
    reports: list[tuple | None] = [None] * len(outs)

    def read_new() -> None:
        for r, out in enumerate(outs):
            if reports[r] is None and os.path.exists(out):
                reports[r] = torch.load(out, weights_only=False)

    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        read_new()
        if any(report is not None and report[0] != "ok" for report in reports):
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    killed = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join(5)
    read_new()
    return reports, killed


def run_local_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240,
                    init: str | None = "deepspeed", release_shm: bool = True,
                    workdir: str | os.PathLike | None = None, backend: str = "gloo") -> list[Any]:
    """[fn(0, world_size, *args), fn(1, ...), ...] from `world_size` spawned local processes.

    `backend`: "gloo" (CPU ranks on DeepSpeed's CPU accelerator) or "nccl" (rank r on GPU r, one GPU
    per rank). `init`: "deepspeed" (`init_distributed` over `backend`, which releases gloo's shared
    memory unless told not to), "plain" (a plain torch process group) or None (`fn` sets the group up
    itself, reading the backend's accelerator from DS_ACCELERATOR). `fn` must be
    importable by the spawned processes. Results travel through files, each rank tears its group
    down and leaves with os._exit; a rank still running at `timeout`, or 10 s after another rank
    failed, is killed. Raises with the failing rank's traceback, or says which rank timed out.
    """
    if backend not in ACCELERATOR:
        raise ValueError(f"run_local_ranks: backend={backend!r} is not one of {sorted(ACCELERATOR)}; use "
                         "'gloo' on CPUs or 'nccl' with one CUDA device per rank")
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(f"run_local_ranks: world_size={world_size} NCCL ranks need as many visible GPUs, "
                         f"found {torch.cuda.device_count()}; pass world_size <= torch.cuda.device_count()")
    context = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fsam-ranks-", dir=workdir) as tmp:
        outs = [str(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
        procs = [context.Process(target=_rank_main, args=(fn, r, world_size, port, outs[r], args, init, release_shm,
                                                           backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        reports, killed = _wait(procs, outs, timeout)
        for path in shm_buffer_names(port, world_size=world_size):  # left behind by a killed rank
            path.unlink(missing_ok=True)
    for r, report in enumerate(reports):  # a traceback says more than the peers it left hanging
        if report is not None and report[0] != "ok":
            raise RuntimeError(f"rank {r} failed:\n{report[1]}")
    for r, report in enumerate(reports):
        if report is None:
            state = f"timed out after {timeout:.0f} s" if r in killed else f"exited with code {procs[r].exitcode}"
            raise RuntimeError(f"rank {r} wrote no result ({state})")
    return [report[1] for report in reports]


def accelerate_on_gloo() -> None:
    """accelerate 1.16 finds no distributed backend on a machine without an accelerator and then runs
    DeepSpeed on one process, whatever the launcher set up; this makes it take the gloo ranks started
    here. For CPU ranks only: on GPUs accelerate finds NCCL itself."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    found = PartialState._prepare_backend
    if getattr(found, "gloo_for_local_ranks", False):
        return

    def prepare_backend(self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: Any = None) -> Any:
        chosen, kind = found(self, cpu, sagemaker_dp, backend)
        if chosen is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return chosen, kind

    prepare_backend.gloo_for_local_ranks = True
    PartialState._prepare_backend = prepare_backend

