"""The trainer's learning-rate schedules (transformers' curves, warmup from the first update) against
their formulas, their checkpoint round trip and the checks on their settings."""

from __future__ import annotations

import io
import math

import pytest
import torch
from transformers import get_scheduler

from fsam_ds.trainer.build import build_scheduler
from fsam_ds.trainer.run_config import ConfigError, OptimSection, load_config

LR, TOTAL = 0.5, 20


def rates(optim: OptimSection, total: int = TOTAL, updates: int | None = None,
          state: dict | None = None) -> tuple[list[float], dict]:
    """The lr each of `updates` updates uses, and the optimizer's and scheduler's state after them; `state`
    resumes from such a state, as a checkpoint load restores both."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr)
    scheduler = build_scheduler(optimizer, optim, total)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    out = []
    for _ in range(total if updates is None else updates):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def expected(schedule: str, warmup: int, k: int, power: float = 1.0, lr_end: float = 0.0) -> float:
    """The lr of the k-th update (k = 1..TOTAL), written out from the module doc."""
    if k <= warmup:
        return LR * k / warmup
    remaining = (TOTAL - k + 1) / (TOTAL - warmup)
    if schedule == "linear":
        return LR * remaining
    if schedule == "polynomial":
        return (LR - lr_end) * remaining ** power + lr_end
    if schedule == "cosine":
        return LR * 0.5 * (1 + math.cos(math.pi * (k - 1 - warmup) / (TOTAL - warmup)))
    return LR


@pytest.mark.parametrize("schedule, power, lr_end", [("linear", 1.0, 0.0), ("polynomial", 2.0, 0.05),
                                                     ("cosine", 1.0, 0.0), ("constant", 1.0, 0.0)])
@pytest.mark.parametrize("warmup_ratio", [0.0, 0.2])
def test_each_schedule_follows_its_formula(schedule, power, lr_end, warmup_ratio):
    optim = OptimSection(lr=LR, warmup_ratio=warmup_ratio, schedule=schedule, power=power, lr_end=lr_end)
    warmup = int(warmup_ratio * TOTAL)
    got, _ = rates(optim)
    want = [expected(schedule, warmup, k, power, lr_end) for k in range(1, TOTAL + 1)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_linear_keeps_the_documented_curve_not_the_libraries_first_update_at_zero():
    got, _ = rates(OptimSection(lr=LR, warmup_ratio=0.2, schedule="linear"))
    assert got[:5] == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5])  # the k-th update uses k / warmup
    assert got[-1] == pytest.approx(LR / 16)  # one step before 0
    # the wrong variant: transformers' scheduler alone starts at 0 and peaks one update later
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=LR)
    library = get_scheduler("linear", optimizer, num_warmup_steps=4, num_training_steps=TOTAL)
    plain = []
    for _ in range(TOTAL):
        plain.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        library.step()
    assert plain[0] == 0.0 and got[0] - plain[0] > 0.1
    assert plain[4:] == pytest.approx(got[4:])  # the decay is the library's own


def test_polynomial_with_power_one_and_end_zero_is_linear():
    linear, _ = rates(OptimSection(lr=LR, warmup_ratio=0.2, schedule="linear"))
    polynomial, _ = rates(OptimSection(lr=LR, warmup_ratio=0.2, schedule="polynomial"))
    squared, _ = rates(OptimSection(lr=LR, warmup_ratio=0.2, schedule="polynomial", power=2.0))
    assert polynomial == pytest.approx(linear, rel=1e-12)
    assert abs(squared[10] - linear[10]) > 0.05


def test_scheduler_state_round_trips_through_torch_save_and_resumes_the_curve():
    optim = OptimSection(lr=LR, warmup_ratio=0.2, schedule="cosine")
    whole, _ = rates(optim)
    first, state = rates(optim, updates=7)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # what DeepSpeed does with optimizer and lr_scheduler state_dicts
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["scheduler"]["last_epoch"] == 7
    assert state["scheduler"]["lr_lambdas"] == [{}]  # the curve itself is not stored
    rest, _ = rates(optim, updates=TOTAL - 7, state=state)
    assert first + rest == pytest.approx(whole, rel=1e-12)
    # a resumed run with another total follows its own curve from the next update on (the checkpoint
    # warning's promise): 40 updates warm up over 8, so the 9th update runs at the peak
    longer, _ = rates(optim, total=2 * TOTAL, updates=2, state=state)
    assert longer == pytest.approx([whole[7], LR]) and whole[8] < 0.95 * LR


@pytest.mark.parametrize("arg, key, requirement", [
    ("--optim.power=0", "optim.power", "must be > 0"),
    ("--optim.lr_end=2e-5", "optim.lr_end", "must lie in [0, optim.lr) = [0, 2e-05)"),
    ("--optim.lr_end=-1", "optim.lr_end", "must lie in [0, optim.lr)"),
    ("--optim.schedule=cosine_with_restarts", "optim.schedule", "linear"),
])
def test_schedule_settings_are_checked_by_name(arg, key, requirement):
    with pytest.raises(ConfigError) as err:
        load_config(["--task=sst2", "--model=roberta-base", arg])
    message = str(err.value)
    assert f"'{key}'" in message and requirement in message


def test_cosine_polynomial_settings_and_encoding_are_read():
    cfg = load_config(["--task=sst2", "--model=m", "--optim.schedule=polynomial", "--optim.power=2",
                       "--optim.lr_end=1e-6", "--data.encoding=latin-1"])
    assert (cfg.optim.schedule, cfg.optim.power, cfg.optim.lr_end) == ("polynomial", 2.0, 1e-6)
    assert cfg.data.encoding == "latin-1"
    assert load_config(["--task=sst2", "--model=m", "--optim.schedule=cosine"]).optim.schedule == "cosine"
