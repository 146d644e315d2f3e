"""Activation checkpointing with both SAM passes: ZeRO 0-3 on 2 gloo ranks equal the single-process
reference without checkpointing; dropout sees the same random numbers in a forward and its recompute."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import (DEEPSPEED_CHECKPOINTING, build_model, ds_config, global_batches, per_example_loss, run_checkpointed_equivalence,
                        run_dropout_under_checkpointing, run_equivalence, run_reused_parameters, sam_config)
from fsam_ds.sam.config import ConfigError
from fsam_ds.sam.optim import SAMOptimizer
from fsam_ds.trainer.activation_checkpointing import reused_across_checkpoints

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

MODES = ["reentrant", "non_reentrant"]
TYPES = ["sam", "fisher-sam"]


def reference(kind: str, sam_type: str, steps: int = 3, summed: bool = False, checkpointing=False,
              module_rule: bool = True) -> torch.Tensor:
    """SAMOptimizer in one process on the global batch; `summed` adds the first-pass gradient to the
    second (a deliberately wrong step)."""
    model = build_model(kind, checkpointing)
    loss = per_example_loss(kind)
    opt = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, sam_config(sam_type),
                       module=model if module_rule else None, lr=1e-2, weight_decay=0.0)
    for b in global_batches(kind, steps):
        if not summed:
            opt.step_batch(b, lambda batch: loss(model, batch))
            continue
        opt.zero_grad()
        loss(model, b).mean().backward()
        g1 = [p.grad.clone() for p in model.parameters()]
        opt.first_step(zero_grad=True)
        loss(model, b).mean().backward()
        for p, g in zip(model.parameters(), g1):
            p.grad.add_(g)
        opt.second_step(zero_grad=True)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative_update_error(ours, ref, start) -> float:
    return ((ours - ref).norm() / (ref - start).norm()).item()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_checkpointed_zero_stage_matches_single_process(stage, tmp_path):
    results = run_distributed(run_checkpointed_equivalence, 2, tmp_path, stage, "bert", TYPES, MODES,
                              use_deepspeed=True)
    start = flat(build_model("bert"))
    for sam_type in TYPES:
        ref = reference("bert", sam_type)
        wrong = reference("bert", sam_type, summed=True)
        for mode in MODES:
            ours = torch.cat(results[0][mode][sam_type])
            assert torch.equal(ours, torch.cat(results[1][mode][sam_type])), "ranks disagree"
            err = relative_update_error(ours, ref, start)
            assert err <= 1e-4, (stage, mode, sam_type, err)
            assert relative_update_error(ours, wrong, start) > 1e-2, (stage, mode, sam_type)


def test_tied_gpt2_at_stage_3_matches_single_process(tmp_path):
    """GPT-2's lm_head is its token embedding: one Parameter, no Fisher candidate, gathered once."""
    results = run_distributed(run_equivalence, 2, tmp_path, 3, "gpt2", TYPES, use_deepspeed=True)
    model = build_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    start = flat(model)
    for sam_type in TYPES:
        ours = torch.cat(results[0][sam_type])
        err = relative_update_error(ours, reference("gpt2", sam_type), start)
        assert err <= 1e-4, (sam_type, err)
        assert relative_update_error(ours, reference("gpt2", sam_type, summed=True), start) > 1e-2, sam_type
    # the name rule alone would make wte/wpe Fisher candidates: a different mask, a different step
    wrong = relative_update_error(torch.cat(results[0]["fisher-sam"]),
                                  reference("gpt2", "fisher-sam", module_rule=False), start)
    assert wrong > 1e-3, wrong


def test_reentrant_with_reused_parameters_is_refused_at_zero_2_and_3(tmp_path):
    """The known trap (DeepSpeed#988, transformers#18330): a parameter reached by two reentrant
    checkpoints gets two gradients in one backward, which ZeRO-2 ("Gradient computed twice for this
    partition") and ZeRO-3 (a parameter twice in a reduce bucket) reject. It is reproduced here, the
    trainer refuses those combinations, and the accepted ones train the same model exactly."""
    accepted = [(1, "reentrant"), (2, "non_reentrant"), (3, "non_reentrant")]
    trapped = [(2, "reentrant"), (3, "reentrant")]
    results = run_distributed(run_reused_parameters, 2, tmp_path, accepted + trapped, use_deepspeed=True)
    for rank_results in results:
        assert "Gradient computed twice for this partition" in rank_results[(2, "reentrant")]
        assert "stage3.py" in rank_results[(3, "reentrant")] and "ds_id" in rank_results[(3, "reentrant")]
    for stage, mode in trapped:
        with pytest.raises(ConfigError, match="non_reentrant.*ZeRO stage 0 or 1") as err:
            build_model("shared", mode, ds_config(stage))
        assert "bert.encoder.layer.0" in str(err.value) and f"'reentrant' at ZeRO stage {stage}" in str(err.value)
    for stage, mode in accepted + [(0, "reentrant")]:
        build_model("shared", mode, ds_config(stage))
    assert reused_across_checkpoints(build_model("bert", "reentrant")) == {}

    start = flat(build_model("shared"))
    ref, wrong = reference("shared", "sam"), reference("shared", "sam", summed=True)
    for case in accepted:
        ours = torch.cat(results[0][case])
        assert relative_update_error(ours, ref, start) <= 1e-4, case
        assert relative_update_error(ours, wrong, start) > 1e-2, case


def test_dropout_sees_the_same_random_numbers_in_forward_and_recompute(tmp_path):
    """Both SAM passes draw their dropout masks as without checkpointing, and each recompute replays its
    forward's: every checkpointed variant trains exactly like the run without checkpointing; a checkpoint
    that does not restore the random state does not."""
    variants = ["off", "reentrant", "non_reentrant", "deepspeed-reentrant", "deepspeed-non_reentrant",
                "no-rng-restore"]
    results = run_distributed(run_dropout_under_checkpointing, 2, tmp_path, 2, variants, use_deepspeed=True)
    start = flat(build_model("bert"))
    for rank_results in results:
        off = rank_results["off"]
        for variant in variants[1:-1]:
            assert relative_update_error(rank_results[variant], off, start) <= 1e-6, variant
        assert relative_update_error(rank_results["no-rng-restore"], off, start) > 1e-3


def test_checkpointing_settings_and_their_errors():
    from fsam_ds.trainer.activation_checkpointing import enable_activation_checkpointing
    from fsam_ds.trainer.run_config import load_config

    base = ["--task=sst2", "--model=m"]
    assert load_config(base).gradient_checkpointing is False
    assert load_config(base + ["--gradient_checkpointing=true"]).gradient_checkpointing is True
    assert load_config(base + ["--gradient_checkpointing=reentrant"]).gradient_checkpointing == "reentrant"
    with pytest.raises(ConfigError, match="gradient_checkpointing.*'always'.*reentrant, non_reentrant"):
        load_config(base + ["--gradient_checkpointing=always"])

    model = build_model("bert")
    assert enable_activation_checkpointing(model, True) == "non_reentrant"
    layer = model.bert.encoder.layer[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}
    assert enable_activation_checkpointing(build_model("bert"), False) == "off"
    with pytest.raises(ConfigError, match="activation_checkpointing.*gradient_checkpointing is false"):
        enable_activation_checkpointing(build_model("bert"), False, {"activation_checkpointing": {}})
    for key in ("partition_activations", "contiguous_memory_optimization"):
        with pytest.raises(ConfigError, match=f"activation_checkpointing.{key} = true.*model .tensor. parallelism"):
            enable_activation_checkpointing(build_model("bert"), True, {"activation_checkpointing": {key: True}})
    with pytest.raises(ConfigError, match="does not support activation checkpointing"):
        enable_activation_checkpointing(build_model("mlp"), "reentrant")


def test_trainer_with_checkpointing_trains_exactly_as_without(tmp_path):
    """fsam-train on a BERT with dropout 0.1: --gradient_checkpointing=reentrant, and true with a DeepSpeed
    config that has an activation_checkpointing section, log the same losses and save the same weights
    as the run without checkpointing."""
    import json

    import train_fixtures as fx
    from fsam_ds.zero.ds_config import build_ds_config

    model = fx.write_tiny_model(tmp_path / "model")
    train, dev = fx.write_sst2_files(tmp_path / "sst2", n_train=32, n_dev=16)
    ds_file = tmp_path / "zero0_checkpointing.json"
    ds_file.write_text(json.dumps({**build_ds_config("fp32", 0), **DEEPSPEED_CHECKPOINTING}))
    settings = {"off": {}, "reentrant": {"gradient_checkpointing": "reentrant"},
                "deepspeed": {"gradient_checkpointing": "true", "ds_config": str(ds_file)}}
    runs = {}
    for name, extra in settings.items():
        out = tmp_path / name
        result = fx.run(fx.train_cmd(fx.base_args(model, train, dev, out, **{"optim.max_steps": 4}, **extra)), 300)
        assert fx.summary(out) is not None, result.stdout[-4000:]
        runs[name] = ([e["loss"] for e in fx.events(out, "train")], fx.final_weights(out))
    losses, weights = runs["off"]
    assert len(losses) == 4
    for name in ("reentrant", "deepspeed"):
        assert runs[name][0] == pytest.approx(losses, rel=1e-6, abs=0), name
        for key, value in weights.items():
            assert torch.allclose(runs[name][1][key], value, rtol=0, atol=1e-6), (name, key)
