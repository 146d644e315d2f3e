"""bf16 and fp16 (loss scaling, overflow in either pass), gradient accumulation, the sharded Fisher
mask and checkpoint resume on DeepSpeed ZeRO with 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import (global_batches, mlp, per_example_loss, run_accumulation, run_bf16, run_checkpoint,
                        run_fp16_overflow, run_mask_capture, run_master_shared_with_weights, sam_config)

pytest.importorskip("deepspeed")


def bf16_round(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_update_applied_at_unperturbed_master(stage, tmp_path):
    assert_bf16_update_applied(run_distributed(run_bf16, 2, tmp_path, stage, "mlp", "fisher-sam",
                                               use_deepspeed=True)[0])


def assert_bf16_update_applied(res: dict, device: str = "cpu") -> None:
    """`run_bf16`'s report (mlp, fisher-sam): each update applied at the unperturbed master, and a
    second-pass gradient within bf16 noise of the fp32 reference. `device`: where the ranks stepped;
    the shadow optimizer steps there too, so that its kernels, and so its last bits, are DeepSpeed's."""
    # shadow: torch AdamW from DeepSpeed's initial master, fed DeepSpeed's own second-pass gradient
    shadow = [t.clone().to(device).requires_grad_(True) for t in res["initial_master"]]
    opt = torch.optim.AdamW(shadow, lr=1e-2, weight_decay=0.0)
    for g2, master, module in zip(res["g2"], res["masters"], res["module"]):
        for p, g in zip(shadow, g2):
            p.grad = g.clone().to(device)
        opt.step()
        for p, m in zip(shadow, master):
            assert torch.equal(p.detach().cpu(), m), "update not applied at the unperturbed master"
        for m, lp in zip(master, module):
            assert torch.equal(m.to(torch.bfloat16), lp), "module weights are not the bf16 cast of the master"
    # second-pass gradient of step 1 against an fp32 reference from the same (bf16-rounded) start
    model = bf16_round(mlp())
    loss = per_example_loss("mlp")
    batch = global_batches("mlp", 1)[0]
    from fsam_ds.sam.optim import SAMOptimizer

    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, sam_config("fisher-sam"), lr=0.0)
    model.zero_grad()
    loss(model, batch).mean().backward()
    g1 = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    opt.first_step(zero_grad=True)
    loss(model, batch).mean().backward()
    g2_ref = torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])
    g2 = torch.cat(res["g2"][0])
    err = ((g2 - g2_ref).norm() / g2_ref.norm()).item()
    summed = ((g1 + g2_ref - g2_ref).norm() / g2_ref.norm()).item()
    assert err < 2e-2, err
    assert summed > 0.3  # a gradient that kept the first pass would be far outside bf16 noise


@pytest.mark.parametrize("stage,sam_type", [(1, "fisher-sam"), (2, "fisher-sam"), (3, "fisher-sam"),
                                            (2, "fisher-esam"), (3, "gsam")])
def test_fp16_overflow_in_either_pass_changes_nothing(stage, sam_type, tmp_path):
    assert_overflow_changes_nothing(run_distributed(run_fp16_overflow, 2, tmp_path, stage, sam_type,
                                                    use_deepspeed=True)[0])


def assert_overflow_changes_nothing(res: dict) -> None:
    """`run_fp16_overflow`'s report: each poisoned step skipped with nothing changed, the next one applied."""
    assert res["first"][0] is False
    for name in ("pass1", "pass2"):
        r = res[name]
        assert r["skipped"], name
        assert r["master_same"] and r["module_same"], (name, r)
        assert r["scale_after"] < r["scale_before"], (name, r)
    assert res["pass1"]["step_count"] == 1 and res["pass2"]["step_count"] == 1
    assert res["next"]["skipped"] is False and res["next"]["changed"]
    assert res["next"]["skipped_steps"] == 2 and res["next"]["ds_skipped"] == 2


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_micro_batches_of_four_equal_one_of_eight(stage, tmp_path):
    for sam_type in ("sam", "fisher-esam"):
        one = run_distributed(run_accumulation, 2, tmp_path / f"{sam_type}1", stage, sam_type, 1,
                              use_deepspeed=True)[0]
        two = run_distributed(run_accumulation, 2, tmp_path / f"{sam_type}2", stage, sam_type, 2,
                              use_deepspeed=True)[0]
        start = torch.cat([p.detach().reshape(-1) for p in mlp().parameters()])
        a, b = torch.cat(one), torch.cat(two)
        assert ((a - b).norm() / (a - start).norm()).item() < 1e-5, sam_type


def reference_global_topk(g1: list[torch.Tensor], candidates: list[bool], keep_ratio: float):
    scores = [g.double() ** 2 if c else None for g, c in zip(g1, candidates)]
    entries = [(-s[j].item(), i, j) for i, s in enumerate(scores) if s is not None for j in range(s.numel())]
    k = int(len(entries) * keep_ratio)
    chosen = {(i, j) for _, i, j in sorted(entries)[:k]}
    return chosen


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharded_mask_selects_the_global_topk(stage, tmp_path):
    res = run_distributed(run_mask_capture, 2, tmp_path, stage, "mlp", 0.23, use_deepspeed=True)
    names = res[0]["names"]
    cfg = sam_config("fisher-sam", keep_ratio=0.23)
    chosen = reference_global_topk(res[0]["g1"], [cfg.is_candidate(n) for n in names], 0.23)
    got = set()
    for r in res:
        for (index, offset, size), mask in zip(r["pieces"], r["masks"]):
            if mask is not None:
                got |= {(index, offset + j) for j in mask.nonzero().reshape(-1).tolist()}
    assert got == chosen
    # each rank holds only its own shard of the mask
    sizes = [sum(size for _, _, size in r["pieces"]) for r in res]
    total = sum(g.numel() for g in res[0]["g1"])
    if stage in (1, 2, 3):
        assert all(s < total for s in sizes)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_equals_uninterrupted_run(stage, tmp_path):
    res = run_distributed(run_checkpoint, 2, tmp_path, stage, "fisher-esam", str(tmp_path / "ckpt"),
                          use_deepspeed=True)
    for r in res:
        assert r["step"] == 3
        assert all(torch.equal(a, b) for a, b in zip(r["expected"], r["got"]))
        assert not all(torch.equal(a, b) for a, b in zip(r["expected"], r["blind"]))


def test_bf16_zero3_resume_continues_bit_for_bit(tmp_path):
    """bf16 at ZeRO-3: the perturbation reaches a parameter's bf16 partition and its materialised copy (a
    persistent parameter, or one still gathered) rounded alike, so the second pass sees the same w + e
    whichever parameters a fresh engine (after a checkpoint load) happens to hold gathered; with e added
    unrounded to the partition, the first step after the load differed."""
    res = run_distributed(run_checkpoint, 2, tmp_path, 3, "fisher-sam", str(tmp_path / "ckpt"), "bf16",
                          use_deepspeed=True)
    for r in res:
        assert r["step"] == 3
        assert all(torch.equal(a, b) for a, b in zip(r["expected"], r["got"]))


def test_a_master_sharing_the_weights_memory_is_refused(tmp_path):
    """The restore is DeepSpeed's step copying the unperturbed fp32 master into the weights. DeepSpeed 0.19.8
    keeps the master apart; one that shared it with fp32 weights (as its ZeRO-3 code intends) would make
    every step start from w + e: the engine refuses such a layout, and without the refusal the weights
    after three fisher-sam steps are indeed wrong."""
    for r in run_distributed(run_master_shared_with_weights, 2, tmp_path, use_deepspeed=True):
        assert r["refused"] is not None and "fp32 master" in r["refused"] and "deepspeed>=0.19.8" in r["refused"]
        assert not all(torch.equal(a, b) for a, b in zip(r["apart"], r["shared"]))
