"""LoRA (peft) under the SAM family: the peft.* settings, the adapters trained exactly on ZeRO 0-3 against
an independent plain-PyTorch computation, the frozen base never touched, SAMTrainer given a peft model (with
DeepSpeed and without), bf16 and fp16 on the adapters, checkpoints, exports, fsam-predict."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import train_fixtures as fx
from dist_harness import run_distributed
from ds_workers import global_batches, lora_bert, per_example_loss, run_lora_equivalence, sam_config, tiny_bert
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.run_config import config_to_dict, load_config

pytest.importorskip("peft")

TYPES = ("sam", "fisher-sam", "gsam")
TOLERANCE = 1e-4  # of the update, as for full models (test_zero_equivalence)
# bf16 on the adapters against the fp32 reference from the same bf16-rounded start: 2.0e-2 measured through the
# engine at ZeRO-2 and 3 (3 steps), 3.0e-2 through SAMTrainer at ZeRO-3 (3 updates, weight decay, linear schedule);
# perturbing the frozen base as well (the wrong variant) is at 0.55. The bf16 step itself is the engine's, which
# test_zero_precision_and_state checks exactly.
BF16_BOUND = 0.06


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

def sam_on_adapters(model: torch.nn.Module, batches: list[dict], loss, cfg, optimizer: torch.optim.Optimizer,
                    schedule=None, variant: str = "right") -> dict[str, torch.Tensor]:
    """The SAM family on a peft model, written out in plain PyTorch, one step per batch: g by autograd over
    the trainable tensors, the Fisher mask as the top int(N * keep_ratio) of g^2 over the candidates (names
    without bias or embed; ties to the lower index, a stable sort), e = rho m g / ||g||, h at w + e, GSAM's
    h - alpha (g - proj_h g), w restored, then `optimizer` (over the trainable tensors) with h and `schedule`.
    variant "base-perturbed": SAM as full fine-tuning computes it, the frozen base perturbed as well."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    perturbed = trainable + frozen if variant == "base-perturbed" else trainable
    candidate = [not re.search("bias|embed", n) for n, _ in named] + [False] * (len(perturbed) - len(named))
    masks: list[torch.Tensor] = []
    for t, batch in enumerate(batches):
        for p in perturbed:
            p.requires_grad_(True)
        g = torch.autograd.grad(loss(model, batch).mean(), perturbed, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(perturbed, g)]
        if cfg.sam_type.startswith("fisher") and t % cfg.mask_interval == 0:
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
        if cfg.sam_type.endswith("gsam"):
            g = g[: len(h)]
            h_norm = sum(hi.double().square().sum() for hi in h).sqrt().item()
            g_norm = sum(gi.double().square().sum() for gi in g).sqrt().item()
            cosine = sum((gi.double() * hi.double()).sum() for gi, hi in zip(g, h)).item() / (h_norm * g_norm + cfg.eps)
            h = [hi - cfg.alpha * (gi - cosine * g_norm / (h_norm + cfg.eps) * hi) for gi, hi in zip(g, h)]
        for p, hi in zip(trainable, h):
            p.grad = hi
        optimizer.step()
        optimizer.zero_grad()
        if schedule is not None:
            schedule.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def lora_start(precision: str = "fp32") -> torch.nn.Module:
    """`lora_bert` as a run of `precision` starts from: in bf16 (fp16), every weight rounded to it, the
    frozen base as DeepSpeed casts it and the adapters as their fp32 master begins."""
    model = lora_bert()
    if precision != "fp32":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    return model


def reference(sam_type: str, steps: int = 3, variant: str = "right",
              precision: str = "fp32") -> dict[str, torch.Tensor]:
    """`sam_on_adapters` in fp32 on `global_batches` from a `precision` run's start: AdamW, lr 1e-2, no
    weight decay, as the 2-rank engine runs use it."""
    model = lora_start(precision)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    return sam_on_adapters(model, global_batches("bert", steps), per_example_loss("bert"), sam_config(sam_type),
                           optimizer, variant=variant)


def trainer_reference(sam_type: str, runs: list[dict], variant: str = "right",
                      precision: str = "fp32") -> dict[str, torch.Tensor]:
    """`sam_on_adapters` in fp32 on the Trainer's global batches (every rank's micro-batches of each optimizer
    step) from a `precision` run's start, with the Trainer's AdamW groups (weight decay but on biases and
    LayerNorm) and linear schedule."""
    from transformers import get_linear_schedule_with_warmup

    from hf_workers import LR, bert_loss, param_groups
    from test_hf_trainer import global_batches_of

    model = lora_start(precision)
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR)
    batches = global_batches_of(runs)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, len(batches))
    return sam_on_adapters(model, batches, bert_loss, sam_config(sam_type), optimizer, schedule, variant)


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
        assert err <= TOLERANCE, (case, err)
        far = _relative_error(ours, wrong[sam_type], start, trainable)
        assert far > 1e-2, (case, far)


# ------------------------------------------------------------------- SAMTrainer on a peft model

def test_sam_trainer_without_deepspeed_on_a_peft_model_equals_plain_pytorch(tmp_path):
    """SAMTrainer, one process, no DeepSpeed, given the peft model as it is: its AdamW over the adapters becomes
    SAMOptimizer's base; fisher-sam and gsam over 5 windows of 2 micro-batches equal the plain-PyTorch step on
    the same peft model; the base is bit for bit the one it was given; perturbing it too is far off."""
    pytest.importorskip("accelerate")
    from hf_workers import train_without_deepspeed

    start = {n: p.detach().clone() for n, p in lora_bert().named_parameters()}
    _, trainable = _names()
    for sam_type in ("fisher-sam", "gsam"):
        run = train_without_deepspeed(str(tmp_path), sam_type, lora=True)
        ours = run["named"]
        assert [len(w) for w in run["windows"]] == [2] * 5 and run["global_step"] == 5, run["windows"]
        assert ours.keys() == start.keys()
        for name in start.keys() - set(trainable):
            assert torch.equal(ours[name], start[name]), (sam_type, name)
        err = _relative_error(ours, trainer_reference(sam_type, [run]), start, trainable)
        assert err <= TOLERANCE, (sam_type, err)
        far = _relative_error(ours, trainer_reference(sam_type, [run], variant="base-perturbed"), start, trainable)
        assert far > 1e-2, (sam_type, far)


# SAMTrainer under DeepSpeed on the peft model; "from_pretrained": the base loaded after the TrainingArguments
# (partitioned from birth at ZeRO-3, in bf16 for a bf16 run), then get_peft_model, as a user's script builds it
TRAINER_CASES = [{"stage": 2, "sam_type": "fisher-sam"},
                 {"stage": 3, "sam_type": "gsam", "from_pretrained": True},
                 {"stage": 3, "sam_type": "fisher-sam", "from_pretrained": True, "precision": "bf16"}]
BF16_STAGES = (2, 3)
FP16_CASES = [(2, 1), (3, 2)]  # (stage, the pass whose loss is not finite: 1 at w, 2 at w + e)


@pytest.fixture(scope="module")
def two_rank_lora(tiny_bert_dir, tmp_path_factory) -> dict[str, tuple]:
    """One launch of 2 gloo ranks for the checks below (starting the ranks costs more than these runs): fisher-sam
    on `trainer_lora_bert` in bf16 at BF16_STAGES, the fp16 overflows, and SAMTrainer's TRAINER_CASES with the
    engine path on the Trainer's micro-batches. Each entry: (rank 0's results, rank 1's)."""
    pytest.importorskip("accelerate")
    from ds_workers import run_jobs, run_lora_fp16_overflow
    from hf_workers import run_trainer_cases

    folder = tmp_path_factory.mktemp("two-rank-lora")
    cases = [{**case, "lora": True, "from_pretrained": tiny_bert_dir if case.get("from_pretrained") else False}
             for case in TRAINER_CASES]
    bf16 = [(stage, "fisher-sam", {}, 1, False) for stage in BF16_STAGES]
    # the Trainer last: its ZeRO-3 config stays registered with transformers until collected, and would make
    # the bf16 jobs' from_pretrained at ZeRO-2 load partitioned
    jobs = [(run_lora_equivalence, (tiny_bert_dir, bf16, 3, "bf16")), (run_lora_fp16_overflow, (FP16_CASES,)),
            (run_trainer_cases, (cases, str(folder)))]
    rank0, rank1 = run_distributed(run_jobs, 2, folder, jobs, use_deepspeed=True, timeout=900)
    return {"bf16": (rank0[0], rank1[0]), "fp16": (rank0[1], rank1[1]), "trainer": (rank0[2], rank1[2])}


def _names() -> tuple[list[str], list[str]]:
    """lora_bert's parameter names, and those of its trainable tensors."""
    named = list(lora_bert().named_parameters())
    return [n for n, _ in named], [n for n, p in named if p.requires_grad]


def test_sam_trainer_with_deepspeed_on_a_peft_model_equals_the_engine_path_and_plain_pytorch(two_rank_lora):
    """SAMTrainer under --deepspeed on 2 ranks, given the peft model as it is, at ZeRO-2 and ZeRO-3 (the base
    loaded partitioned; in fp32 and bf16), 20 examples in updates of 2, 2 and 1 micro-batches: the adapters
    equal the engine path on the same micro-batches and the plain-PyTorch step (fp32; from the bf16 start
    within BF16_BOUND), the ranks agree, the base ends bit for bit as it started; perturbing it is far off."""
    names, trainable = _names()
    for case, ours, other in zip(TRAINER_CASES, *two_rank_lora["trainer"]):
        precision = case.get("precision", "fp32")
        start = {n: p.detach().clone() for n, p in lora_start(precision).named_parameters()}
        assert ours["settings"]["dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision], case
        assert [len(w) for w in ours["windows"]] == [2, 2, 1] and ours["global_step"] == ours["engine_steps"] == 3
        if case.get("from_pretrained"):
            assert ours["loaded_partitioned"] and other["loaded_partitioned"], case
        named = ours["named"]
        assert list(named) == names and all(torch.equal(named[n], other["named"][n]) for n in names), case
        for name in set(names) - set(trainable):
            assert torch.equal(named[name], start[name]), (case, name)
        engine_error = _relative_error(named, ours["engine_params"], start, trainable)
        assert engine_error <= TOLERANCE, (case, engine_error)
        runs = [ours, other]
        err = _relative_error(named, trainer_reference(case["sam_type"], runs, precision=precision), start, trainable)
        assert err <= (BF16_BOUND if precision == "bf16" else TOLERANCE), (case, err)
        wrong = trainer_reference(case["sam_type"], runs, variant="base-perturbed", precision=precision)
        far = _relative_error(named, wrong, start, trainable)
        assert far > (5 * BF16_BOUND if precision == "bf16" else 1e-2), (case, far)


def test_bf16_on_adapters_stays_within_bf16_noise_of_the_fp32_step(two_rank_lora):
    """fisher-sam on the LoRA tiny BERT in bf16 at ZeRO-2 and ZeRO-3 (there the base loaded partitioned in bf16
    and the adapters cast to it), 3 steps: within BF16_BOUND of the fp32 plain-PyTorch step from the same
    bf16-rounded start; the ranks agree; the frozen base is bit for bit its bf16 cast; perturbing the base is
    far off."""
    names, trainable = _names()
    start = {n: p.detach().clone() for n, p in lora_start("bf16").named_parameters()}
    right = reference("fisher-sam", precision="bf16")
    wrong = reference("fisher-sam", variant="base-perturbed", precision="bf16")
    for stage, ours, other in zip(BF16_STAGES, *two_rank_lora["bf16"]):
        assert list(ours) == names and all(torch.equal(ours[n], other[n]) for n in names), stage
        for name in set(names) - set(trainable):
            assert torch.equal(ours[name], start[name]), (stage, name)
        err = _relative_error(ours, right, start, trainable)
        assert err <= BF16_BOUND, (stage, err)
        far = _relative_error(ours, wrong, start, trainable)
        assert far > 5 * BF16_BOUND, (stage, far)


def test_fp16_overflow_on_a_lora_step_leaves_adapters_and_optimizer_state_unchanged(two_rank_lora):
    """fisher-sam on the LoRA tiny BERT in fp16 (DeepSpeed's loss scaler; CPU fp16 by its test switch): a loss
    that is not finite in the first pass (ZeRO-2) or the second (ZeRO-3) skips the step with the adapters'
    fp32 masters, the fp16 weights and each rank's optimizer state unchanged and halves the loss scale; the
    same batch without it then changes all three (the comparison can fail); the base stays its fp16 cast."""
    names, trainable = _names()
    start = {n: p.detach().clone() for n, p in lora_start("fp16").named_parameters()}
    frozen = [i for i, n in enumerate(names) if n not in trainable]
    for case, run, other in zip(FP16_CASES, *two_rank_lora["fp16"]):
        assert run["names"] == names
        assert run["skipped"] == [False, True, False], (case, run["skipped"])
        assert run["scales"][1] == run["scales"][0] / 2, (case, run["scales"])
        for rank in (run, other):
            before, after, retried = rank["states"]
            for key in ("master", "module", "optimizer"):
                assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), (case, key)
                assert not all(torch.equal(a, b) for a, b in zip(after[key], retried[key])), (case, key)
            for i in frozen:
                assert all(torch.equal(state["master"][i], start[names[i]]) for state in rank["states"]), case


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
