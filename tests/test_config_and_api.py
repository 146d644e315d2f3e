"""Validation messages, bad input, and the optimizer API (param groups, state_dict round trip)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fsam_ds.sam.config import SAMConfig, ConfigError
from fsam_ds.sam.optim import SAMOptimizer, index_batch


@pytest.mark.parametrize("field,value,words", [
    ("sam_type", "fsam", ["sam_type", "'fsam'", "fisher-sam"]),
    ("rho", -0.1, ["rho", "-0.1", ">= 0"]),
    ("beta", 0.0, ["beta", "(0, 1]"]),
    ("gamma", 1.5, ["gamma", "1.5", "(0, 1]"]),
    ("alpha", 2.0, ["alpha", "[0, 1]"]),
    ("keep_ratio", 0.0, ["keep_ratio", "(0, 1]", "0.1"]),
    ("mask_interval", 0, ["mask_interval", ">= 1"]),
    ("mask_interval", 2.5, ["mask_interval", "integer"]),
    ("fisher_estimator", "empirical", ["fisher_estimator", "batch", "accumulated"]),
    ("non_candidates", "sparse", ["non_candidates", "dense", "none"]),
    ("eps", 0.0, ["eps", "> 0"]),
    ("rho_min", 0.5, ["rho_min", "[0, rho]"]),
    ("candidate_exclude", ("bias", "(unclosed"), ["candidate_exclude", "(unclosed", "regular expression"]),
    ("rho", "0.05", ["rho", "real number"]),
])
def test_config_errors_name_field_value_and_range(field, value, words):
    with pytest.raises(ConfigError) as err:
        SAMConfig(**{field: value})
    for word in words:
        assert word in str(err.value), (word, str(err.value))


@pytest.mark.parametrize("field", ["rho", "rho_min", "lr_max", "lr_min", "beta", "gamma", "alpha", "keep_ratio",
                                   "eps"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_config_refuses_non_finite_reals(field, value):
    # inf passes the range checks of rho and lr_max, and then turns the step's radius or lr schedule into NaN
    with pytest.raises(ConfigError) as err:
        SAMConfig(**{field: value})
    message = str(err.value)
    assert f"'{field}'" in message and repr(value) in message and "must be a finite real number" in message
    assert "The default is" in message


def test_config_defaults_are_the_papers():
    cfg = SAMConfig()
    assert (cfg.rho, cfg.beta, cfg.gamma, cfg.alpha, cfg.keep_ratio, cfg.mask_interval) == (0.05, 0.5, 0.5, 0.4,
                                                                                          0.1, 100)
    assert cfg.is_candidate("encoder.layer.0.attention.self.query.weight")
    assert not cfg.is_candidate("encoder.layer.0.attention.self.query.bias")
    assert not cfg.is_candidate("embeddings.word_embeddings.weight")


def test_no_trainable_tensors_is_a_clear_error():
    model = nn.Linear(3, 2)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable tensors"):
        SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(), lr=0.1)
    with pytest.raises(ValueError, match="empty parameter list"):
        SAMOptimizer([], torch.optim.SGD, SAMConfig(), lr=0.1)


def test_unnamed_parameters_with_name_rules_is_a_clear_error():
    with pytest.raises(ValueError, match="named_parameters"):
        SAMOptimizer(nn.Linear(3, 2).parameters(), torch.optim.SGD, SAMConfig(sam_type="fisher-sam"), lr=0.1)
    # without name rules plain tensors are fine
    SAMOptimizer(nn.Linear(3, 2).parameters(), torch.optim.SGD, SAMConfig(sam_type="sam"), lr=0.1)


def test_loss_that_is_not_per_example_is_a_clear_error():
    model = nn.Linear(3, 2)
    opt = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type="esam"), lr=0.1)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="reduction='none'"):
        opt.step_batch((x, y), lambda b: F.cross_entropy(model(b[0]), b[1]))
    with pytest.raises(ValueError, match="step_batch"):
        opt.step(lambda: F.cross_entropy(model(x), y).backward())


def test_param_groups_are_shared_with_base_optimizer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    named = list(model.named_parameters())
    opt = SAMOptimizer([{"params": named[:2], "lr": 0.1}, {"params": named[2:], "lr": 0.01}],
                       torch.optim.SGD, SAMConfig(sam_type="fisher-sam", candidate_exclude=("bias",)), lr=0.5)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    sched.step()
    assert [g["lr"] for g in opt.base_optimizer.param_groups] == [0.05, 0.005]
    assert opt.names == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize("sam_type", ["fisher-sam", "fisher-esam", "gsam", "esam"])
def test_state_dict_round_trip_resumes_exactly(sam_type):
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        cfg = SAMConfig(sam_type=sam_type, mask_interval=2, keep_ratio=0.3, fisher_estimator="accumulated",
                        beta=0.5, gamma=0.5)
        return model, SAMOptimizer(model.named_parameters(), torch.optim.AdamW, cfg, lr=1e-2)

    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(6)]

    def run(model, opt, steps):
        for x, y in steps:
            opt.step_batch((x, y), lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"))

    model, opt = build()
    run(model, opt, data)
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt = build()
    run(model, opt, data[:3])
    saved = {"model": model.state_dict(), "opt": opt.state_dict()}
    torch.save(saved, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    model, opt = build()
    model.load_state_dict(loaded["model"])
    opt.load_state_dict(loaded["opt"])
    assert opt.step_count == 3
    run(model, opt, data[3:])
    for a, b in zip(model.parameters(), straight):
        assert torch.equal(a.detach(), b)
    if sam_type == "gsam":
        return  # gsam carries no state between steps besides the counter
    # losing the SAM state (mask, counters, generator) would show up
    model, opt = build()
    run(model, opt, data[:3])
    fresh_model, fresh_opt = build()
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt.base_optimizer.load_state_dict(opt.base_optimizer.state_dict())
    run(fresh_model, fresh_opt, data[3:])
    assert any(not torch.equal(a.detach(), b) for a, b in zip(fresh_model.parameters(), straight))


def test_load_state_dict_rejects_other_sam_type():
    model = nn.Linear(3, 2)
    a = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type="sam"), lr=0.1)
    b = SAMOptimizer(model.named_parameters(), torch.optim.SGD, SAMConfig(sam_type="gsam"), lr=0.1)
    with pytest.raises(ValueError, match="sam_type"):
        b.load_state_dict(a.state_dict())


def test_index_batch_handles_nested_structures():
    batch = {"input_ids": torch.arange(12).view(4, 3), "labels": torch.tensor([0, 1, 2, 3]),
             "pair": (torch.arange(4), [torch.arange(4) * 2]), "name": "keep"}
    out = index_batch(batch, torch.tensor([1, 3]))
    assert out["input_ids"].tolist() == [[3, 4, 5], [9, 10, 11]]
    assert out["labels"].tolist() == [1, 3]
    assert out["pair"][0].tolist() == [1, 3] and out["pair"][1][0].tolist() == [2, 6]
    assert out["name"] == "keep"


def test_index_batch_selects_rows_of_the_trainers_padded_batches():
    """The trainer's collator returns transformers' BatchEncoding, a Mapping that is not a dict:
    ESAM's second pass must still get only the kept examples."""
    from transformers import BatchEncoding

    batch = BatchEncoding({"input_ids": torch.arange(12).view(4, 3), "labels": torch.tensor([0, 1, 2, 3])})
    out = index_batch(batch, torch.tensor([0, 2]))
    assert out["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8]]
    assert out["labels"].tolist() == [0, 2]
