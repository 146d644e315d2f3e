"""Process-group setup and teardown shared by the trainer, the benchmarks and the tests."""

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


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment once every rank has mapped it.

    On the CPU accelerator, when LOCAL_SIZE equals the world size (the deepspeed launcher sets it),
    DeepSpeed 0.19.8 creates one ~69 MB `/dev/shm/deepspeed_allreduce_buffer_*` segment per rank and
    never unlinks it, so every run, good or crashed, leaves them behind until /dev/shm (RAM) is full.
    Each rank maps all peers' segments during `init_distributed`; after a barrier the names are no
    longer needed, the mappings stay valid, and the memory is returned when the last process exits.
    Collective: every rank must call it.
    """
    if not dist.is_initialized():
        return
    rank = dist.get_rank()
    path = SHM_DIR / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                      f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if not path.parent.is_dir():
        return
    dist.barrier()
    path.unlink(missing_ok=True)


def init_distributed(backend: str | None = None) -> tuple[int, int]:
    """(rank, world size). torchrun and the deepspeed launcher set RANK/WORLD_SIZE/MASTER_*; a plain
    `python` run gets a one-process group on a free local port."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if backend is None:
        deepspeed.init_distributed()
    else:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    release_shm_buffer()
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
