"""SAMTrainer (transformers' Trainer under --deepspeed) on 2 gloo ranks equals fsam-ds's own engine path on
the same micro-batches, and a single-process run of SAMOptimizer on the global batches; the learning rate
steps once per update; what it cannot run exactly is refused at train()."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

from transformers import (BertConfig, BertForQuestionAnswering, HfArgumentParser, Trainer,  # noqa: E402
                          TrainingArguments, get_linear_schedule_with_warmup)

from dist_harness import run_distributed  # noqa: E402
from ds_workers import sam_config, tiny_bert  # noqa: E402
from hf_workers import (LR, RESUME_AT, WEIGHT_DECAY, bert_loss, examples, named_param_groups,  # noqa: E402
                        param_groups, run_accelerate_cases, run_ddp_cases, run_resume_cases, run_trainer_cases,
                        train_without_deepspeed, trainer_ds_config)
from fsam_ds.hf import SAMArguments, SAMTrainer, sam_trainer  # noqa: E402
from fsam_ds.sam.config import ConfigError, SAMConfig  # noqa: E402
from fsam_ds.sam.optim import SAMOptimizer  # noqa: E402
from fsam_ds.zero.engine import read_sam_state  # noqa: E402
from test_zero_equivalence import relative_update_error  # noqa: E402

TOLERANCE = 1e-4  # tiny BERT, as in test_zero_equivalence
# A bf16 run against the fp32 reference from the same bf16-rounded start, stages 1-3: 7-9e-2 measured. bf16
# gradients turn AdamW's steps on entries with near-zero gradients; the wrong variant is at 1.3. The exact
# bf16 check is the engine path (error 0), whose bf16 step test_zero_precision_and_state checks in detail.
# Stage 0 is left out: DeepSpeed's stage-0 bf16 optimizer takes a hidden first step (deepspeed_cpu notes).
BF16_TOLERANCE = 0.15


def start_model(precision: str = "fp32") -> torch.nn.Module:
    """The tests' tiny BERT as a run of `precision` starts from: a bf16 run's fp32 master is its weights
    rounded to bf16."""
    model = tiny_bert()
    if precision == "bf16":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    return model


def start_params(precision: str = "fp32") -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in start_model(precision).parameters()])


def global_batches_of(runs: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The global batch of each of the Trainer's optimizer steps: every rank's micro-batches of that step
    together (`runs`: each rank's report, with the windows it recorded)."""
    windows = [run["windows"] for run in runs]
    out = []
    for k in range(len(windows[0])):
        micro = [batch for rank_windows in windows for batch in rank_windows[k]]
        out.append({key: torch.cat([batch[key] for batch in micro]) for key in micro[0]})
    return out


def plain_reference(sam_type: str, runs: list[dict], precision: str = "fp32") -> torch.Tensor:
    """SAMOptimizer in one process, in fp32, each update on the global batch (`global_batches_of`); the
    Trainer's AdamW groups and linear schedule; a bf16 run's start."""
    model = start_model(precision)
    optimizer = SAMOptimizer(named_param_groups(model), torch.optim.AdamW, sam_config(sam_type), module=model, lr=LR)
    batches = global_batches_of(runs)
    schedule = get_linear_schedule_with_warmup(optimizer.base_optimizer, 0, len(batches))
    for global_batch in batches:
        assert not optimizer.step_batch(global_batch, lambda batch: bert_loss(model, batch)).skipped
        schedule.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check_against_references(cases: list[dict], results: list[list[dict]]) -> None:
    for case, rank0, rank1 in zip(cases, *results):
        precision = case.get("precision", "fp32")
        start = start_params(precision)
        assert rank0["settings"] == {"dtype": {"fp32": "torch.float32", "bf16": "torch.bfloat16"}[precision],
                                     "offload": case.get("offload", False),
                                     "checkpointing": case.get("checkpointing", False)}, (case, rank0["settings"])
        ours = torch.cat(rank0["params"])
        assert torch.equal(ours, torch.cat(rank1["params"])), ("ranks disagree", case)
        # 20 examples, 2 ranks x 2 per micro-batch, 2 micro-batches per step: the last step has one
        assert [len(w) for w in rank0["windows"]] == [2, 2, 1] and rank0["global_step"] == 3
        engine_error = relative_update_error(ours, torch.cat(rank0["engine_params"]), start)
        plain_error = relative_update_error(ours, plain_reference(case["sam_type"], [rank0, rank1], precision), start)
        if case.get("from_pretrained"):
            assert rank0["loaded_partitioned"] and rank1["loaded_partitioned"], case
        if case.get("evaluate"):  # the Trainer's prediction loop at ZeRO-3 against the gathered weights' own logits
            model = start_model()
            torch.nn.utils.vector_to_parameters(ours, model.parameters())
            batch = {key: torch.stack([row[key] for row in examples(8)]) for key in examples(8)[0]}
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            torch.testing.assert_close(rank0["predicted"], logits, rtol=1e-5, atol=1e-6)
        if case.get("variant", "right") == "right":
            assert engine_error <= TOLERANCE, (case, engine_error)
            assert plain_error <= (BF16_TOLERANCE if precision == "bf16" else TOLERANCE), (case, plain_error)
            assert rank0["engine_steps"] == 3, case
        else:  # an update at every micro-batch: 5 engine steps for the Trainer's 3
            assert engine_error > 1e-2 and plain_error > 1e-2, (case, engine_error, plain_error)
            assert rank0["engine_steps"] == 5, case


STAGE_CASES = {
    "stage0-1": [{"stage": 0, "sam_type": t} for t in ("sam", "fisher-sam", "gsam")]
    + [{"stage": 1, "sam_type": "fisher-sam"}, {"stage": 2, "sam_type": "fisher-sam", "variant": "every-micro-batch"}],
    "stage2": [{"stage": 2, "sam_type": t} for t in ("sam", "fisher-sam", "gsam", "fisher-esam")],
    "stage3": [{"stage": 3, "sam_type": t} for t in ("sam", "gsam", "esam")]
    # from_pretrained after the TrainingArguments (HfDeepSpeedConfig: loaded partitioned), then evaluated
    + [{"stage": 3, "sam_type": "fisher-sam", "from_pretrained": True, "evaluate": True}],
    # bf16 (TrainingArguments(bf16=True), the config's "auto"), optimizer offload, activation checkpointing
    # (TrainingArguments(gradient_checkpointing=True)): against the engine path with the same settings, and
    # bf16 against the fp32 reference within bf16's error
    "bf16-offload-checkpointing": [
        {"stage": 1, "sam_type": "fisher-sam", "precision": "bf16"},
        {"stage": 2, "sam_type": "sam", "precision": "bf16"},
        {"stage": 3, "sam_type": "gsam", "precision": "bf16", "checkpointing": True},
        {"stage": 2, "sam_type": "fisher-sam", "precision": "bf16", "variant": "every-micro-batch"},
        {"stage": 2, "sam_type": "gsam", "offload": True},
        {"stage": 3, "sam_type": "fisher-sam", "offload": True, "checkpointing": True},
    ],
}


@pytest.mark.parametrize("group", list(STAGE_CASES))
def test_trainer_steps_equal_the_engine_path_and_the_single_process_reference(group, tmp_path):
    """Gradient accumulation 2 with a short last step; fp32 unless the case says bf16; the deliberately wrong
    variant (an update at every micro-batch) is far from both references."""
    tiny_bert().save_pretrained(tmp_path / "pretrained")
    cases = [{**case, "from_pretrained": str(tmp_path / "pretrained")} if case.get("from_pretrained") else case
             for case in STAGE_CASES[group]]
    results = run_distributed(run_trainer_cases, 2, tmp_path, cases, str(tmp_path), use_deepspeed=True, timeout=400)
    check_against_references(cases, results)


def linear_lrs(updates: int) -> list[float]:
    """transformers' linear schedule without warmup, at the start of update k: lr (1 - k / T)."""
    return [LR * (updates - k) / updates for k in range(updates)]


def warmup_decay_lrs(updates: int, warmup: int) -> list[float]:
    """DeepSpeed's WarmupDecayLR (linear warmup from 0 over `warmup` >= 2 steps, then linear decay to 0 at
    `updates`), at the start of update k: its value after k - 1 steps, and its starting value 0 for
    k = 0 (it is stepped after each update)."""
    def after(i: int) -> float:
        return LR * (i / warmup if i < warmup else max(0.0, (updates - i) / max(1, updates - warmup)))
    return [0.0] + [after(k - 1) for k in range(1, updates)]


def test_learning_rate_steps_once_per_update(tmp_path):
    """28 examples: updates of 2, 2, 2 and 1 micro-batches. The lr each engine.step() ran with follows the
    schedule's formula whether the Trainer (transformers' LambdaLR) or DeepSpeed (a "scheduler" section)
    owns the scheduler; an update at every micro-batch does not; a skipped step (non-finite first pass in
    fp32) holds the Trainer's scheduler back once."""
    base = {"stage": 2, "sam_type": "fisher-sam", "count": 28, "reference": False}
    on_deepspeed = {**base, "scheduler": "deepspeed", "warmup": 2}
    cases = [base, {**base, "variant": "every-micro-batch"}, on_deepspeed,
             {**on_deepspeed, "variant": "every-micro-batch"}, {**base, "poison": 1}]
    right, wrong, ds_right, ds_wrong, poisoned = run_distributed(run_trainer_cases, 2, tmp_path, cases, str(tmp_path),
                                                                 use_deepspeed=True, timeout=400)[0]
    assert right["scheduler"] == "LambdaLR" and right["engine_scheduler"] == "NoneType"
    assert ds_right["scheduler"] == "DeepSpeedSchedulerWrapper" and ds_right["engine_scheduler"] == "WarmupDecayLR"
    for run in (right, ds_right, poisoned):
        assert [len(w) for w in run["windows"]] == [2, 2, 2, 1] and run["global_step"] == 4
    assert right["step_lrs"] == pytest.approx(linear_lrs(4), abs=1e-12)
    assert right["logged_lrs"] == pytest.approx(linear_lrs(4), abs=1e-12)
    assert right["engine_steps"] == 4
    assert ds_right["step_lrs"] == pytest.approx(warmup_decay_lrs(4, 2), abs=1e-12)
    assert ds_right["engine_steps"] == 4
    for run, expected in ((wrong, linear_lrs(4)), (ds_wrong, warmup_decay_lrs(4, 2))):
        assert run["engine_steps"] == 7 and run["step_lrs"] != pytest.approx(expected, abs=1e-12)
    # update 1 applied nothing: its lr stays for update 2, and the 4 updates end one schedule step short
    assert poisoned["skipped"] == [False, True, False, False]
    assert poisoned["step_lrs"] == pytest.approx([LR, LR * 0.75, LR * 0.5], abs=1e-12)
    assert poisoned["scheduler_steps"] == 3


def test_fp16_overflow_in_either_pass_skips_the_trainer_step(tmp_path):
    """fp16 with DeepSpeed's dynamic loss scale (TrainingArguments(fp16=True), the config's "auto"; CPU fp16
    by DeepSpeed's test switch), 28 examples: updates of 2, 2, 2 and 1 micro-batches. An infinite loss in
    the first pass (ZeRO-2) or the second pass (ZeRO-3) of update 1: that update changes no weight (master
    and fp16 copy) and no optimizer state, halves the loss scale, and the Trainer's scheduler does not step
    for it (its lr is used again by update 2). Without an overflow, fp16 equals the engine path exactly."""
    base = {"sam_type": "fisher-sam", "precision": "fp16", "count": 28, "poison": 1, "reference": False}
    cases = [{**base, "stage": 2, "poison_pass": 1}, {**base, "stage": 3, "poison_pass": 2},
             {"stage": 2, "sam_type": "gsam", "precision": "fp16"}]
    rank0, rank1 = run_distributed(run_trainer_cases, 2, tmp_path, cases, str(tmp_path), use_deepspeed=True,
                                   timeout=400)
    for case, run, other in zip(cases[:2], rank0, rank1):
        assert run["settings"]["dtype"] == "torch.float16", run["settings"]
        assert [len(w) for w in run["windows"]] == [2, 2, 2, 1] and run["global_step"] == 4, case
        assert run["skipped"] == [False, True, False, False] and run["ds_skipped"] == 1, (case, run["skipped"])
        for rank in (run, other):  # each rank's own optimizer partition; weights gathered
            assert rank["unchanged_by_watched_update"] == {"master": True, "module": True, "optimizer": True}, case
        assert run["loss_scales"] == [256.0, 128.0, 128.0, 128.0], case
        assert run["scheduler_steps"] == 3, case
        assert run["step_lrs"] == pytest.approx([LR, LR * 0.75, LR * 0.75, LR * 0.5], abs=1e-12), case
        assert run["logged_lrs"] == pytest.approx([LR, LR * 0.75, LR * 0.75, LR * 0.5], abs=1e-12), case
    clean = rank0[2]
    assert clean["skipped"] == [False] * 3 and clean["loss_scales"] == [256.0] * 3
    assert torch.equal(torch.cat(clean["params"]), torch.cat(clean["engine_params"]))
    assert not torch.equal(torch.cat(clean["params"]), start_params())  # it trained


def test_resuming_from_checkpoint_n_continues_the_run_bit_for_bit(tmp_path):
    """ZeRO-2 and ZeRO-3, fp32, fisher-sam rebuilding its mask every 3 steps: 6 steps in one run equal 4
    steps, then a new Trainer resumed from checkpoint-4 (mid-epoch) for 2 more, bit for bit; the resumed run
    reuses the mask of step 3. Resumed without the SAM state (the wrong variant), it builds a new mask at
    step 4 and ends elsewhere. Then the refusals on the real checkpoints: another sam_type, another world size,
    a checkpoint without SAM state (as a plain Trainer writes it)."""
    stages = [2, 3]
    results = run_distributed(run_resume_cases, 2, tmp_path, stages, str(tmp_path), use_deepspeed=True, timeout=500)
    for stage, rank0, rank1 in zip(stages, *results):
        full, resumed, wrong = (torch.cat(rank0[key]) for key in ("full", "resumed", "without_sam_state"))
        assert torch.equal(full, torch.cat(rank1["full"])), stage
        assert {"fsam_state_rank0.pt", "fsam_state_rank1.pt"} <= set(rank0["checkpoint_files"]), rank0
        assert not [name for name in rank0["checkpoint_files"] if name.endswith(".tmp")]
        assert rank0["resumed_global_step"] == rank0["without_sam_state_global_step"] == 6
        assert rank0["full_steps"] == rank0["resumed_steps"] == 6 and rank0["without_sam_state_steps"] == 2
        assert torch.equal(resumed, full), (stage, (resumed - full).abs().max())
        # the wrong variant: a different mask for steps 4 and 5 (about 1.5e-4 of the whole update; 0 is the tolerance)
        assert relative_update_error(wrong, full, start_params()) > 1e-5, stage
        for rank in (rank0, rank1):  # refused by train() before the Trainer prepared anything
            assert "sam_type='fisher-sam', this run uses sam_type='sam'" in rank["other_sam_type"], rank
            assert rank["other_prepared_nothing"], rank
    # the check SAMTrainer.train runs first, on the real checkpoint (in this process: one rank)
    checkpoint = tmp_path / "stage2" / f"checkpoint-{RESUME_AT}"
    with pytest.raises(ConfigError, match=r"was written by 2 rank\(s\), this run has 1"):
        read_sam_state(checkpoint, 0, 1, "fisher-sam")
    plain = tmp_path / "plain-checkpoint"  # what a plain Trainer writes: the same, without the SAM state
    shutil.copytree(checkpoint, plain, ignore=shutil.ignore_patterns("fsam_state_rank*"))
    with pytest.raises(ConfigError, match="holds no SAM state"):
        read_sam_state(plain, 0, 2, "fisher-sam")


# ---------------------------------------------------------------- without DeepSpeed: SAMOptimizer under the Trainer
def test_without_deepspeed_one_process_equals_the_single_process_reference(tmp_path):
    """No --deepspeed, one process: the Trainer's AdamW becomes SAMOptimizer's base and each accumulation window
    (2 micro-batches of 2) one SAM step; equal to SAMOptimizer on the windows' global batches."""
    for sam_type in ("fisher-sam", "gsam", "esam"):
        run = train_without_deepspeed(str(tmp_path), sam_type)
        assert [len(w) for w in run["windows"]] == [2] * 5 and run["global_step"] == 5, run["windows"]
        error = relative_update_error(torch.cat(run["params"]), plain_reference(sam_type, [run]), start_params())
        assert error <= TOLERANCE, (sam_type, error)


def test_without_deepspeed_resuming_from_checkpoint_n_continues_bit_for_bit(tmp_path):
    """fisher-sam rebuilding its mask every 3 steps, 10 steps over 2 epochs: the SAM state travels in the
    optimizer's state_dict (optimizer.pt), so 10 steps in one run equal a resume from checkpoint-4."""
    epochs = {"num_train_epochs": 2}
    full = train_without_deepspeed(str(tmp_path / "full"), "fisher-sam", mask_interval=3, save_strategy="steps",
                                   save_steps=4, **epochs)
    checkpoint = tmp_path / "full" / "fisher-sam" / "checkpoint-4"
    resumed = train_without_deepspeed(str(tmp_path / "resumed"), "fisher-sam", resume=str(checkpoint),
                                      mask_interval=3, **epochs)
    assert full["sam_steps"] == resumed["sam_steps"] == 10 and resumed["global_step"] == 10
    assert torch.equal(torch.cat(full["params"]), torch.cat(resumed["params"]))
    # the same resume with a fresh SAM state (the mask of step 3 forgotten) ends elsewhere
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    state["sam"] = {**state["sam"], "step_count": 0}
    torch.save(state, checkpoint / "optimizer.pt")
    wrong = train_without_deepspeed(str(tmp_path / "wrong"), "fisher-sam", resume=str(checkpoint), mask_interval=3,
                                    **epochs)
    assert not torch.equal(torch.cat(full["params"]), torch.cat(wrong["params"]))


def sam_with_clipping_by_hand(windows: list[list[dict]], max_norm: float, clip: bool = True) -> torch.Tensor:
    """SAM (rho 0.05) written out: g at w, e = rho g / |g|, g' at w + e, back to w, g' clipped to `max_norm`
    (global norm), AdamW with the Trainer's groups and linear schedule; each window as one global batch."""
    model = start_model()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, len(windows))
    params = list(model.parameters())
    for window in windows:
        batch = {key: torch.cat([b[key] for b in window]) for key in window[0]}
        grads = torch.autograd.grad(bert_loss(model, batch).mean(), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        offsets = [0.05 * g / norm for g in grads]
        with torch.no_grad():
            for p, e in zip(params, offsets):
                p.add_(e)
        perturbed = torch.autograd.grad(bert_loss(model, batch).mean(), params)
        with torch.no_grad():
            for p, e in zip(params, offsets):
                p.sub_(e)
        total = torch.sqrt(sum((g ** 2).sum() for g in perturbed))
        factor = min(1.0, max_norm / (float(total) + 1e-6)) if clip else 1.0
        for p, g in zip(params, perturbed):
            p.grad = g * factor
        optimizer.step()
        schedule.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def test_without_deepspeed_max_grad_norm_clips_the_gradient_of_the_update(tmp_path):
    """max_grad_norm 0.05 (below every step's norm): the second-pass gradient is clipped before AdamW, as
    DeepSpeed clips; the logged grad_norm is its norm before clipping. Unclipped, the hand reference differs."""
    run = train_without_deepspeed(str(tmp_path), "sam", max_grad_norm=0.05)
    ours = torch.cat(run["params"])
    error = relative_update_error(ours, sam_with_clipping_by_hand(run["windows"], 0.05), start_params())
    assert error <= TOLERANCE, error
    unclipped = sam_with_clipping_by_hand(run["windows"], 0.05, clip=False)
    assert relative_update_error(ours, unclipped, start_params()) > 1e-2
    assert len(run["logged_grad_norms"]) == 5 and min(run["logged_grad_norms"]) > 0.05, run["logged_grad_norms"]


def test_without_deepspeed_ddp_on_two_ranks_equals_the_single_process_reference(tmp_path):
    """DDP over 2 gloo ranks without DeepSpeed: each rank's window of 2 micro-batches, the gradients averaged
    by DDP, ESAM ranking the examples of both ranks; equal to SAMOptimizer on the global batches."""
    sam_types = ["fisher-sam", "esam"]
    rank0, rank1 = run_distributed(run_ddp_cases, 2, tmp_path, sam_types, str(tmp_path), timeout=400)
    for sam_type, run0, run1 in zip(sam_types, rank0, rank1):
        assert run0["wrapped"] == "DistributedDataParallel", run0["wrapped"]
        ours = torch.cat(run0["params"])
        assert torch.equal(ours, torch.cat(run1["params"])), sam_type
        assert [len(w) for w in run0["windows"]] == [2, 2, 1], run0["windows"]
        error = relative_update_error(ours, plain_reference(sam_type, [run0, run1]), start_params())
        assert error <= TOLERANCE, (sam_type, error)


# ---------------------------------------------------------------- single process: arguments and refusals
def test_hf_argument_parser_reads_sam_arguments():
    parser = HfArgumentParser((TrainingArguments, SAMArguments))
    training, sam = parser.parse_args_into_dataclasses(
        ["--output_dir", "out", "--seed", "7", "--sam_type", "fisher-gsam", "--rho", "0.1", "--keep_ratio", "0.2",
         "--sam_seed", "3", "--candidate_exclude", "bias", "norm", "--no_exclude_embeddings"])
    assert training.seed == 7
    assert sam.to_config() == SAMConfig(sam_type="fisher-gsam", rho=0.1, keep_ratio=0.2, seed=3,
                                        candidate_exclude=("bias", "norm"), exclude_embeddings=False)
    assert parser.parse_args_into_dataclasses(["--output_dir", "out"])[1].to_config() == SAMConfig()
    with pytest.raises(ConfigError, match="rho"):
        parser.parse_args_into_dataclasses(["--output_dir", "out", "--rho", "-1"])[1].to_config()


def test_sam_trainer_wraps_any_trainer_class():
    class MyTrainer(Trainer):
        pass

    wrapped = sam_trainer(MyTrainer)
    assert wrapped.__name__ == "SAMMyTrainer" and issubclass(wrapped, MyTrainer)
    assert wrapped.training_step is SAMTrainer.training_step
    assert sam_trainer(MyTrainer) is wrapped and sam_trainer(SAMTrainer) is SAMTrainer
    with pytest.raises(TypeError, match="Trainer subclass"):
        sam_trainer(torch.nn.Module)


def question_answering_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return BertForQuestionAnswering(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=48, max_position_embeddings=32))


class OwnLossTrainer(SAMTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class OwnStepTrainer(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        return super().training_step(model, inputs, num_items_in_batch)


def _args(tmp_path, deepspeed: dict | None = None, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), deepspeed=deepspeed, report_to=[], save_strategy="no",
                             disable_tqdm=True, per_device_train_batch_size=2, **kwargs)


REFUSALS = {
    "fp16-without-deepspeed": (dict(deepspeed=None, fp16=True), {}, "without DeepSpeed does not support --fp16"),
    "round-robin": (dict(deepspeed={**trainer_ds_config(2, "trainer"), "zero_optimization": {
        "stage": 2, "round_robin_gradients": True}}), {}, "round_robin_gradients"),
    "esam-own-compute-loss": (dict(trainer_class=OwnLossTrainer, sam="esam"), {}, "overrides compute_loss"),
    "esam-label-smoothing": (dict(label_smoothing_factor=0.1, sam="fisher-esam"), {}, "label_smoothing_factor"),
    "bypassed-training-step": (dict(trainer_class=sam_trainer(OwnStepTrainer)), {},
                               "OwnStepTrainer overrides training_step"),
    "esam-without-per-example-loss": (dict(model=question_answering_bert, sam="esam"), {},
                                      "ranks examples by their loss"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_train_refuses_what_it_cannot_run_exactly_before_any_work(case, tmp_path):
    setup, train_kwargs, message = REFUSALS[case]
    setup = {"deepspeed": trainer_ds_config(2, "trainer"), "trainer_class": SAMTrainer, "model": tiny_bert,
             "sam": "fisher-sam", **setup}
    trainer_class, model, sam_type = setup.pop("trainer_class"), setup.pop("model"), setup.pop("sam")
    trainer = trainer_class(model=model(), args=_args(tmp_path, **setup), train_dataset=examples(8),
                            sam=sam_config(sam_type))
    with pytest.raises(ConfigError, match=message):
        trainer.train(**train_kwargs)
    assert trainer.model_wrapped is trainer.model and trainer.sam_engine is None  # nothing was prepared


def test_accelerates_own_deepspeed_config_is_checked_too(tmp_path, monkeypatch):
    """`accelerate launch` with a DeepSpeed accelerate config and no --deepspeed: the Trainer is a DeepSpeed one
    whose arguments hold no DeepSpeed config; the plugin's config is checked and named in the refusal."""
    from accelerate.state import AcceleratorState

    config = tmp_path / "accelerate_ds.json"
    config.write_text(json.dumps({**trainer_ds_config(2, "trainer"), "zero_optimization": {
        "stage": 2, "round_robin_gradients": True}}))
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config))
    try:
        trainer = SAMTrainer(model=tiny_bert(), args=_args(tmp_path / "run"), train_dataset=examples(8),
                             sam=sam_config("fisher-sam"))
        assert trainer.is_deepspeed_enabled and getattr(trainer.args, "hf_deepspeed_config", None) is None
        with pytest.raises(ConfigError, match="accelerate's DeepSpeed config: has zero_optimization.round_robin"):
            trainer.train()
        assert trainer.model_wrapped is trainer.model and trainer.sam_engine is None
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_a_per_example_loss_function_lifts_the_loss_refusals(tmp_path):
    """With sam_loss_fn, an own compute_loss and a model whose loss kind is unknown are accepted under ESAM
    (checked up to the refusals; training itself runs in the 2-rank tests)."""
    for trainer_class, model in ((OwnLossTrainer, tiny_bert), (SAMTrainer, question_answering_bert)):
        trainer = trainer_class(model=model(), args=_args(tmp_path, deepspeed=trainer_ds_config(2, "trainer")),
                                train_dataset=examples(8), sam=sam_config("esam"), sam_loss_fn=bert_loss)
        trainer._refuse_unsupported()
        assert trainer._sam_step_loss == trainer._given_loss


def test_non_esam_types_run_with_the_trainers_own_loss(tmp_path):
    """An own compute_loss, or label smoothing, is used as it is, one value per micro-batch, for the types that
    need no per-example loss; without either, the per-example losses come off the outputs."""
    cases = ((OwnLossTrainer, {}, "_trainer_loss"), (SAMTrainer, {"label_smoothing_factor": 0.1}, "_trainer_loss"),
             (SAMTrainer, {}, "_outputs_loss_of"))
    for trainer_class, extra, chosen in cases:
        trainer = trainer_class(model=tiny_bert(), train_dataset=examples(8), sam=sam_config("fisher-sam"),
                                args=_args(tmp_path, deepspeed=trainer_ds_config(2, "trainer"), **extra))
        trainer._refuse_unsupported()
        assert trainer._sam_step_loss == getattr(trainer, chosen), (trainer_class, extra)


# ---------------------------------------------------------------- per-example losses against the models' own
def _bert(head, **config) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, head)(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=48,
                                                  max_position_embeddings=32, **config))


def _tokens(rows: int = 4, length: int = 10) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"input_ids": torch.randint(1, 97, (rows, length), generator=g),
            "attention_mask": torch.ones(rows, length, dtype=torch.long)}


SEQUENCE_LABELS = {  # the head's config and labels for each problem type
    "single": ({"num_labels": 3}, torch.tensor([0, 2, 1, 2])),
    "regression": ({"num_labels": 1}, torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "multi-label": ({"num_labels": 3, "problem_type": "multi_label_classification"},
                    torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])),
}


@pytest.mark.parametrize("problem", list(SEQUENCE_LABELS))
def test_sequence_losses_average_to_the_models_own_loss(problem):
    from fsam_ds.hf.losses import outputs_loss_for

    config, labels = SEQUENCE_LABELS[problem]
    model = _bert("BertForSequenceClassification", **config)
    inputs = {**_tokens(), "labels": labels}
    outputs = model(**inputs)
    per_example = outputs_loss_for(model)(outputs, inputs)
    assert per_example.shape == (4,)
    torch.testing.assert_close(per_example.mean(), outputs.loss, rtol=1e-6, atol=1e-7)


def test_token_losses_are_per_sequence_means_and_weigh_sequences_not_tokens():
    """Labelled-token counts 10, 10, 10, 10 (token classification): the mean of the per-sequence losses is
    the model's token mean. Counts 9, 5, 2, 0 (causal LM, labels shifted): the model's token mean is the
    token-weighted mean of ours, and the plain mean of ours differs from it."""
    from fsam_ds.hf.losses import outputs_loss_for

    model = _bert("BertForTokenClassification", num_labels=5)
    inputs = {**_tokens(), "labels": torch.randint(0, 5, (4, 10), generator=torch.Generator().manual_seed(4))}
    outputs = model(**inputs)
    torch.testing.assert_close(outputs_loss_for(model)(outputs, inputs).mean(), outputs.loss, rtol=1e-6, atol=1e-7)

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    inputs = _tokens()
    labels = inputs["input_ids"].clone()
    for row, kept in enumerate((10, 6, 3, 1)):  # the first `kept` tokens are labels: kept - 1 targets after the shift
        labels[row, kept:] = -100
    inputs["labels"] = labels
    outputs = lm(**inputs)
    per_sequence = outputs_loss_for(lm)(outputs, inputs)
    counts = torch.tensor([9.0, 5.0, 2.0, 0.0])
    assert per_sequence[3] == 0  # no labelled token
    torch.testing.assert_close((per_sequence * counts).sum() / counts.sum(), outputs.loss, rtol=1e-6, atol=1e-7)
    assert abs(per_sequence.mean() - outputs.loss) > 1e-2


def test_no_per_example_loss_for_an_unknown_loss_kind():
    from fsam_ds.hf.losses import outputs_loss_for

    assert outputs_loss_for(question_answering_bert()) is None


def test_own_accelerate_loop_equals_the_engine_path(tmp_path):
    """ZeRO-2, fp32, fisher-sam on 2 gloo ranks: accelerator.prepare(model, optimizer, loader, scheduler) under
    the DeepSpeed plugin, then sam_engine_from_accelerator(...).train_step per accumulation window, gives the
    weights of fsam_ds.initialize + train_step on the same micro-batches, bit for bit; an update at every
    micro-batch (the wrong variant) does not."""
    results = run_distributed(run_accelerate_cases, 2, tmp_path, 2, "fisher-sam", use_deepspeed=True, timeout=400)
    rank0, rank1 = results
    ours = torch.cat(rank0["params"])
    assert torch.equal(ours, torch.cat(rank1["params"]))
    assert rank0["windows"] == [2, 2, 1]  # 20 examples, 2 ranks x 2 per micro-batch: a short last step
    assert torch.equal(ours, torch.cat(rank0["engine_params"]))
    assert relative_update_error(torch.cat(rank0["wrong"]), ours, start_params()) > 1e-2


def test_accelerate_helpers_refuse_what_is_not_a_prepared_deepspeed_engine():
    from fsam_ds.hf import accumulation_windows, sam_engine_from_accelerator

    assert list(accumulation_windows(range(5), 2)) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ConfigError, match="needs accelerate's DeepSpeed plugin"):
        sam_engine_from_accelerator(object(), tiny_bert(), SAMConfig())

    class Prepared:  # what accelerate holds after prepare() under DeepSpeed
        deepspeed_engine_wrapped = type("Wrapper", (), {"engine": object()})()

    with pytest.raises(ConfigError, match="pass the model that prepare returned"):
        sam_engine_from_accelerator(Prepared(), tiny_bert(), SAMConfig())
