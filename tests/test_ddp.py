"""SAMOptimizer under DDP (2 gloo processes) equals one process on the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_harness import run_distributed
from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.optim import SAMOptimizer
from fsam_ds.sam.shards import TorchComm

TYPES = ["sam", "fisher-sam", "gsam", "esam", "fisher-esam"]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
            for _ in range(3)]


def config(sam_type: str) -> SAMConfig:
    return SAMConfig(sam_type=sam_type, keep_ratio=0.3, beta=0.7, gamma=0.5, seed=2)


def ddp_worker(rank: int, world: int):
    out = {}
    for sam_type in TYPES:
        net = nn.parallel.DistributedDataParallel(model())
        opt = SAMOptimizer(net.module.named_parameters(), torch.optim.AdamW, config(sam_type), comm=TorchComm(),
                           lr=1e-2)
        for x, y in batches():
            half = slice(rank * 6, (rank + 1) * 6)
            opt.step_batch((x[half], y[half]), lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none"))
        out[sam_type] = torch.cat([p.detach().reshape(-1) for p in net.module.parameters()])
    return out


@pytest.mark.parametrize("sam_type", TYPES)
def test_ddp_equals_single_process(sam_type, tmp_path_factory):
    global _DDP
    if "_DDP" not in globals():
        _DDP = run_distributed(ddp_worker, 2, tmp_path_factory.mktemp("ddp"))
    net = model()
    opt = SAMOptimizer(net.named_parameters(), torch.optim.AdamW, config(sam_type), lr=1e-2)
    for x, y in batches():
        opt.step_batch((x, y), lambda b: F.cross_entropy(net(b[0]), b[1], reduction="none"))
    ref = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    start = torch.cat([p.detach().reshape(-1) for p in model().parameters()])
    for rank in range(2):
        ours = _DDP[rank][sam_type]
        assert ((ours - ref).norm() / (ref - start).norm()).item() < 1e-10, (rank, sam_type)
