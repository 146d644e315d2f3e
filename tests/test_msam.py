"""MSAM (`msam`, `fisher-msam`): one pass per step at w + e with e along AdamW's first moment. Against
MSAM written out here with torch's AdamW and its exp_avg (a wrong sign, a per-tensor norm and no
perturbation all fail); refusals; exact resume; ZeRO 0-3 on 2 gloo ranks (accumulation, offload,
checkpoint resume, fp16 overflow) against one process; one fsam-train run."""

from __future__ import annotations

import copy

import pytest
import torch

from ds_workers import global_batches, mlp, per_example_loss, sam_config
from fsam_ds.sam.config import MSAM_TYPES, ConfigError, SAMConfig
from fsam_ds.sam.optim import SAMOptimizer

STEPS = 5


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def msam_reference(sam_type: str, steps: int = STEPS, variant: str = "right", rho: float = 0.05,
                   keep_ratio: float = 0.3, mask_interval: int = 2) -> torch.Tensor:
    """MSAM by hand: torch AdamW; before each step e = -rho m / ||m|| from its exp_avg over the whole model
    (fisher-msam: times the mask, biases dense), nothing while there is no exp_avg (or no mask yet); one
    forward-backward at w + e; w put back; AdamW steps with that gradient. The mask is the top
    int(N keep_ratio) of g^2 over the weights (the candidates), from the step's gradient at steps 0,
    mask_interval, ..., used from the next step on. Wrong variants: "sign" (+m), "per-tensor"
    (each tensor normalised on its own), "none" (no perturbation: AdamW)."""
    model = mlp()
    named = list(model.named_parameters())
    params = [p for _, p in named]
    candidate = ["bias" not in name for name, _ in named]
    adamw = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    loss = per_example_loss("mlp")
    mask = None
    for n, batch in enumerate(global_batches("mlp", steps)):
        moments = [adamw.state[p].get("exp_avg") for p in params]
        e = None
        if variant != "none" and all(m is not None for m in moments) and (sam_type == "msam" or mask is not None):
            if variant == "per-tensor":
                e = [-rho * m / m.norm() for m in moments]
            else:
                e = [(rho if variant == "sign" else -rho) * m / _flat(moments).norm() for m in moments]
            if sam_type == "fisher-msam":
                e = [ei * mi for ei, mi in zip(e, mask)]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, ei in zip(params, e or []):
                p.add_(ei)
        adamw.zero_grad()
        loss(model, batch).mean().backward()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        if sam_type == "fisher-msam" and n % mask_interval == 0:
            scores = _flat(p.grad.square() for p, c in zip(params, candidate) if c)
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep[scores.topk(int(scores.numel() * keep_ratio)).indices] = True
            pieces = iter(keep.split([p.numel() for p, c in zip(params, candidate) if c]))
            mask = [next(pieces).view_as(p).float() if c else torch.ones_like(p) for p, c in zip(params, candidate)]
        adamw.step()
    return _flat(params)


def _train(sam_type: str, steps: int = STEPS, opt: SAMOptimizer | None = None, model=None, batches=None, **overrides):
    model = model or mlp()
    opt = opt or SAMOptimizer(model.named_parameters(), torch.optim.AdamW, sam_config(sam_type, **overrides),
                              lr=1e-2, weight_decay=0.0)
    loss = per_example_loss("mlp")
    outs = [opt.step_batch(b, lambda batch: loss(model, batch)) for b in batches or global_batches("mlp", steps)]
    return outs, model, opt


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    start = _flat(mlp().parameters())
    return ((ours - reference).norm() / (reference - start).norm()).item()


@pytest.mark.parametrize("sam_type", MSAM_TYPES)
def test_msam_steps_equal_the_hand_computed_reference(sam_type):
    outs, model, _ = _train(sam_type)
    assert [o.stats.sharpness_aware for o in outs] == [False] + [True] * (STEPS - 1)  # no exp_avg at step 0
    if sam_type == "msam":  # ||e|| = rho (the mask shortens fisher-msam's)
        assert all(o.stats.perturbation_norm == pytest.approx(0.05, rel=1e-6) for o in outs[1:])
    ours = _flat(model.parameters())
    assert relative_error(ours, msam_reference(sam_type)) <= 1e-6
    for variant in ("sign", "per-tensor", "none"):
        assert relative_error(ours, msam_reference(sam_type, variant=variant)) > 1e-3, variant


def test_fisher_msam_perturbs_only_the_masked_candidates():
    """The step-1 perturbation of fisher-msam: rho m / ||m|| on the mask (int(N keep_ratio) weight entries)
    and on every bias, zero elsewhere."""
    model = mlp()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, sam_config("fisher-msam"), lr=1e-2,
                       weight_decay=0.0)
    loss = per_example_loss("mlp")
    b0, b1 = global_batches("mlp", 2)
    opt.step_batch(b0, lambda batch: loss(model, batch))
    seen = {}
    real = opt.shards.apply_perturbation

    def record(deltas):
        deltas = list(deltas)
        seen["e"] = [d for d, _ in deltas]
        return real(deltas)

    opt.shards.apply_perturbation = record
    opt.step_batch(b1, lambda batch: loss(model, batch))
    weights = [e for e, (name, _) in zip(seen["e"], model.named_parameters()) if "bias" not in name]
    biases = [e for e, (name, _) in zip(seen["e"], model.named_parameters()) if "bias" in name]
    candidates = sum(e.numel() for e in weights)
    assert int(sum((e != 0).sum() for e in weights)) == int(candidates * 0.3)
    assert all(bool((e != 0).all()) for e in biases)


def test_msam_refuses_what_it_cannot_do():
    model = mlp()
    with pytest.raises(ValueError, match="SGD does not keep. Use torch.optim.AdamW"):
        SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type="msam"), lr=0.1)
    with pytest.raises(ConfigError, match="'reuse'.*needs a second-pass gradient.*Set reuse to none"):
        SAMConfig(sam_type="msam", schedule="every:2", reuse="looksam")
    with pytest.raises(ConfigError, match="'schedule'.*first-pass"):
        SAMConfig(sam_type="fisher-msam", schedule="adaptive:1.0")
    with pytest.raises(ConfigError, match="'adaptive'"):
        SAMConfig(sam_type="msam", adaptive=True)
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, SAMConfig(sam_type="msam"), lr=1e-2)
    with pytest.raises(ValueError, match="one pass per step.*call train_step"):
        opt.first_step()


def test_msam_follows_the_schedule():
    """every:2: steps 0, 2, 4 may perturb (step 0 has no exp_avg yet); the others are AdamW steps at w."""
    outs, _, _ = _train("msam", schedule="every:2")
    assert [o.stats.sharpness_aware for o in outs] == [False, False, True, False, True]


def test_msam_resume_is_exact():
    batches = global_batches("mlp", STEPS)
    _, whole, _ = _train("fisher-msam", batches=batches)
    _, model, opt = _train("fisher-msam", batches=batches[:3])
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    fresh = mlp()
    fresh.load_state_dict(weights)
    again = SAMOptimizer(fresh.named_parameters(), torch.optim.AdamW, sam_config("fisher-msam"), lr=1e-2,
                         weight_decay=0.0)
    again.load_state_dict(state)
    _, resumed, _ = _train("fisher-msam", opt=again, model=fresh, batches=batches[3:])
    assert torch.equal(_flat(resumed.parameters()), _flat(whole.parameters()))


# --------------------------------------------------------------------- ZeRO 0-3, 2 gloo ranks, one launch

OFFLOAD = {"offload_optimizer": {"device": "cpu"}}
# (stage, zero_optimization extras, micro-batches per step)
CASES = [(0, {}, 1), (1, {}, 1), (2, {}, 1), (3, {}, 1), (2, {}, 2), (3, {}, 2), (2, OFFLOAD, 1), (3, OFFLOAD, 1)]
RESUME_STAGES = (1, 2, 3)
FP16_CASES = [(1, "fisher-msam"), (2, "msam"), (3, "fisher-msam")]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from dist_harness import run_distributed
    from ds_workers import run_checkpoint, run_equivalence_cases, run_fp16_overflow, run_jobs

    tmp = tmp_path_factory.mktemp("msam")
    jobs = ([(run_equivalence_cases, (CASES, "mlp", list(MSAM_TYPES)))]
            + [(run_checkpoint, (stage, "fisher-msam", str(tmp / f"ckpt{stage}"))) for stage in RESUME_STAGES]
            + [(run_fp16_overflow, case) for case in FP16_CASES])
    return run_distributed(run_jobs, 2, tmp, jobs, use_deepspeed=True, timeout=600)


def test_zero_stages_equal_one_process(two_ranks):
    """Each stage (with gradient accumulation and optimizer offload) equals SAMOptimizer on the global
    batch, 3 steps (msam's first moment read per shard at every stage); the hand-computed wrong variants
    and msam against fisher-msam are far off."""
    from test_zero_equivalence import reference

    for i, case in enumerate(CASES):
        for sam_type in MSAM_TYPES:
            ours = torch.cat(two_ranks[0][0][i][sam_type])
            assert torch.equal(ours, torch.cat(two_ranks[1][0][i][sam_type])), (case, sam_type)
            assert relative_error(ours, reference("mlp", sam_type)) <= 1e-5, (case, sam_type)
            for variant in ("sign", "per-tensor", "none"):
                wrong = relative_error(ours, msam_reference(sam_type, steps=3, variant=variant))
                assert wrong > 1e-3, (case, sam_type, variant, wrong)
        unmasked = torch.cat(two_ranks[0][0][i]["msam"])
        assert relative_error(unmasked, reference("mlp", "fisher-msam")) > 1e-3, case


def test_zero_resume_equals_the_uninterrupted_run(two_ranks):
    """Stages 1-3 read exp_avg again after DeepSpeed's load_checkpoint; without the SAM state (the mask)
    the run differs."""
    for rank in two_ranks:
        for stage, r in zip(RESUME_STAGES, rank[1: 1 + len(RESUME_STAGES)]):
            assert r["step"] == 3, stage
            assert all(torch.equal(a, b) for a, b in zip(r["expected"], r["got"])), stage
            assert not all(torch.equal(a, b) for a, b in zip(r["expected"], r["blind"])), stage


def test_fp16_overflow_in_a_perturbed_step_changes_nothing(two_ranks):
    from test_zero_precision_and_state import assert_overflow_changes_nothing

    for case, res in zip(FP16_CASES, two_ranks[0][1 + len(RESUME_STAGES):]):
        assert_overflow_changes_nothing(res)


def test_fsam_train_runs_fisher_msam(tmp_path):
    """--sam.sam_type=fisher-msam over 8 steps: step 0 has no exp_avg and is not perturbed, the others are."""
    import train_fixtures as fx

    out = fx.train_sst2_epoch(tmp_path, **{"sam.sam_type": "fisher-msam"})
    steps = fx.events(out, "train")
    assert [e["sharpness_aware"] for e in steps] == [n > 0 for n in range(8)]
    assert all(e["skipped_steps"] == 0 for e in steps)
    assert all(e["perturbation_norm"] > 0 for e in steps[1:]) and steps[0]["perturbation_norm"] == 0
    assert fx.summary(out)["sam_steps"] == 7 and fx.summary(out)["sam_type"] == "fisher-msam"
