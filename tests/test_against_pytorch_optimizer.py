"""Our `sam` (and `adaptive`) against pytorch-optimizer's SAM/ASAM: same model, batches and base optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
import pytorch_optimizer.optimizer.sam as reference_sam  # noqa: E402

from fsam_ds.sam.config import SAMConfig  # noqa: E402
from fsam_ds.sam.optim import SAMOptimizer  # noqa: E402


def float64_global_norm_sq(param_groups, device=None, *, weight_adaptive=False):
    """pytorch-optimizer 4.1's helper squares float32-cast norms even for float64 parameters, which
    caps agreement near 1e-8; this is the same sum kept in float64."""
    total = torch.zeros(1, dtype=torch.float64)
    for group in param_groups:
        adaptive = weight_adaptive and group.get("adaptive", False)
        for p in group["params"]:
            if p.grad is not None:
                total += ((p.grad * p.abs()) if adaptive else p.grad).norm().square()
    return total


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 4)).double()


def batches(k: int):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 10, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g))
            for _ in range(k)]


def run_ours(adaptive: bool, base, rho: float, steps, **kw):
    model = make_model()
    opt = SAMOptimizer(model.named_parameters(), base, SAMConfig(sam_type="sam", rho=rho, adaptive=adaptive), **kw)
    for x, y in steps:
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_reference(adaptive: bool, base, rho: float, steps, **kw):
    model = make_model()
    opt = pytorch_optimizer.SAM(model.parameters(), base, rho=rho, adaptive=adaptive, **kw)
    for x, y in steps:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        closure()
        opt.step(closure)
        opt.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


CASES = [
    (False, torch.optim.AdamW, 0.05, dict(lr=1e-2, weight_decay=0.01)),
    (True, torch.optim.AdamW, 0.5, dict(lr=1e-2, weight_decay=0.01)),
    (False, torch.optim.SGD, 0.05, dict(lr=0.1, momentum=0.9)),
    (True, torch.optim.SGD, 2.0, dict(lr=0.1, momentum=0.9)),
]


@pytest.mark.parametrize("adaptive,base,rho,kw", CASES)
def test_matches_pytorch_optimizer_sam_to_1e10(monkeypatch, adaptive, base, rho, kw):
    monkeypatch.setattr(reference_sam, "get_global_gradient_norm", float64_global_norm_sq)
    steps = batches(6)
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    ours = run_ours(adaptive, base, rho, steps, **kw)
    theirs = run_reference(adaptive, base, rho, steps, **kw)
    relative = ((ours - theirs).norm() / (theirs - start).norm()).item()
    assert relative < 1e-10
    # the comparison discriminates: plain base-optimizer training is far away
    model = make_model()
    plain = base(model.parameters(), **kw)
    for x, y in steps:
        plain.zero_grad()
        F.cross_entropy(model(x), y).backward()
        plain.step()
    plain_params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert ((plain_params - theirs).norm() / (theirs - start).norm()).item() > 1e-3


@pytest.mark.parametrize("adaptive,base,rho,kw", CASES[:2])
def test_matches_unpatched_pytorch_optimizer_within_its_float32_norm(adaptive, base, rho, kw):
    steps = batches(6)
    start = torch.cat([p.detach().reshape(-1) for p in make_model().parameters()])
    ours = run_ours(adaptive, base, rho, steps, **kw)
    theirs = run_reference(adaptive, base, rho, steps, **kw)
    assert ((ours - theirs).norm() / (theirs - start).norm()).item() < 1e-5
