"""Schedules that skip the second pass on some steps (`SAMConfig.schedule`): which steps are
sharpness-aware, against each rule computed here independently; a step without sharpness equals the
base optimizer's step on the first-pass gradient; the same on ZeRO 0-3 with 2 ranks; exact resume."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ds_workers import global_batches, mlp, per_example_loss, sam_config
from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.sam.optim import SAMOptimizer

STEPS = 12


def _overrides(schedule: str) -> dict:
    """SAMConfig fields for a schedule name; "looksam": every:3 with LookSAM's reuse."""
    if schedule == "looksam":
        return {"schedule": "every:3", "reuse": "looksam", "reuse_alpha": 0.5}
    return {"schedule": schedule}


def _train(schedule: str, sam_type: str = "fisher-sam", steps: int = STEPS, opt: SAMOptimizer | None = None,
           model=None, batches=None) -> tuple[list[bool], list[float], torch.nn.Module, SAMOptimizer]:
    """Single-process steps; returns whether each was sharpness-aware, each first-pass ||g||^2, the model
    and the optimizer."""
    model = model or mlp()
    opt = opt or SAMOptimizer(model.named_parameters(), torch.optim.AdamW,
                              sam_config(sam_type, mask_interval=2, **_overrides(schedule)), planned_steps=steps,
                              lr=1e-2, weight_decay=0.0)
    loss = per_example_loss("mlp")
    kinds, grad_sq = [], []
    for b in batches or global_batches("mlp", steps):
        out = opt.step_batch(b, lambda batch: loss(model, batch))
        kinds.append(out.stats.sharpness_aware)
        grad_sq.append(out.stats.grad_norm ** 2)
    return kinds, grad_sq, model, opt


def test_each_rule_decides_the_steps_its_own_computation_says():
    assert _train("always")[0] == [True] * STEPS
    assert _train("every:3")[0] == [n % 3 == 0 for n in range(STEPS)]
    assert _train("late:0.6")[0] == [n >= int(0.6 * STEPS) for n in range(STEPS)]
    # random:p: one float64 draw per step from a generator seeded with seed + 1000003, as documented
    draws = torch.Generator().manual_seed(1 + 1_000_003)
    expected = [float(torch.rand(1, generator=draws, dtype=torch.float64)) < 0.4 for _ in range(STEPS)]
    kinds = _train("random:0.4")[0]
    assert kinds == expected and 0 < sum(kinds) < STEPS
    # adaptive:c: ||g||^2 against the mean + c std of the steps before, exponentially weighted (0.9)
    kinds, grad_sq, _, _ = _train("adaptive:0.0")
    mean, variance, expected = None, 0.0, []
    for x in grad_sq:
        expected.append(mean is None or x >= mean + 0.0 * math.sqrt(variance))
        mean, variance = (x, 0.0) if mean is None else (0.9 * mean + 0.1 * x, 0.9 * variance + 0.1 * (x - mean) ** 2)
    assert kinds == expected and 0 < sum(kinds) < STEPS


def test_a_step_without_sharpness_is_the_base_optimizers_step_on_the_first_pass_gradient():
    """late:1.0 never perturbs: the run equals plain AdamW bit for bit. every:2 equals an independent
    composition of SAM steps and AdamW steps; taking every step with sharpness differs."""
    kinds, _, model, _ = _train("late:1.0")
    assert not any(kinds)
    reference = mlp()
    adamw = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    loss = per_example_loss("mlp")
    for b in global_batches("mlp", STEPS):
        adamw.zero_grad()
        loss(reference, b).mean().backward()
        adamw.step()
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        assert torch.equal(ours, theirs)

    _, _, model, _ = _train("every:2", sam_type="sam")
    composed = mlp()
    sam = SAMOptimizer(composed.named_parameters(), torch.optim.AdamW, sam_config("sam"), lr=1e-2, weight_decay=0.0)
    for n, b in enumerate(global_batches("mlp", STEPS)):
        if n % 2 == 0:
            sam.step_batch(b, lambda batch: loss(composed, batch))
        else:
            sam.zero_grad()
            loss(composed, b).mean().backward()
            sam.base_optimizer.step()
    always = _train("always", sam_type="sam")[2]
    ours, theirs = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in (model, composed)]
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, torch.cat([p.detach().reshape(-1) for p in always.parameters()]))


@pytest.mark.parametrize("schedule", ["random:0.5", "adaptive:0.5", "every:3", "looksam"])
def test_resume_continues_the_schedule_exactly(schedule):
    """Stopped after 5 steps and restored from state_dict into a fresh model and optimizer: the step
    types and the weights equal those of the uninterrupted run."""
    batches = global_batches("mlp", STEPS)
    whole_kinds, _, whole, _ = _train(schedule, batches=batches)
    first_kinds, _, model, opt = _train(schedule, steps=STEPS, batches=batches[:5])
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    fresh = mlp()
    fresh.load_state_dict(weights)
    again = SAMOptimizer(fresh.named_parameters(), torch.optim.AdamW,
                         sam_config("fisher-sam", mask_interval=2, **_overrides(schedule)),
                         planned_steps=STEPS, lr=1e-2, weight_decay=0.0)
    again.load_state_dict(state)
    rest_kinds, _, resumed, _ = _train(schedule, opt=again, model=fresh, batches=batches[5:])
    assert first_kinds + rest_kinds == whole_kinds
    for a, b in zip(resumed.parameters(), whole.parameters()):
        assert torch.equal(a, b)


def test_bad_schedules_and_apis_that_cannot_skip_a_pass_are_refused():
    with pytest.raises(ConfigError, match="'every:0' needs an integer k >= 1"):
        SAMConfig(schedule="every:0")
    with pytest.raises(ConfigError, match="must be one of always, every, late, random, adaptive"):
        SAMConfig(schedule="sometimes")
    model = mlp()
    with pytest.raises(ConfigError, match="pass planned_steps"):
        SAMOptimizer(model.named_parameters(), torch.optim.AdamW, SAMConfig(schedule="late:0.5"), lr=1e-2)
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, SAMConfig(schedule="every:2"), lr=1e-2)
    with pytest.raises(ValueError, match="call train_step"):
        opt.first_step()


LOOKSAM = {"schedule": "every:2", "reuse": "looksam", "reuse_alpha": 0.5}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_take_the_same_steps_as_one_process(stage, tmp_path):
    """2 gloo ranks: both ranks decide alike, and the weights equal the single-process run with the same
    schedule (every:2 for sam / fisher-sam / gsam, LookSAM reuse on fisher-sam, late:1.0 = AdamW); the
    same run with every step sharpness-aware differs."""
    from dist_harness import run_distributed
    from ds_workers import run_scheduled
    from test_zero_equivalence import relative_update_error

    cases = ([(stage, t, {"schedule": "every:2"}, 4) for t in ("sam", "fisher-sam", "gsam")]
             + [(stage, "fisher-sam", LOOKSAM, 5), (stage, "fisher-sam", {"schedule": "late:1.0"}, 4)])
    results = run_distributed(run_scheduled, 2, tmp_path, cases, use_deepspeed=True)
    start = torch.cat([p.detach().reshape(-1) for p in mlp().parameters()])
    for i, (_, sam_type, overrides, steps) in enumerate(cases):
        ours, other = results[0][i], results[1][i]
        assert ours["kinds"] == other["kinds"] and torch.equal(ours["params"], other["params"])
        model = mlp()
        opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, sam_config(sam_type, **overrides),
                           planned_steps=steps, lr=1e-2, weight_decay=0.0)
        loss = per_example_loss("mlp")
        kinds = [opt.step_batch(b, lambda batch: loss(model, batch)).stats.sharpness_aware
                 for b in global_batches("mlp", steps)]
        assert ours["kinds"] == kinds, (stage, sam_type, overrides)
        reference = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        assert relative_update_error(ours["params"], reference, start) <= 1e-5, (stage, sam_type, overrides)
        if overrides["schedule"] != "late:1.0":
            from test_zero_equivalence import reference as always_reference

            assert relative_update_error(ours["params"], always_reference("mlp", sam_type, steps=steps),
                                         start) > 1e-3, (stage, sam_type)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_overflow_in_a_step_without_sharpness_changes_nothing(stage, tmp_path):
    from dist_harness import run_distributed
    from ds_workers import run_fp16_overflow_without_sharpness

    res = run_distributed(run_fp16_overflow_without_sharpness, 2, tmp_path, stage, use_deepspeed=True)[0]
    assert res["first"] == (False, True)
    poisoned = res["poisoned"]
    assert poisoned["skipped"], poisoned  # the first pass was not finite: no kind was decided
    assert poisoned["master_same"] and poisoned["module_same"] and poisoned["scale_backed_off"], poisoned
    assert poisoned["step_count"] == 1  # not counted: the retry is the same kind of step
    assert res["retried"] == {"skipped": False, "sharpness_aware": False, "changed": True, "forwards": 1}


def test_fsam_train_takes_the_schedule_and_reports_its_steps(tmp_path):
    """--sam.schedule=every:3 over 8 steps: steps 0, 3 and 6 are sharpness-aware, as the logged steps and
    the summary's sam_steps say."""
    import train_fixtures as fx

    out = fx.train_sst2_epoch(tmp_path, **{"sam.schedule": "every:3"})
    steps = fx.events(out, "train")
    assert [e["sharpness_aware"] for e in steps] == [n % 3 == 0 for n in range(8)]
    assert [e["sam_steps"] for e in steps] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert fx.summary(out)["sam_steps"] == 3 and fx.summary(out)["sam_schedule"] == "every:3"


# --------------------------------------------------------------------- LookSAM

def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def looksam_reference(steps: int, every: int, alpha: float, per_tensor: bool = False) -> torch.Tensor:
    """LookSAM by hand on one process: fisher-sam's two passes on steps 0, every, 2 every, ... (the
    perturbation through SAMOptimizer's two-phase API), g_v = h - (<h, g> / ||g||^2) g over the whole
    model (or, as a wrong variant, tensor by tensor), and on the other steps AdamW with
    g + alpha ||g|| / ||g_v|| g_v."""
    model = mlp()
    params = list(model.parameters())
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, sam_config("fisher-sam", mask_interval=1),
                       lr=1e-2, weight_decay=0.0)
    loss = per_example_loss("mlp")
    g_v = None
    for n, b in enumerate(global_batches("mlp", steps)):
        opt.zero_grad()
        loss(model, b).mean().backward()
        g = [p.grad.detach().clone() for p in params]
        if n % every == 0:
            opt.first_step(zero_grad=True)
            loss(model, b).mean().backward()
            h = [p.grad.detach().clone() for p in params]
            opt.second_step(zero_grad=True)
            if per_tensor:
                g_v = [hi - (hi * gi).sum() / (gi * gi).sum() * gi for hi, gi in zip(h, g)]
            else:
                c = (_flat(h) * _flat(g)).sum() / (_flat(g) * _flat(g)).sum()
                g_v = [hi - c * gi for hi, gi in zip(h, g)]
        else:
            scale = alpha * _flat(g).norm() / _flat(g_v).norm()
            for p, gi, vi in zip(params, g, g_v):
                p.grad = gi + scale * vi
            opt.base_optimizer.step()
    return _flat(p.detach() for p in params)


def test_looksam_steps_equal_the_hand_computed_reference():
    steps, start = 7, _flat(p.detach() for p in mlp().parameters())
    model = mlp()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW,
                       sam_config("fisher-sam", mask_interval=1, schedule="every:3", reuse="looksam", reuse_alpha=0.5),
                       lr=1e-2, weight_decay=0.0)
    loss = per_example_loss("mlp")
    kinds = [opt.step_batch(b, lambda batch: loss(model, batch)).stats.sharpness_aware
             for b in global_batches("mlp", steps)]
    assert kinds == [n % 3 == 0 for n in range(steps)]
    ours = _flat(p.detach() for p in model.parameters())

    def error(reference):
        return ((ours - reference).norm() / (reference - start).norm()).item()

    assert error(looksam_reference(steps, 3, 0.5)) <= 1e-6
    assert error(looksam_reference(steps, 3, 0.5, per_tensor=True)) > 1e-3  # a per-tensor decomposition
    assert error(looksam_reference(steps, 3, 0.0)) > 1e-3  # reusing nothing: plain every:3
