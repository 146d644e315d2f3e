"""Process groups: setup and teardown for the trainer, and DeepSpeed's CPU shared memory.
(The local multi-rank runner that the tests and benchmarks use is `benchmarks.ranks`.)"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch.distributed as dist

SHM_DIR = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_buffer_names(port: str | int, addr: str = "127.0.0.1", world_size: int | None = None) -> list[Path]:
    """Paths of the shared-memory segments DeepSpeed's CPU communication op creates for a group
    rendezvousing on `addr:port` (one per rank; all ranks when `world_size` is None)."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_"
    if world_size is None:
        return sorted(SHM_DIR.glob(prefix + "*"))
    return [SHM_DIR / f"{prefix}{rank}" for rank in range(world_size)]


_released: set[Path] = set()


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    On the CPU accelerator, when LOCAL_SIZE equals the world size (the deepspeed launcher sets it),
    DeepSpeed 0.19.8 creates one ~69 MB `/dev/shm/deepspeed_allreduce_buffer_*` segment per rank and
    never unlinks it, so every run, good or crashed, leaves them behind until /dev/shm (RAM) is full.
    Each rank maps all peers' segments during `init_distributed`; after a barrier the names are no
    longer needed, the mappings stay valid, and the memory is returned when the last process exits.
    Collective: every rank must call it. Later calls for the same group return at once (every rank
    takes the same path, so no rank waits alone in the barrier).
    """
    if not dist.is_initialized() or not SHM_DIR.is_dir():
        return
    names = shm_buffer_names(os.environ.get("MASTER_PORT", ""), os.environ.get("MASTER_ADDR", ""),
                             world_size=dist.get_world_size())
    path = names[dist.get_rank()]
    if path in _released:
        return
    dist.barrier()
    path.unlink(missing_ok=True)
    _released.add(path)


def default_to_one_process() -> None:
    """Where no launcher (torchrun, deepspeed, mpirun) set the process group's environment, sets that of
    one process on a free local port, so that DeepSpeed (or accelerate) starts a group of one instead of
    looking for MPI."""
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))


def init_distributed(backend: str | None = None, release_shm: bool = True) -> tuple[int, int]:
    """(rank, world size). torchrun and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_*; a plain
    `python` run gets a one-process group on a free local port. `backend` None lets DeepSpeed pick
    (and discover MPI); `release_shm=False` keeps DeepSpeed's shared-memory segment (tests only)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    default_to_one_process()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if backend is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if release_shm:
        release_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
