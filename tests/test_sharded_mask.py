"""The Fisher mask and the perturbation computed on uneven shards over 2 gloo processes equal the
single-process ones bit for bit (no DeepSpeed involved)."""

from __future__ import annotations

from typing import Sequence

import torch

from dist_harness import run_distributed
from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.core import SharpnessAware
from fsam_ds.sam.shards import Comm, LocalComm, Piece, TorchComm

SHAPES = {"enc.0.weight": (7, 9), "enc.0.bias": (9,), "enc.1.weight": (13, 5), "head.weight": (3, 5),
          "unused.weight": (4, 4)}
# rank 0 owns [0, cut) of each flattened parameter, rank 1 the rest: deliberately uneven
CUTS = {"enc.0.weight": 50, "enc.0.bias": 0, "enc.1.weight": 64, "head.weight": 15, "unused.weight": 3}


def full_gradients() -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    grads = {}
    for name, shape in SHAPES.items():
        # quantised so that many scores tie, including across the shard boundary
        grads[name] = (torch.randint(-4, 5, shape, generator=g).float() / 8) if name != "unused.weight" else None
    return grads


class SliceShards:
    """Holds part of each parameter: a minimal ShardAccess for the test."""

    def __init__(self, pieces: Sequence[Piece], grads: Sequence[torch.Tensor | None], comm: Comm) -> None:
        self.pieces, self._grads, self.comm = list(pieces), list(grads), comm
        self.applied: list = []

    def grads(self):
        return self._grads

    def set_grads(self, grads):
        self._grads = list(grads)

    def weights(self):
        return [torch.ones(p.size) for p in self.pieces]

    def apply_perturbation(self, deltas):
        self.applied = [None if d is None else d.clone() for d, _ in deltas]

    def remove_perturbation(self):
        self.applied = []


def local_pieces(rank: int, world: int, cfg: SAMConfig):
    grads = full_gradients()
    pieces, local = [], []
    for index, (name, shape) in enumerate(SHAPES.items()):
        numel = torch.Size(shape).numel()
        lo, hi = (0, CUTS[name]) if rank == 0 else (CUTS[name], numel)
        if world == 1:
            lo, hi = 0, numel
        pieces.append(Piece(name, index, numel, lo, hi - lo, cfg.is_candidate(name)))
        g = grads[name]
        local.append(None if g is None else g.reshape(-1)[lo:hi].clone())
    return pieces, local


def perturb(rank: int, world: int, cfg: SAMConfig, comm: Comm):
    pieces, grads = local_pieces(rank, world, cfg)
    core = SharpnessAware(cfg, pieces, len(SHAPES), initial_lr=1.0)
    shards = SliceShards(pieces, grads, comm)
    stats = core.first_pass(shards, lr=1.0)
    masks = [None if m is None else m for m in core._masks()]
    return {"masks": [m if isinstance(m, torch.Tensor) else None for m in masks], "deltas": shards.applied,
            "e_norm": stats.perturbation_norm, "pieces": pieces}


CONFIGS = [SAMConfig(sam_type="fisher-sam", keep_ratio=0.3, candidate_exclude=("bias",)),
           SAMConfig(sam_type="fisher-sam", keep_ratio=0.77, candidate_exclude=(), renormalize=True),
           SAMConfig(sam_type="fisher-esam", keep_ratio=0.1, beta=0.6, seed=3, candidate_exclude=("bias",))]


def worker(rank: int, world: int):
    return [perturb(rank, world, cfg, TorchComm()) for cfg in CONFIGS]


def test_sharded_mask_equals_single_process_bit_for_bit(tmp_path):
    sharded = run_distributed(worker, 2, tmp_path)
    for c, cfg in enumerate(CONFIGS):
        single = perturb(0, 1, cfg, LocalComm())
        assert sharded[0][c]["e_norm"] == single["e_norm"] or abs(sharded[0][c]["e_norm"] - single["e_norm"]) < 1e-12
        for i, name in enumerate(SHAPES):
            ref_mask, ref_delta = single["masks"][i], single["deltas"][i]
            parts_mask = [sharded[r][c]["masks"][i] for r in range(2)]
            parts_delta = [sharded[r][c]["deltas"][i] for r in range(2)]
            if ref_mask is None:
                assert all(m is None for m in parts_mask), name
            else:
                assert torch.equal(torch.cat(parts_mask), ref_mask), (cfg.sam_type, name)
            if ref_delta is None:
                assert all(d is None for d in parts_delta), name
            else:
                assert torch.allclose(torch.cat(parts_delta), ref_delta, rtol=1e-6, atol=0), (cfg.sam_type, name)
        # the quantised gradients force ties at the threshold: the test exercises tie breaking
        scores = torch.cat([g.reshape(-1) ** 2 for n, g in full_gradients().items()
                            if g is not None and cfg.is_candidate(n)])
        k = int((scores.numel() + (16 if cfg.is_candidate("unused.weight") else 0)) * cfg.keep_ratio)
        kth = torch.sort(torch.cat([scores, torch.zeros(16 if cfg.is_candidate("unused.weight") else 0)]),
                         descending=True).values[k - 1]
        assert int((scores == kth).sum()) > 1
