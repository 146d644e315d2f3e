"""LoRA (peft) under the SAM family: the peft.* settings, the adapters trained exactly on ZeRO 0-3 against
an independent plain-PyTorch computation, the frozen base never touched, checkpoints, exports, fsam-predict."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import train_fixtures as fx
from dist_harness import run_distributed
from ds_workers import global_batches, lora_bert, tiny_bert, per_example_loss, run_lora_equivalence, sam_config
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.run_config import config_to_dict, load_config

pytest.importorskip("peft")

TYPES = ("sam", "fisher-sam", "gsam")


# ----------------------------------------------------------------------------------- configuration

def _cfg(*extra: str):
    return load_config(["--task=sst2", "--model=m", *extra])


def test_peft_settings_are_checked_and_named_in_errors():
    cfg = _cfg("--peft.method=lora", "--peft.r=4", "--peft.alpha=8", "--peft.target_modules=query,value")
    assert (cfg.peft.r, cfg.peft.alpha, cfg.peft.target_modules) == (4, 8.0, ("query", "value"))
    for bad, key in (("--peft.r=0", "peft.r"), ("--peft.dropout=1", "peft.dropout"),
                     ("--peft.method=qlora", "peft.method"), ("--peft.export_merged=true", "peft.export_merged"),
                     ("--peft.target_modules=all-linear,query", "peft.target_modules")):
        with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
            _cfg(*(["--peft.method=lora"] if key not in ("peft.method", "peft.export_merged") else []), bad)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        _cfg("--peft.method=qlora")


def test_full_fine_tuning_keeps_its_configuration_and_folder_name():
    """A run without adapters writes no peft section, so its folder hash and resume check are as before it."""
    assert "peft" not in config_to_dict(_cfg())
    assert config_to_dict(_cfg("--peft.method=lora"))["peft"]["method"] == "lora"
    assert _cfg().output_dir != _cfg("--peft.method=lora").output_dir


# ----------------------------------------------------------------------- the independent reference

def reference(sam_type: str, steps: int = 3, variant: str = "right") -> dict[str, torch.Tensor]:
    """The SAM family on the same peft model, written out in plain PyTorch on the global batches: g by
    autograd over the trainable tensors, the Fisher mask as the top int(N * keep_ratio) of g^2 over the
    candidates (names without bias or embed; ties to the lower index, a stable sort), e = rho m g / ||g||,
    h at w + e, GSAM's h - alpha (g - proj_h g), w restored, torch AdamW with h.
    variant "base-perturbed": SAM as full fine-tuning computes it, the frozen base perturbed as well."""
    model, loss, cfg = lora_bert(), per_example_loss("bert"), sam_config(sam_type)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    perturbed = trainable + frozen if variant == "base-perturbed" else trainable
    candidate = [not re.search("bias|embed", n) for n, _ in named] + [False] * (len(perturbed) - len(named))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    masks: list[torch.Tensor] = []
    for t, batch in enumerate(global_batches("bert", steps)):
        for p in perturbed:
            p.requires_grad_(True)
        g = torch.autograd.grad(loss(model, batch).mean(), perturbed, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(perturbed, g)]
        if sam_type.startswith("fisher") and t % cfg.mask_interval == 0:
            scores = torch.cat([gi.reshape(-1) ** 2 for gi, c in zip(g, candidate) if c])
            keep = torch.zeros_like(scores)
            keep[torch.sort(scores, descending=True, stable=True).indices[: int(scores.numel() * cfg.keep_ratio)]] = 1
            sizes = [gi.numel() for gi, c in zip(g, candidate) if c]
            pieces = iter(keep.split(sizes))
            masks = [next(pieces).view_as(gi) if c else torch.ones_like(gi) for gi, c in zip(g, candidate)]
        norm = torch.sqrt(sum(gi.double().square().sum() for gi in g)).item()
        saved = [p.detach().clone() for p in perturbed]
        with torch.no_grad():
            for i, (p, gi) in enumerate(zip(perturbed, g)):
                p.add_(cfg.rho / (norm + cfg.eps) * gi * (masks[i] if masks else 1))
        for p in frozen:
            p.requires_grad_(False)
        h = list(torch.autograd.grad(loss(model, batch).mean(), trainable))
        with torch.no_grad():
            for p, w in zip(perturbed, saved):
                p.copy_(w)
        if sam_type.endswith("gsam"):
            g = g[: len(h)]
            h_norm = sum(hi.double().square().sum() for hi in h).sqrt().item()
            g_norm = sum(gi.double().square().sum() for gi in g).sqrt().item()
            cosine = sum((gi.double() * hi.double()).sum() for gi, hi in zip(g, h)).item() / (h_norm * g_norm + cfg.eps)
            h = [hi - cfg.alpha * (gi - cosine * g_norm / (h_norm + cfg.eps) * hi) for gi, hi in zip(g, h)]
        for p, hi in zip(trainable, h):
            p.grad = hi
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _relative_error(ours: dict, ref: dict, start: dict, names: list[str]) -> float:
    flat = [torch.cat([d[n].reshape(-1) for n in names]) for d in (ours, ref, start)]
    return ((flat[0] - flat[1]).norm() / (flat[1] - flat[2]).norm()).item()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> str:
    """tiny_bert saved, for the trainer's loading (partitioned at ZeRO-3)."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(folder)
    return str(folder)


# (stage, sam_type, zero_optimization extras, micro-batches per step, activation checkpointing)
CASES = [(stage, sam_type, {}, 1, False) for stage in (0, 1, 2, 3) for sam_type in TYPES] + [
    (2, "fisher-sam", {}, 2, False), (3, "fisher-sam", {}, 1, "non_reentrant"),
    (2, "fisher-sam", {"offload_optimizer": {"device": "cpu"}}, 1, False)]


@pytest.mark.slow
def test_sam_on_adapters_matches_plain_pytorch_and_leaves_the_base_bit_identical(tiny_bert_dir, tmp_path):
    """sam, fisher-sam and gsam on the adapters at ZeRO 0-3 on 2 ranks (fisher-sam also with two
    micro-batches, activation checkpointing and optimizer offload) equal the plain-PyTorch reference;
    the frozen base is bit for bit the loaded one; SAM that perturbs the base too is far off."""
    results = run_distributed(run_lora_equivalence, 2, tmp_path, tiny_bert_dir, CASES, use_deepspeed=True,
                              timeout=900)
    start = {n: p.detach().clone() for n, p in lora_bert().named_parameters()}
    trainable = [n for n, p in lora_bert().named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and any("classifier" in n for n in trainable)
    right = {t: reference(t) for t in TYPES}
    wrong = {t: reference(t, variant="base-perturbed") for t in TYPES}
    for case, ours, other_rank in zip(CASES, *results):
        sam_type = case[1]
        assert ours.keys() == start.keys()
        for name in start.keys() - set(trainable):
            assert torch.equal(ours[name], start[name]), (case, name)  # the base, bit for bit
        assert all(torch.equal(ours[n], other_rank[n]) for n in trainable), ("ranks disagree", case)
        err = _relative_error(ours, right[sam_type], start, trainable)
        assert err <= 1e-4, (case, err)
        far = _relative_error(ours, wrong[sam_type], start, trainable)
        assert far > 1e-2, (case, far)


# ------------------------------------------------------------------------------------ the trainer

def test_target_modules_the_model_lacks_stop_the_run_before_training_naming_those_it_has(tmp_path):
    from test_run_safety import error_line, train_here

    assets = {"model": fx.write_tiny_model(tmp_path / "model")}
    assets["train"], assets["dev"] = fx.write_sst2_files(tmp_path / "data")
    out = tmp_path / "run"
    line = error_line(train_here(assets, out, tmp_path, "--peft.method=lora", "--peft.target_modules=q_proj,value"))
    assert "peft.target_modules = ['q_proj', 'value']: q_proj names no module" in line
    for layer in ("query", "key", "value", "dense", "classifier"):  # the tiny BERT's linear layers
        assert re.search(rf"\b{layer}\b", line.split("can adapt are named:")[1]), line
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


LORA_RUN = {"peft.method": "lora", "peft.r": 4, "peft.dropout": 0.1, "peft.export_merged": "true", "zero_stage": 3}


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory) -> dict[str, Path]:
    """fsam-train with LoRA at ZeRO-3 (tiny BERT, dropout on), uninterrupted, and killed before step 12
    and resumed from its step-10 checkpoint (a mask rebuilt at step 9 in use, mid-epoch)."""
    from test_train_e2e import _kill_and_resume, _single

    root = tmp_path_factory.mktemp("lora")
    assets = {"model": fx.write_tiny_model(root / "model", initializer_range=0.2)}
    assets["train"], assets["dev"] = fx.write_sst2_files(root / "data")
    straight, resumed = _kill_and_resume(assets, root, _single, kill_at=11, **LORA_RUN)
    return {**assets, "straight": straight, "resumed": resumed}


def _adapter_weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resumed_lora_run_equals_the_uninterrupted_one_and_checkpoints_hold_the_adapters_only(lora_runs):
    a, b = _adapter_weights(lora_runs["straight"]), _adapter_weights(lora_runs["resumed"])
    assert a.keys() == b.keys() and any("lora_A" in k for k in a) and any("classifier" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fx.summary(lora_runs["straight"])["best_metric"] == fx.summary(lora_runs["resumed"])["best_metric"]
    # the checkpoint: no frozen weight; optimizer state for the trainable entries alone
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(lora_runs["model"])
    checkpoint = max((lora_runs["straight"] / "checkpoints").glob("step*"), key=lambda p: int(p.name[4:]))
    module = torch.load(next(checkpoint.glob("*model_states.pt")), weights_only=False)["module"]
    assert not [k for k in module if "base_layer" in k or k.endswith("original_module.weight")], list(module)
    assert all("lora_" in k or "modules_to_save" in k or "position_ids" in k or "token_type_ids" in k
               for k in module), list(module)
    optim = torch.load(next(checkpoint.glob("*optim_states.pt")), weights_only=False)
    adam = optim["optimizer_state_dict"]["optimizer_state_dict"]["state"]
    trained = sum(t.numel() for t in a.values())
    assert sum(s["exp_avg"].numel() for s in adam.values()) == trained < sum(p.numel() for p in base.parameters()) / 4


@pytest.mark.slow
def test_exported_adapter_loaded_by_peft_predicts_as_fsam_predict_on_the_adapter_and_the_merged_model(lora_runs,
                                                                                                     tmp_path):
    """The adapter folder loaded with peft and transformers alone (no fsam-ds) on the base model gives the
    probabilities fsam-predict writes for the adapter folder and for its merged/ model."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fsam_ds.cli.predict import predict_file

    final, dev = lora_runs["straight"] / "final", lora_runs["dev"]
    base = AutoModelForSequenceClassification.from_pretrained(lora_runs["model"], num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(final)
    sentences = [row["sentence"] for row in csv.DictReader(dev.open())]
    inputs = tokenizer(sentences, truncation=True, max_length=32, padding=True, return_tensors="pt")
    with torch.no_grad():
        untrained = torch.softmax(base.eval()(**inputs).logits, dim=-1)[:, 1]
        outside = torch.softmax(PeftModel.from_pretrained(base, final).eval()(**inputs).logits, dim=-1)[:, 1]
    assert (outside - untrained).abs().max() > 1e-2  # the base alone would fail the comparisons below
    for folder, tolerance in ((final, 1e-6), (final / "merged", 1e-5)):
        out = tmp_path / f"{folder.name}.jsonl"
        assert predict_file(folder, dev, out, progress=False) == len(sentences)
        probabilities = [json.loads(line)["prediction"]["probabilities"]["positive"]
                         for line in out.read_text().splitlines()]
        assert torch.allclose(torch.tensor(probabilities), outside, atol=tolerance, rtol=0), folder


def test_checkpoints_leave_out_a_frozen_embedding_tied_to_the_lm_head(tmp_path):
    """DeepSpeed's own exclusion names a tied weight once and kept the LM head, the whole embedding table."""
    from ds_workers import run_lora_checkpoint_keys

    (keys,) = run_distributed(run_lora_checkpoint_keys, 1, tmp_path, str(tmp_path / "ckpt"), [0, 2],
                              use_deepspeed=True)
    for stage in (0, 2):
        assert keys[stage] and all("lora_" in k for k in keys[stage]), (stage, keys[stage])
