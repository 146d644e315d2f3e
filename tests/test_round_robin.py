"""round_robin_gradients at ZeRO 1/2: why fsam_ds refuses it.

DeepSpeed orders the flat fp32 buffer round-robin over ranks, but its parameter-to-fragment map
(`_hp_mapping`) follows the original parameter order when no parameter needs alignment padding. The
SAM step reads and writes parameters through those fragments, so with the refusal bypassed a run
either crashes (parameters of different sizes) or silently computes another update than the
single-process reference (four equal 8x8 weights). fsam_ds.initialize refuses the setting.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_harness import run_distributed
from ds_workers import build_engine, full_params, sam_config, split
from fsam_ds.sam.config import ConfigError
from fsam_ds.sam.optim import SAMOptimizer

pytest.importorskip("deepspeed")

STEPS, BATCH, LR = 3, 8, 1e-2


def uneven() -> nn.Module:
    """Parameters of different sizes, none needing alignment padding on 2 ranks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def four_equal() -> nn.Module:
    """Four 8x8 weights: the round-robin order and the original order hold equal-sized pieces."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(8, 8, bias=False), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


MODELS = {"uneven": uneven, "four_equal": four_equal}


def batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(BATCH, 8, generator=g), "y": torch.randint(0, 4, (BATCH,), generator=g)}
            for _ in range(STEPS)]


def loss_fn(module: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(module(batch["x"])[:, :4], batch["y"], reduction="none")


def reference(kind: str) -> torch.Tensor:
    """The same steps in one process on the global batch (plain PyTorch SAM)."""
    model = MODELS[kind]()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, sam_config("sam"), lr=LR, weight_decay=0.0)
    for b in batches():
        opt.step_batch(b, lambda batch: loss_fn(model, batch))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def bypassed_round_robin(rank: int, world: int, kind: str, stage: int, crash_dir: str,
                         round_robin: bool = True) -> list[torch.Tensor]:
    """Rank worker: trains with round_robin_gradients and the refusal switched off. A rank that
    fails writes its error to crash_dir first (the harness reports only the first failed rank, and
    the peer of a crashed rank fails on the closed connection)."""
    import fsam_ds.zero.engine as fe

    fe.check_sam_compatible = lambda config, source="DeepSpeed config": None
    engine = build_engine(MODELS[kind](), stage, sam=sam_config("sam"), lr=LR, micro=BATCH // world,
                          round_robin_gradients=round_robin)
    try:
        for b in batches():
            engine.train_step(split(b, rank, world), loss_fn)
    except Exception as err:
        (Path(crash_dir) / f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        raise
    return full_params(engine.engine)


def test_uneven_sizes_crash_with_the_check_bypassed(tmp_path):
    crash_dir = tmp_path / "crash"
    crash_dir.mkdir()
    with pytest.raises(RuntimeError):
        run_distributed(bypassed_round_robin, 2, tmp_path, "uneven", 2, str(crash_dir), use_deepspeed=True)
    errors = "\n".join(p.read_text() for p in sorted(crash_dir.glob("rank*.txt")))
    # a parameter's fragment holds another parameter's entries: the sizes do not match
    assert "must match the existing size" in errors and "_write_full" in errors, errors


def test_equal_sizes_give_a_wrong_update_with_the_check_bypassed(tmp_path):
    start = torch.cat([p.detach().reshape(-1) for p in four_equal().parameters()])
    ref = reference("four_equal")
    errors = {}
    for round_robin in (False, True):
        results = run_distributed(bypassed_round_robin, 2, tmp_path, "four_equal", 2, str(tmp_path), round_robin,
                                  use_deepspeed=True)
        assert torch.equal(torch.cat(results[0]), torch.cat(results[1])), "ranks disagree"
        errors[round_robin] = ((torch.cat(results[0]) - ref).norm() / (ref - start).norm()).item()
    assert errors[False] <= 1e-5, errors  # the same run without round-robin matches the reference
    assert errors[True] > 0.05, errors  # 9.5 measured: no crash, a silently different update


@pytest.mark.parametrize("stage", [1, 2])
def test_initialize_refuses_round_robin_gradients(stage):
    with pytest.raises(ConfigError) as err:  # refused before DeepSpeed or a process group is touched
        build_engine(uneven(), stage, sam=sam_config("sam"), round_robin_gradients=True)
    assert "round_robin_gradients" in str(err.value) and "Remove zero_optimization.round_robin_gradients" in str(
        err.value)
