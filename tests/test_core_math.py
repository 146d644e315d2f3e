"""The checks of the algorithm spec (fsam_algorithm.md section 7), in float64, against formulas
computed here in plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fsam_ds.sam.config import SAM_TYPES, SAMConfig
from fsam_ds.sam.optim import SAMOptimizer



@pytest.fixture(autouse=True)
def float64_by_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))


def make_batch(seed: int = 1, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def per_example(model):
    return lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none")


def params_of(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def mean_grad(model, batch, weights=None) -> list[torch.Tensor]:
    """grad of the mean loss at the model's current weights (or at `weights`)."""
    if weights is not None:
        with torch.no_grad():
            for p, w in zip(model.parameters(), weights):
                p.copy_(w)
    model.zero_grad()
    per_example(model)(batch).mean().backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def capture_perturbation(opt, model, batch):
    """Runs a first pass and first_step; returns (g, e, restore) without finishing the step."""
    before = params_of(model)
    g = mean_grad(model, batch)
    stats = opt.first_step(zero_grad=True)
    e = [p.detach() - b for p, b in zip(model.parameters(), before)]
    return g, e, stats, before


def sgd_sam(config: SAMConfig, model, lr=0.1):
    return SAMOptimizer(model.named_parameters(), torch.optim.SGD, config, lr=lr)


# ---------------------------------------------------------------- 1. rho = 0 is the base step
@pytest.mark.parametrize("sam_type", SAM_TYPES)
def test_rho_zero_is_base_step(sam_type):
    batch = make_batch()
    model, ref = make_model(), make_model()
    opt = sgd_sam(SAMConfig(sam_type=sam_type, rho=0.0, gamma=1.0, alpha=0.7), model)
    base = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.step_batch(batch, per_example(model))
        base.zero_grad()
        per_example(ref)(batch).mean().backward()
        base.step()
    assert torch.allclose(flat(model.parameters()), flat(ref.parameters()), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- 2. all-ones mask is SAM
def test_all_ones_mask_is_sam():
    batch = make_batch()
    a, b = make_model(), make_model()
    sam = sgd_sam(SAMConfig(sam_type="sam"), a)
    fsam = sgd_sam(SAMConfig(sam_type="fisher-sam", keep_ratio=1.0, candidate_exclude=()), b)
    for _ in range(4):
        sam.step_batch(batch, per_example(a))
        fsam.step_batch(batch, per_example(b))
    assert torch.allclose(flat(a.parameters()), flat(b.parameters()), atol=1e-13, rtol=0)
    # and a real mask changes the result (the comparison can fail)
    c = make_model()
    sgd_sam_c = sgd_sam(SAMConfig(sam_type="fisher-sam", keep_ratio=0.1, candidate_exclude=()), c)
    for _ in range(4):
        sgd_sam_c.step_batch(batch, per_example(c))
    assert not torch.allclose(flat(a.parameters()), flat(c.parameters()), atol=1e-8)


# ---------------------------------------------------------------- 3./4. norm and support of e
def test_sam_perturbation_is_rho_times_unit_gradient():
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="sam", rho=0.07), model)
    g, e, stats, _ = capture_perturbation(opt, model, batch)
    gn = flat(g).norm()
    expected = [0.07 * gi / (gn + 1e-12) for gi in g]
    assert torch.allclose(flat(e), flat(expected), atol=1e-15, rtol=1e-10)
    assert flat(e).norm().item() == pytest.approx(0.07 * gn.item() / (gn.item() + 1e-12), rel=1e-10)
    assert stats.perturbation_norm == pytest.approx(flat(e).norm().item(), rel=1e-10)


def reference_mask(scores: list[torch.Tensor], keep_ratio: float) -> list[torch.Tensor]:
    """Global top-int(N*keep) by score, ties to the smaller (parameter, position) index."""
    values = flat(scores)
    k = int(values.numel() * keep_ratio)
    order = sorted(range(values.numel()), key=lambda j: (-values[j].item(), j))[:k]
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order] = True
    out, start = [], 0
    for s in scores:
        out.append(mask[start:start + s.numel()].view_as(s))
        start += s.numel()
    return out


@pytest.mark.parametrize("renormalize", [False, True])
def test_fisher_perturbation_norm_and_support(renormalize):
    model, batch = make_model(), make_batch()
    cfg = SAMConfig(sam_type="fisher-sam", rho=0.05, keep_ratio=0.2, candidate_exclude=("bias",),
                    renormalize=renormalize)
    opt = sgd_sam(cfg, model)
    g, e, stats, _ = capture_perturbation(opt, model, batch)
    names = [n for n, _ in model.named_parameters()]
    cand = [i for i, n in enumerate(names) if "bias" not in n]
    masks = reference_mask([g[i] ** 2 for i in cand], 0.2)
    full_mask = [torch.ones_like(gi, dtype=torch.bool) for gi in g]
    for i, m in zip(cand, masks):
        full_mask[i] = m
    # support: inside the mask, or outside the candidates (biases are perturbed densely)
    for i, (ei, mi) in enumerate(zip(e, full_mask)):
        assert torch.all(ei[~mi] == 0), names[i]
    n_cand = sum(g[i].numel() for i in cand)
    assert sum(int(m.sum()) for m in masks) == int(n_cand * 0.2)
    masked = flat([gi * mi for gi, mi in zip(g, full_mask)])
    gn = flat(g).norm()
    if renormalize:
        expected = [0.05 * gi * mi / (masked.norm() + 1e-12) for gi, mi in zip(g, full_mask)]
        assert flat(e).norm().item() == pytest.approx(0.05, rel=1e-10)
    else:
        expected = [0.05 * gi * mi / (gn + 1e-12) for gi, mi in zip(g, full_mask)]
        assert flat(e).norm().item() == pytest.approx(0.05 * masked.norm().item() / gn.item(), rel=1e-10)
        assert flat(e).norm().item() < 0.05
    assert torch.allclose(flat(e), flat(expected), atol=1e-15, rtol=1e-9)
    assert stats.mask_rebuilt and stats.mask_density == pytest.approx(int(n_cand * 0.2) / n_cand)


def test_non_candidates_none_leaves_them_unperturbed():
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="fisher-sam", keep_ratio=0.3, candidate_exclude=("bias",),
                            non_candidates="none"), model)
    g, e, _, _ = capture_perturbation(opt, model, batch)
    for (name, _), ei in zip(model.named_parameters(), e):
        if "bias" in name:
            assert torch.all(ei == 0), name
        else:
            assert (ei != 0).any(), name


# ---------------------------------------------------------------- 5. global top-k across scales
def test_mask_is_global_across_tensors_of_different_scales():
    torch.manual_seed(0)
    w_small = nn.Parameter(torch.randn(50))
    w_large = nn.Parameter(torch.randn(50))
    opt = SAMOptimizer([("small", w_small), ("large", w_large)], torch.optim.SGD,
                       SAMConfig(sam_type="fisher-sam", keep_ratio=0.3, candidate_exclude=()), lr=0.1)
    scale = torch.linspace(1, 2, 50)
    # gradients: 1e-3 * ... for one tensor and O(1) for the other
    ((w_small * 1e-3 * scale).sum() + (w_large * scale).sum()).backward()
    opt.first_step()
    masks = [m for m in opt.core._masks()]
    sel_scores = torch.cat([(w.grad ** 2)[m] for w, m in zip([w_small, w_large], masks)])
    unsel_scores = torch.cat([(w.grad ** 2)[~m] for w, m in zip([w_small, w_large], masks)])
    assert sel_scores.min() >= unsel_scores.max()
    assert int(masks[0].sum()) == 0 and int(masks[1].sum()) == 30  # a per-tensor top-k would pick 15 + 15
    opt.second_step()


# ---------------------------------------------------------------- 6. mask schedule
def test_mask_changes_only_at_rebuild_steps():
    model = make_model()
    opt = sgd_sam(SAMConfig(sam_type="fisher-sam", keep_ratio=0.2, mask_interval=3), model, lr=0.3)
    history = []
    for t in range(8):
        opt.step_batch(make_batch(seed=10 + t), per_example(model))
        history.append([m.clone() for m in opt.core.fisher_mask if m is not None])
    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    for t in range(1, 8):
        if t % 3 == 0:
            assert not same(history[t], history[t - 1]), f"mask not rebuilt at step {t}"
        else:
            assert same(history[t], history[t - 1]), f"mask changed at step {t}"


def test_mask_fixed_when_interval_exceeds_run():
    model = make_model()
    opt = sgd_sam(SAMConfig(sam_type="fisher-sam", mask_interval=1000), model, lr=0.3)
    opt.step_batch(make_batch(seed=3), per_example(model))
    first = [m.clone() for m in opt.core.fisher_mask if m is not None]
    for t in range(5):
        out = opt.step_batch(make_batch(seed=20 + t), per_example(model))
        assert not out.stats.mask_rebuilt
    assert all(torch.equal(a, b) for a, b in zip(first, [m for m in opt.core.fisher_mask if m is not None]))


# ---------------------------------------------------------------- 7. exact restore
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sam_type", ["sam", "fisher-sam", "gsam", "esam"])
def test_restore_is_bitwise(dtype, sam_type):
    model = make_model().to(dtype)
    # a huge rho makes |e| >> |w| for many entries: plain subtraction could not undo that
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type=sam_type, rho=50.0),
                       lr=0.0)
    before = params_of(model)
    x, y = make_batch()
    F.cross_entropy(model(x.to(dtype)), y).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    F.cross_entropy(model(x.to(dtype)), y).backward()
    opt.second_step(zero_grad=True)  # lr = 0: the base step changes nothing
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_update_comes_only_from_base_optimizer():
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="sam", rho=0.05), model, lr=0.1)
    g, e, _, before = capture_perturbation(opt, model, batch)
    per_example(model)(batch).mean().backward()
    h = [p.grad.detach().clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    for p, b, hi in zip(model.parameters(), before, h):
        assert torch.equal(p.detach(), b.add(hi, alpha=-0.1))


# ---------------------------------------------------------------- 8. quadratic closed form
@pytest.mark.parametrize("sam_type,keep", [("sam", 1.0), ("fisher-sam", 0.25)])
def test_quadratic_closed_form(sam_type, keep):
    torch.manual_seed(3)
    n = 16
    q = torch.randn(n, n)
    a = q @ q.T / n + torch.eye(n)
    w = nn.Parameter(torch.randn(n))
    w0 = w.detach().clone()
    opt = SAMOptimizer([("w", w)], torch.optim.SGD, SAMConfig(sam_type=sam_type, rho=0.1, keep_ratio=keep),
                       lr=0.05)
    opt.step(lambda: (0.5 * w @ a @ w).backward())
    grad = a @ w0
    mask = reference_mask([grad ** 2], keep)[0]
    expected = w0 - 0.05 * a @ (w0 + 0.1 * mask * grad / (grad.norm() + 1e-12))
    assert torch.allclose(w.detach(), expected, atol=1e-14, rtol=0)


# ---------------------------------------------------------------- 9. GSAM
def test_gsam_alpha_zero_is_sam():
    batch = make_batch()
    a, b = make_model(), make_model()
    sam = sgd_sam(SAMConfig(sam_type="sam"), a)
    gsam = sgd_sam(SAMConfig(sam_type="gsam", alpha=0.0), b)
    for _ in range(3):
        sam.step_batch(batch, per_example(a))
        gsam.step_batch(batch, per_example(b))
    assert torch.allclose(flat(a.parameters()), flat(b.parameters()), atol=1e-14, rtol=0)


def gsam_fed_gradient(reduction: str, alpha: float, rho: float = 0.05):
    """Runs one gsam step with lr=1 SGD; returns (g, h, h') where h' = what SGD applied."""
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="gsam", alpha=alpha, rho=rho), model, lr=1.0)
    reduce = (lambda l: l.mean()) if reduction == "mean" else (lambda l: l.sum())
    before = params_of(model)
    model.zero_grad()
    reduce(per_example(model)(batch)).backward()
    g = [p.grad.clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    reduce(per_example(model)(batch)).backward()
    h = [p.grad.clone() for p in model.parameters()]
    opt.second_step(zero_grad=True)
    applied = [b - p.detach() for p, b in zip(model.parameters(), before)]
    return flat(g), flat(h), flat(applied)


def test_gsam_correction_matches_formula_and_is_orthogonal():
    g, h, h_prime = gsam_fed_gradient("mean", alpha=0.4)
    cos = (g @ h) / (h.norm() * g.norm() + 1e-12)
    g_perp = g - cos * g.norm() * h / (h.norm() + 1e-12)
    assert torch.allclose(h_prime, h - 0.4 * g_perp, atol=1e-14, rtol=1e-10)
    # orthogonal up to the eps terms of the formula (a plain alpha * g correction is off by ~1e-1 here)
    assert abs(((h_prime - h) @ h).item()) < 1e-10 * h.norm().item() ** 2
    assert abs((0.4 * g @ h).item()) > 1e-3 * h.norm().item() ** 2


def test_gsam_correction_invariant_to_loss_reduction_b7():
    """B7: the paper's code mixed a mean-reduced g with a sum-reduced h, shrinking alpha by n_B.
    With one reduction in both passes the applied gradient scales exactly with the loss."""
    _, _, mean_applied = gsam_fed_gradient("mean", alpha=0.4)
    _, _, sum_applied = gsam_fed_gradient("sum", alpha=0.4)
    n = make_batch()[0].shape[0]
    assert torch.allclose(sum_applied / n, mean_applied, atol=1e-13, rtol=1e-9)
    # the official mixture (g mean, h sum) gives a different correction: the check discriminates
    g, h, _ = gsam_fed_gradient("mean", alpha=0.4)
    h_sum = n * h
    cos = (g @ h_sum) / (h_sum.norm() * g.norm() + 1e-12)
    official = h_sum - 0.4 * (g - cos * g.norm() * h_sum / (h_sum.norm() + 1e-12))
    assert not torch.allclose(official / n, mean_applied, atol=1e-6)


def test_gsam_step_batch_uses_mean_in_both_passes_b7():
    model, batch = make_model(), make_batch()
    ref = make_model()
    opt = sgd_sam(SAMConfig(sam_type="gsam", alpha=0.5, rho=0.05), model, lr=1.0)
    opt.step_batch(batch, per_example(model))
    g = flat(mean_grad(ref, batch))
    gn = g.norm()
    w0 = flat(params_of(ref))
    e = 0.05 * g / (gn + 1e-12)
    start = 0
    perturbed = []
    for p in ref.parameters():
        perturbed.append((w0 + e)[start:start + p.numel()].view_as(p))
        start += p.numel()
    h = flat(mean_grad(ref, batch, perturbed))
    cos = (g @ h) / (h.norm() * gn + 1e-12)
    h_prime = h - 0.5 * (g - cos * gn * h / (h.norm() + 1e-12))
    assert torch.allclose(flat(model.parameters()), w0 - h_prime, atol=1e-13, rtol=0)


def test_gsam_uses_configured_rho_and_alpha_b6():
    """B6: the paper's code froze GSAM's rho at 0.001 and ignored --alpha."""
    for rho in (0.02, 0.3):
        model, batch = make_model(), make_batch()
        opt = sgd_sam(SAMConfig(sam_type="gsam", rho=rho), model)
        _, e, stats, _ = capture_perturbation(opt, model, batch)
        assert flat(e).norm().item() == pytest.approx(rho, rel=1e-9)
        assert stats.rho == rho
    _, h, applied_low = gsam_fed_gradient("mean", alpha=0.1)
    _, _, applied_high = gsam_fed_gradient("mean", alpha=0.9)
    assert (applied_high - h).norm() == pytest.approx(9 * (applied_low - h).norm().item(), rel=1e-9)


def test_rho_follows_learning_rate_schedule_b6():
    model, batch = make_model(), make_batch()
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD,
                       SAMConfig(sam_type="gsam", rho=0.1, rho_min=0.02), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.base_optimizer, lambda t: [1.0, 0.5, 0.0][min(t, 2)])
    seen = []
    for _ in range(3):
        out = opt.step_batch(batch, per_example(model))
        seen.append(out.stats.rho)
        sched.step()
    assert seen == pytest.approx([0.1, 0.06, 0.02])


# ---------------------------------------------------------------- 10. ESAM
def test_esam_beta_gamma_one_is_sam():
    batch = make_batch()
    a, b = make_model(), make_model()
    sam = sgd_sam(SAMConfig(sam_type="sam"), a)
    esam = sgd_sam(SAMConfig(sam_type="esam", beta=1.0, gamma=1.0), b)
    for _ in range(3):
        sam.step_batch(batch, per_example(a))
        esam.step_batch(batch, per_example(b))
    assert torch.allclose(flat(a.parameters()), flat(b.parameters()), atol=1e-14, rtol=0)


def test_esam_keeps_exactly_the_examples_whose_loss_rose_most():
    model, batch = make_model(), make_batch(n=30)
    ref = make_model()
    opt = sgd_sam(SAMConfig(sam_type="esam", beta=1.0, gamma=0.4, rho=0.5), model, lr=1.0)
    kept_batches = []
    real_loss = per_example(model)

    def recording_loss(b):
        kept_batches.append(b)
        return real_loss(b)

    out = opt.step_batch(batch, recording_loss)
    assert out.examples_kept == int(30 * 0.4) == kept_batches[-1][0].shape[0]
    # independent reference: rise of each example's loss under e = rho g / ||g||
    g = flat(mean_grad(ref, batch))
    w0 = flat(params_of(ref))
    e = 0.5 * g / (g.norm() + 1e-12)
    with torch.no_grad():
        before = per_example(ref)(batch)
        start = 0
        for p in ref.parameters():
            p.add_(e[start:start + p.numel()].view_as(p))
            start += p.numel()
        rise = per_example(ref)(batch) - before
    expected = torch.sort(torch.topk(rise, 12).indices).values
    selected_rows = kept_batches[-1][0]
    assert torch.equal(selected_rows, batch[0][expected])
    # and the update used the mean loss over those examples at w + e
    h = torch.autograd.grad(per_example(ref)((batch[0][expected], batch[1][expected])).mean(),
                            list(ref.parameters()))
    assert torch.allclose(flat(model.parameters()), w0 - flat(h), atol=1e-13, rtol=0)


def test_esam_perturbs_about_beta_of_the_tensors():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(10)])
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type="esam", beta=0.3, gamma=1.0),
                       lr=0.0)
    x = torch.randn(8, 4)
    fractions = []
    for _ in range(200):
        opt.zero_grad()
        model(x).square().mean().backward()
        before = params_of(model)
        stats = opt.first_step(zero_grad=True)
        changed = sum(not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        fractions.append(changed / 20)
        assert changed / 20 == pytest.approx(stats.perturbed_tensors)
        model(x).square().mean().backward()
        opt.second_step(zero_grad=True)
    assert sum(fractions) / len(fractions) == pytest.approx(0.3, abs=0.04)


def test_esam_radius_is_rho_over_beta_on_the_subset():
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="esam", beta=0.5, gamma=1.0, rho=0.05, seed=4), model)
    g, e, stats, _ = capture_perturbation(opt, model, batch)
    active = [bool((ei != 0).any()) for ei in e]
    assert 0 < sum(active) < len(active)
    g_active = flat([gi for gi, a in zip(g, active) if a])
    assert flat(e).norm().item() == pytest.approx(0.05 / 0.5 * g_active.norm().item() / (g_active.norm().item()
                                                                                       + 1e-12), rel=1e-10)


# ---------------------------------------------------------------- 11. invariance
def test_loss_scale_leaves_perturbation_and_mask_unchanged():
    batch = make_batch()
    out = []
    for c in (1.0, 37.0):
        model = make_model()
        opt = sgd_sam(SAMConfig(sam_type="fisher-sam", keep_ratio=0.2), model)
        model.zero_grad()
        (c * per_example(model)(batch).mean()).backward()
        before = params_of(model)
        opt.first_step(zero_grad=True)
        e = flat([p.detach() - b for p, b in zip(model.parameters(), before)])
        out.append((e, [m.clone() for m in opt.core.fisher_mask if m is not None]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-15, rtol=1e-9)
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


# ---------------------------------------------------------------- 12. B1 / B2
def test_fisher_sam_steps_and_restores_b1():
    """B1: the paper's fisher-sam raised KeyError on its first restore."""
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="fisher-sam"), model, lr=0.0)
    before = params_of(model)
    for _ in range(3):
        out = opt.step_batch(batch, per_example(model))
        assert not out.skipped and out.stats.perturbation_norm > 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("estimator", ["batch", "accumulated"])
def test_mask_rebuild_step_is_still_perturbed_b2(estimator):
    """B2: the paper's code zeroed the gradients when it rebuilt the mask, so e = 0 on that step."""
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="fisher-sam", mask_interval=2, fisher_estimator=estimator), model)
    for t in range(4):
        g, e, stats, _ = capture_perturbation(opt, model, batch)
        assert stats.mask_rebuilt == (t % 2 == 0)
        assert flat(e).norm().item() > 0.01
        per_example(model)(batch).mean().backward()
        opt.second_step(zero_grad=True)


def test_accumulated_estimator_sums_squared_gradients_since_rebuild():
    model = make_model()
    opt = sgd_sam(SAMConfig(sam_type="fisher-sam", mask_interval=3, fisher_estimator="accumulated",
                            keep_ratio=0.2, candidate_exclude=()), model, lr=0.05)
    total = None
    for t in range(4):
        batch = make_batch(seed=40 + t)
        g = mean_grad(model, batch)
        if t >= 1:
            total = [gi ** 2 for gi in g] if total is None else [a + gi ** 2 for a, gi in zip(total, g)]
        opt.first_step(zero_grad=True)
        per_example(model)(batch).mean().backward()
        opt.second_step(zero_grad=True)
    # step 3 rebuilt from g1^2 + g2^2 + g3^2
    expected = reference_mask(total, 0.2)
    got = list(opt.core._masks())
    for m, ref in zip(got, expected):
        assert torch.equal(m, ref.reshape(-1))


# ---------------------------------------------------------------- non-finite gradients
def test_non_finite_gradient_skips_without_touching_weights():
    model, batch = make_model(), make_batch()
    opt = sgd_sam(SAMConfig(sam_type="fisher-sam"), model)
    before = params_of(model)
    per_example(model)(batch).mean().backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    stats = opt.first_step(zero_grad=True)
    assert not stats.finite
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    per_example(model)(batch).mean().backward()
    assert opt.second_step(zero_grad=True) is False
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert opt.skipped_steps == 1 and opt.step_count == 0
    # second pass overflow: perturbation undone, nothing updated
    per_example(model)(batch).mean().backward()
    opt.first_step(zero_grad=True)
    per_example(model)(batch).mean().backward()
    next(model.parameters()).grad[0, 1] = float("nan")
    assert opt.second_step(zero_grad=True) is False
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    out = opt.step_batch(batch, per_example(model))
    assert not out.skipped and opt.step_count == 1
    assert math.isfinite(out.loss)
