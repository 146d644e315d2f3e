"""The shared two-pass step: the phases it reports to an observer, frozen tensors, and skipped steps
that leave the accumulated Fisher estimate and the mask exactly as they were."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import RecordingObserver, run_fp16_skip_keeps_fisher, run_observed_steps
from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.optim import SAMOptimizer
# float64_by_default is an autouse fixture: imported, it makes this module's tests float64 too
from test_core_math import float64_by_default, make_batch, make_model, per_example, reference_mask  # noqa: F401


# ---------------------------------------------------------------- observer
FISHER_SAM_STEP = ["zero_grads", "forward", "backward",
                   "first_pass", "first_pass/rebuild_mask", "first_pass/apply_perturbation",
                   "zero_grads", "forward", "backward", "second_pass", "restore", "step", "zero_grads"]


def test_observer_sees_the_phases_of_a_fisher_sam_step_in_order():
    model, batch = make_model(), make_batch()
    observer = RecordingObserver()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type="fisher-sam", mask_interval=2),
                       observer=observer, lr=0.1)
    assert opt.observer is observer and opt.core.observer is observer
    opt.step_batch(batch, per_example(model))  # step 0 builds the mask
    assert observer.seen == FISHER_SAM_STEP
    observer.seen.clear()
    opt.step_batch(batch, per_example(model))  # step 1 keeps it
    assert observer.seen == [p for p in FISHER_SAM_STEP if p != "first_pass/rebuild_mask"]


def test_observer_sees_esam_selection_and_can_be_replaced():
    model, batch = make_model(), make_batch()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type="esam", gamma=0.5), lr=0.1)
    observer = RecordingObserver()
    opt.observer = observer
    opt.step_batch(batch, per_example(model))
    assert observer.seen == ["zero_grads", "forward", "backward", "first_pass", "first_pass/apply_perturbation",
                             "zero_grads", "forward", "select_examples", "forward", "backward",
                             "second_pass", "restore", "step", "zero_grads"]
    opt.observer = None  # back to the null observer
    opt.step_batch(batch, per_example(model))
    assert len(observer.seen) == 14


# ---------------------------------------------------------------- frozen tensors
def fisher_sam_reference(model, batch, frozen_counted: bool, rho: float = 0.05, lr: float = 0.1,
                         keep_ratio: float = 0.2) -> list[torch.Tensor]:
    """One fisher-sam SGD step in plain PyTorch, from the formulas (core.py, step 2); biases are no
    candidates (perturbed densely). `frozen_counted` is the defect: frozen tensors enter the top-k
    with score 0."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    model.zero_grad()
    per_example(model)(batch).mean().backward()
    g = [None if p.grad is None else p.grad.detach().clone() for p in params]
    candidates = [i for i, (n, p) in enumerate(named) if "bias" not in n and (p.requires_grad or frozen_counted)]
    scores = [torch.zeros_like(params[i]) if g[i] is None else g[i] ** 2 for i in candidates]
    mask_of = dict(zip(candidates, reference_mask(scores, keep_ratio)))
    g_norm = torch.cat([gi.reshape(-1) for gi in g if gi is not None]).norm()
    e = [None if gi is None else rho * gi * mask_of.get(i, torch.ones_like(gi)).view_as(gi) / (g_norm + 1e-12)
         for i, gi in enumerate(g)]
    start = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, ei in zip(params, e):
            if ei is not None:
                p.add_(ei)
    model.zero_grad()
    per_example(model)(batch).mean().backward()
    with torch.no_grad():
        for p, w in zip(params, start):
            p.copy_(w if p.grad is None else w - lr * p.grad)
    model.zero_grad()
    return [p.detach().clone() for p in params]


def frozen_model():
    model = make_model()
    model[0].weight.requires_grad_(False)  # a frozen 72-entry tensor among 180 trainable candidates
    return model


def test_frozen_tensors_are_no_fisher_candidates():
    model, batch = frozen_model(), make_batch()
    cfg = SAMConfig(sam_type="fisher-sam", keep_ratio=0.2, candidate_exclude=("bias",))
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, cfg, lr=0.1)
    opt.step_batch(batch, per_example(model))
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    kept = sum(int(m.sum()) for m in opt.core._masks() if isinstance(m, torch.Tensor))
    trainable_candidates = 12 * 12 + 3 * 12
    assert kept == int(trainable_candidates * 0.2)  # 36; with the frozen tensor counted: int(252 * 0.2) = 50

    right = torch.cat([t.reshape(-1) for t in fisher_sam_reference(frozen_model(), batch, frozen_counted=False)])
    wrong = torch.cat([t.reshape(-1) for t in fisher_sam_reference(frozen_model(), batch, frozen_counted=True)])
    start = torch.cat([p.detach().reshape(-1) for p in frozen_model().parameters()])
    assert torch.allclose(got, right, atol=1e-14, rtol=0)
    assert (wrong - right).norm() > 1e-6 * (right - start).norm()  # the defect is visible at this tolerance
    assert not torch.allclose(got, wrong, atol=1e-14, rtol=0)


# ---------------------------------------------------------------- skipped steps and the Fisher estimate
def sam_state(opt: SAMOptimizer, model) -> dict:
    core = opt.core
    return {"weights": [p.detach().clone() for p in model.parameters()],
            "mask": [None if m is None else m.clone() for m in (core.fisher_mask or [])],
            "fisher_sum": [None if s is None else s.clone() for s in (core.fisher_sum or [])],
            "step_count": core.step_count, "density": core.mask_density,
            "adam": {k: v.clone() for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v)}}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("bad_step", [1, 2], ids=["accumulating-step", "mask-rebuild-step"])
def test_step_skipped_in_the_second_pass_leaves_fisher_sum_and_mask_bit_identical(bad_step):
    cfg = SAMConfig(sam_type="fisher-sam", fisher_estimator="accumulated", mask_interval=2, keep_ratio=0.2)
    batches = [make_batch(seed=50 + t) for t in range(4)]

    def run(inject: bool):
        model = make_model()
        opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, cfg, lr=1e-2)
        calls = {"n": 0}

        def poisoned(batch):  # the second call of the bad step is its second pass
            calls["n"] += 1
            losses = per_example(model)(batch)
            return losses * float("inf") if calls["n"] == 2 else losses

        states = []
        for t, batch in enumerate(batches):
            if inject and t == bad_step:
                out = opt.step_batch(batch, poisoned)
                assert out.skipped and out.stats.finite
                assert out.stats.mask_rebuilt == (bad_step % 2 == 0)
            opt.step_batch(batch, per_example(model))
            states.append(sam_state(opt, model))
        return states, opt.skipped_steps

    clean, clean_skips = run(inject=False)
    skipped, skips = run(inject=True)
    assert clean_skips == 0 and skips == 1
    for t, (a, b) in enumerate(zip(clean, skipped)):
        assert same(a, b), f"state after step {t} differs"
    # the estimate is really in play: the sums are non-zero between rebuilds and the mask changes
    assert any(float(s.abs().sum()) > 0 for s in clean[1]["fisher_sum"] if s is not None)
    assert not same(clean[0]["mask"], clean[2]["mask"])


def test_mask_a_skipped_step_rebuilt_would_differ():
    """The rollback matters: the mask rebuilt from the bad step's own g^2 is not the committed one."""
    cfg = SAMConfig(sam_type="fisher-sam", fisher_estimator="accumulated", mask_interval=2, keep_ratio=0.2)
    model = make_model()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, cfg, lr=1e-2)
    for t in range(2):
        opt.step_batch(make_batch(seed=50 + t), per_example(model))
    committed = [None if m is None else m.clone() for m in opt.core.fisher_mask]
    opt.zero_grad()
    per_example(model)(make_batch(seed=99)).mean().backward()
    stats = opt.first_step(zero_grad=True)
    assert stats.mask_rebuilt and not same(committed, opt.core.fisher_mask)
    per_example(model)(make_batch(seed=99)).mean().backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    assert opt.second_step(zero_grad=True) is False
    assert same(committed, opt.core.fisher_mask)


# ---------------------------------------------------------------- the same on DeepSpeed ZeRO-2, 2 gloo ranks
ENGINE_FISHER_SAM_STEP = ["forward", "backward",
                          "first_pass", "first_pass/rebuild_mask", "first_pass/apply_perturbation",
                          "zero_grads", "forward", "backward", "second_pass", "restore", "step"]


def test_observer_sees_the_phases_of_a_zero2_fisher_sam_step(tmp_path):
    pytest.importorskip("deepspeed")
    for seen in run_distributed(run_observed_steps, 2, tmp_path, 2, use_deepspeed=True):
        assert seen[0] == ENGINE_FISHER_SAM_STEP
        assert seen[1] == [p for p in ENGINE_FISHER_SAM_STEP if p != "first_pass/rebuild_mask"]
        assert seen[2] == ["forward", "backward", "step"]  # the AdamW baseline's PlainEngine


def test_zero2_fp16_overflow_on_a_rebuild_step_leaves_fisher_sum_and_mask_bit_identical(tmp_path):
    pytest.importorskip("deepspeed")
    for res in run_distributed(run_fp16_skip_keeps_fisher, 2, tmp_path, 2, use_deepspeed=True):
        assert res["skipped"] and res["rebuilt"]  # the overflowing step had rebuilt the mask
        assert same(res["before"], res["after"])
        assert any(float(s.abs().sum()) > 0 for s in res["before"]["fisher_sum"] if s is not None)


# ---------------------------------------------------------------- gradient accumulation in plain PyTorch
def split_halves(batch):
    return [(batch[0][:12], batch[1][:12]), (batch[0][12:], batch[1][12:])]


def accumulated_step(sam_type: str, summed: bool = False) -> torch.Tensor:
    model = make_model()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type=sam_type, gamma=0.5), lr=0.5)
    if summed:  # the defect this guards against: micro-batch gradients added, not averaged
        opt._backend.backward = lambda loss, index, count: loss.backward()
    for t in range(2):
        out = opt.train_step(split_halves(make_batch(seed=60 + t)), per_example(model))
        assert not out.skipped
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("sam_type", ["fisher-sam", "fisher-esam", "gsam"])
def test_micro_batches_of_equal_size_give_the_step_on_their_union(sam_type):
    model = make_model()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type=sam_type, gamma=0.5), lr=0.5)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for t in range(2):
        opt.step_batch(make_batch(seed=60 + t), per_example(model))
    whole = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(accumulated_step(sam_type), whole, atol=1e-13, rtol=0)
    assert (accumulated_step(sam_type, summed=True) - whole).norm() > 1e-3 * (whole - start).norm()
