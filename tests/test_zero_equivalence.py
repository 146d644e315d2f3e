"""ZeRO 0-3 on 2 gloo ranks equal a single-process run of the core on the global batch (fp32)."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import global_batches, mlp, tiny_bert, per_example_loss, run_equivalence, sam_config
from fsam_ds.sam.config import SAM_TYPES
from fsam_ds.sam.optim import SAMOptimizer

pytest.importorskip("deepspeed")


def reference(kind: str, sam_type: str, steps: int = 3, variant: str = "right", **overrides) -> torch.Tensor:
    model = mlp() if kind == "mlp" else tiny_bert()
    loss = per_example_loss(kind)
    cfg = sam_config(sam_type, **{**overrides, "rho": 0.0} if variant == "no-perturbation" else overrides)
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, cfg, lr=1e-2, weight_decay=0.0)
    for b in global_batches(kind, steps):
        if variant in ("right", "no-perturbation"):
            opt.step_batch(b, lambda batch: loss(model, batch))
        else:
            opt.zero_grad()
            loss(model, b).mean().backward()
            g1 = [p.grad.clone() for p in model.parameters()]
            opt.core.first_pass(opt.shards, 1e-2)  # perturb
            opt.zero_grad()
            loss(model, b).mean().backward()
            if variant == "summed":
                for p, g in zip(model.parameters(), g1):
                    p.grad.add_(g)
            if variant == "no-restore":
                opt.shards._applied = []
            else:
                opt.shards.remove_perturbation()
            opt.base_optimizer.step()
            opt.core.end_step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative_update_error(ours, ref, start) -> float:
    return ((ours - ref).norm() / (ref - start).norm()).item()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process_all_types(stage, tmp_path):
    results = run_distributed(run_equivalence, 2, tmp_path, stage, "mlp", SAM_TYPES, use_deepspeed=True)
    start = torch.cat([p.detach().reshape(-1) for p in mlp().parameters()])
    for sam_type in SAM_TYPES:
        ours = torch.cat(results[0][sam_type])
        assert torch.equal(ours, torch.cat(results[1][sam_type])), "ranks disagree"
        err = relative_update_error(ours, reference("mlp", sam_type), start)
        assert err <= 1e-5, (stage, sam_type, err)
        for variant in ("no-perturbation", "summed", "no-restore"):
            wrong = relative_update_error(ours, reference("mlp", sam_type, variant=variant), start)
            assert wrong > 1e-3, (stage, sam_type, variant, wrong)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_matches_single_process_tiny_bert(stage, tmp_path):
    results = run_distributed(run_equivalence, 2, tmp_path, stage, "bert", SAM_TYPES, use_deepspeed=True)
    start = torch.cat([p.detach().reshape(-1) for p in tiny_bert().parameters()])
    for sam_type in SAM_TYPES:
        ours = torch.cat(results[0][sam_type])
        err = relative_update_error(ours, reference("bert", sam_type), start)
        assert err <= 1e-4, (stage, sam_type, err)
        wrong = relative_update_error(ours, reference("bert", sam_type, variant="summed"), start)
        assert wrong > 1e-2, (stage, sam_type, wrong)


@pytest.mark.parametrize("stage", [2, 3])
def test_esam_selection_where_a_rank_keeps_no_example(stage, tmp_path):
    """gamma = 0.1 keeps 1 of the 8 examples: one rank runs its second pass on nothing (a zero-weighted
    forward keeps ZeRO's collectives in step) and the result is still the global-batch ESAM."""
    overrides = {"gamma": 0.1}
    results = run_distributed(run_equivalence, 2, tmp_path, stage, "mlp", ["esam", "fisher-esam"], 3, overrides,
                              use_deepspeed=True)
    start = torch.cat([p.detach().reshape(-1) for p in mlp().parameters()])
    for sam_type in ("esam", "fisher-esam"):
        ours = torch.cat(results[0][sam_type])
        assert relative_update_error(ours, reference("mlp", sam_type, **overrides), start) <= 1e-5
        assert relative_update_error(ours, reference("mlp", sam_type), start) > 1e-3
