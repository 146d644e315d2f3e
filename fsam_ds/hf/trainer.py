"""The SAM family inside Hugging Face's `Trainer` (under `--deepspeed`, or without it): keep the script,
change the class.

    trainer = SAMTrainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"),
                         train_dataset=train, sam=SAMConfig(sam_type="fisher-sam", rho=0.05))
    trainer.train()
    # any Trainer subclass: sam_trainer(MyTrainer)(..., sam=SAMConfig(...))

How one optimizer step runs. The Trainer calls `training_step` once per micro-batch and, after the
micro-batch it marks as the accumulation boundary (accelerate's `sync_gradients`, set by the Trainer
right before the call, also on an epoch's short last step), runs its optimizer step, scheduler step,
`zero_grad` and counters. Here `training_step` only collects the micro-batches of that window; at
the boundary it runs fsam-ds's two-pass step over all of them through `SAMEngine`, built on the first
step around the DeepSpeed engine the Trainer prepared (`model` in `training_step`). Both passes'
backward and the single `engine.step()` go through `SAMEngine`, never through `accelerator.backward`
(which would call `engine.step()` after the first pass). What the Trainer does next is then right as
it is, checked against accelerate 1.16 and transformers 5.23:

* `optimizer.step()` / `zero_grad()` are accelerate's DeepSpeed wrappers, no-ops;
* the scheduler steps once per update either way: a scheduler in the DeepSpeed config (or one the
  Trainer hands to DeepSpeed with an optimizer from the config) is the engine's, stepped inside
  `engine.step()`, and the Trainer's own `step()` on it is a no-op; otherwise it is the Trainer's
  (the common case), stepped once after the boundary unless DeepSpeed reports an fp16 overflow;
  after a SAM step that applied nothing for a non-finite gradient in bf16/fp32 (no `engine.step()`),
  the Trainer's next scheduler step is held back so that it too skips that step;
* `grad_norm` is DeepSpeed's norm of the last `engine.step()`: the gradient at w + e, pre-clipping;
* `sharpness_aware_share` is the share of the optimizer steps since the previous log line that were
  sharpness-aware (below 1 under a `schedule`, 0 for MSAM's first step).

Without DeepSpeed (one process, or DDP): `create_optimizer` makes the Trainer's own optimizer the base of
a `SAMOptimizer` (`max_grad_norm` clips inside its step, before the base steps), the boundary runs its
`train_step` over the window, and the Trainer's `optimizer.step()`, clipping and norm that follow read what
that step did (`_clip_grad_norm`, `_get_grad_norm`, both private Trainer methods in transformers 5.23).
The SAM state is then part of the optimizer's `state_dict`, saved and loaded by the Trainer.

A peft model (`get_peft_model`) is passed as it is: the step covers the trainable tensors only, the adapters
and the modules peft saves. At ZeRO-3 with bf16 or fp16, a base loaded partitioned (`from_pretrained` after the
TrainingArguments) gets its adapters in fp32, which DeepSpeed would leave so; `train()` casts them to the
base's dtype first (`fsam_ds.zero.engine.cast_added_parameters`), as DeepSpeed casts a model built whole.

Checkpoints under DeepSpeed: every `checkpoint-N/` the Trainer writes holds, beside DeepSpeed's checkpoint,
each rank's SAM state (`SAMEngine.save_sam_state`: `fsam_state_rank<r>.pt`, written atomically).
`train(resume_from_checkpoint=)` reads and checks it before any work (`read_sam_state`: none there, another
world size or sam_type are refused) and restores it into the SAMEngine before its first step; DeepSpeed's
state, the Trainer's scheduler, RNG and data position come back as the Trainer restores them.

The loss: `sam_loss_fn` where given; else, for a trainer with its own loss (a `compute_loss` override,
`compute_loss_func`, label smoothing: TRL's trainers), its `compute_loss` per micro-batch on the Trainer's
scale for the non-ESAM types, and for ESAM one loss per example where the trainer's loss has them
(`fsam_ds.hf.trl_support`: TRL's SFT), else refused; else per-example losses off the outputs
(`fsam_ds.hf.losses`, which says how they relate to the Trainer's `num_items_in_batch` normalisation).
The loss the Trainer logs is this rank's first-pass loss (at w) on the Trainer's scale, returned at the
boundary (0 for the micro-batches before it, which the Trainer adds up), then averaged over ranks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, TypeVar, get_type_hints

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from torch import Tensor
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from fsam_ds.hf import trl_support
from fsam_ds.hf.losses import OutputsLoss, outputs_loss_for
from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.sam.optim import SAMOptimizer
from fsam_ds.sam.shards import TorchComm
from fsam_ds.zero.ds_config import check_sam_compatible
from fsam_ds.zero.engine import SAMEngine, cast_added_parameters, read_sam_state

__all__ = ["SAMArguments", "SAMTrainer", "SAMTrainerMixin", "sam_trainer"]

SAMLoss = Callable[[torch.nn.Module, Mapping[str, Any]], Tensor]
"""(model, inputs) -> per-example losses, a 1-D tensor [batch]; `model` is the DeepSpeed engine."""

StepLoss = Callable[[Any, Mapping[str, Any], Any, int], Tensor]
"""(engine, inputs, num_items_in_batch, micro-batches in the window) -> the losses the SAM step averages."""

TrainerT = TypeVar("TrainerT", bound=type)


# ---------------------------------------------------------------- command-line arguments
def _argument_name(field: str) -> str:
    """SAMConfig's field name on the command line: prefixed where TrainingArguments has it too (seed)."""
    taken = {f.name for f in dataclasses.fields(TrainingArguments)}
    return f"sam_{field}" if field in taken else field


def _argument_fields() -> list[tuple[str, Any, Any]]:
    hints = get_type_hints(SAMConfig)
    out = []
    for f in dataclasses.fields(SAMConfig):
        hint, help_text = hints[f.name], {"help": f"SAMConfig.{f.name}, default {f.default!r}"}
        if isinstance(f.default, tuple):  # argparse takes lists; SAMConfig turns them back into tuples
            out.append((_argument_name(f.name), list[str],
                        dataclasses.field(default_factory=functools.partial(list, f.default), metadata=help_text)))
        else:
            out.append((_argument_name(f.name), hint, dataclasses.field(default=f.default, metadata=help_text)))
    return out


def _to_config(self: Any) -> SAMConfig:
    """The validated `SAMConfig` these arguments describe."""
    return SAMConfig(**{f.name: getattr(self, _argument_name(f.name)) for f in dataclasses.fields(SAMConfig)})


SAMArguments = dataclasses.make_dataclass("SAMArguments", _argument_fields(), namespace={"to_config": _to_config})
SAMArguments.__module__ = __name__
SAMArguments.__doc__ = """SAMConfig's fields as a dataclass for `HfArgumentParser`; a name TrainingArguments also
has gets a `sam_` prefix (`--sam_seed`). `to_config()` returns the SAMConfig.

    parser = HfArgumentParser((TrainingArguments, SAMArguments))
    training_args, sam_args = parser.parse_args_into_dataclasses()   # --sam_type fisher-sam --rho 0.05
    trainer = SAMTrainer(..., args=training_args, sam=sam_args)
"""


# ---------------------------------------------------------------- the Trainer mixin
class SAMTrainerMixin:
    """Put before a `transformers.Trainer` (sub)class: each optimizer step becomes a SAM-family step.

    Args (keywords, the rest goes to the Trainer):
        sam: a `SAMConfig` or `SAMArguments` (default: `SAMConfig()`, fisher-sam).
        sam_loss_fn: `(model, inputs) -> per-example losses`, called on a shallow copy of each
            micro-batch's prepared inputs; by default, the trainer's own `compute_loss` where it has one
            (non-ESAM types), else the losses come from the logits and `labels` (`fsam_ds.hf.losses`), or,
            for non-ESAM types on a model whose loss kind is not known there, the model's own `loss` per
            micro-batch.

    Under `--deepspeed` (any ZeRO stage) or without it (one process, DDP); refuses at `train()`, before any
    work, what it does not run exactly. `sam_engine` is the `SAMEngine` of the current training run (None
    before its first step).
    """

    sam_logging_state: tuple[str, ...] = ("_metrics", "_total_train_tokens")
    """Attributes that a trainer's `compute_loss` updates for its logs: TRL's trainers append their metrics
    (entropy, token accuracy, rewards) to `_metrics` and count `_total_train_tokens`. The SAM step calls
    `compute_loss` once per pass and keeps these as they were after the first pass (each micro-batch once,
    at w), as the trainer alone would log them. A subclass names its own here."""

    def __init__(self, *args: Any, sam: SAMConfig | Any = None, sam_loss_fn: SAMLoss | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sam_config: SAMConfig = sam.to_config() if isinstance(sam, SAMArguments) else sam or SAMConfig()
        self.sam_loss_fn = sam_loss_fn
        self.sam_engine: SAMEngine | None = None
        self._sam_resume_state: dict | None = None
        self._sam_window: list[Mapping[str, Any]] = []
        self._outputs_loss: OutputsLoss | None = None
        self._planned_steps: int | None = None
        self._sam_step_loss: StepLoss = self._outputs_loss_of
        self._sam_since_log = [0, 0]  # sharpness-aware updates, optimizer steps

    # ---------------------------------------------------------- the Trainer's hooks
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:  # the Trainer's own rule, resolved here to read the SAM state from it
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._refuse_unsupported()
        if self.is_deepspeed_enabled:  # a model loaded partitioned, then wrapped by peft: see cast_added_parameters
            cast_added_parameters(self.model)
        # read (and checked) before any work; restored into each SAMEngine this run builds, before its first step
        # without DeepSpeed the SAM state is in the optimizer's state_dict, which the Trainer saves and loads
        resuming = resume_from_checkpoint not in (None, False) and self.is_deepspeed_enabled
        self._sam_resume_state = None if not resuming else read_sam_state(
            resume_from_checkpoint, self.args.process_index, self.args.world_size, self.sam_config.sam_type)
        self._sam_window, self._sam_since_log = [], [0, 0]
        self._outputs_loss = outputs_loss_for(self.accelerator.unwrap_model(self.model))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # every rank, right after DeepSpeed's checkpoint into checkpoint-N/: this rank's SAM state beside it.
        # A private Trainer method (transformers 5.23): were it renamed, checkpoints would lack the SAM state
        # and resuming from them would be refused by read_sam_state, never continued inexactly.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.sam_engine is not None:
            self.sam_engine.save_sam_state(output_dir)

    def create_optimizer_and_scheduler(self, num_training_steps: int) -> None:
        self._planned_steps = num_training_steps  # the schedule late:f needs the run's planned updates
        super().create_optimizer_and_scheduler(num_training_steps)

    def create_optimizer(self, model: Any = None) -> Any:
        """Without DeepSpeed: the Trainer's own optimizer (class, groups, settings) as the base of a
        `SAMOptimizer`, which the step in `training_step` drives; under DeepSpeed, the Trainer's as it is."""
        optimizer = super().create_optimizer(model)
        if self.is_deepspeed_enabled or isinstance(optimizer, SAMOptimizer):
            return optimizer
        module = model or self.model
        # the base keeps its groups; SAMOptimizer sees each tensor under its name in the model's order, the order
        # the DeepSpeed path sees them in (ESAM draws its random subset of tensors by position)
        settings = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        groups = [{**settings[id(p)], "params": [(name, p)]} for name, p in module.named_parameters()
                  if id(p) in settings]
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        self.optimizer = _StepInTrainingStep(
            groups, lambda _groups: optimizer, self.sam_config, module=module, max_grad_norm=max_norm,
            comm=TorchComm() if self.args.world_size > 1 else None,  # ESAM ranks the examples of every rank
            planned_steps=self._planned_steps)
        return self.optimizer

    def _clip_grad_norm(self, model: Any) -> Any:
        # without DeepSpeed the step already clipped (SAMOptimizer's max_grad_norm) and zeroed the gradients
        if self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self._sam_optimizer().grad_norm

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if self.is_deepspeed_enabled or grad_norm is not None:
            return super()._get_grad_norm(model, grad_norm)
        return self._sam_optimizer().grad_norm

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        # called once per optimizer step, before its micro-batches
        if self._sam_window:
            warnings.warn(f"{len(self._sam_window)} micro-batch(es) never reached the Trainer's optimizer step (the "
                          "data ran out before the accumulation boundary); the SAM step drops them.", stacklevel=2)
            self._sam_window = []
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def training_step(self, model: torch.nn.Module, inputs: Mapping[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        """Collects the micro-batch; at the accumulation boundary runs the SAM step over the window.
        Returns what the Trainer sums into its logged loss: 0 before the boundary, then the step's
        first-pass loss of this rank on the Trainer's scale (the sum of the window's `compute_loss`
        values where the trainer's loss is used, else the mean of the per-example losses)."""
        self._sam_window.append(self._prepare_inputs(inputs))
        if not self._window_closes():
            return torch.zeros((), device=self.args.device)
        window, self._sam_window = self._sam_window, []
        count, step_loss = len(window), self._sam_step_loss
        loss_fn, restore_logs = self._first_pass_logs_only(
            lambda engine, batch: step_loss(engine, batch, num_items_in_batch, count), count)
        try:
            # the context TRL's trainers enter in their own training_step, which the SAM step replaces
            with getattr(self, "maybe_activation_offload_context", None) or contextlib.nullcontext():
                if self.is_deepspeed_enabled:
                    out = self._sam_engine_for(model).train_step(window, loss_fn)
                else:
                    out = self._sam_optimizer().train_step(window, functools.partial(loss_fn, model))
        finally:
            restore_logs()
        self._sam_since_log[0] += int(not out.skipped and out.stats.sharpness_aware)
        self._sam_since_log[1] += 1
        # DeepSpeed's fp16 loss scaler reports its skipped steps to the Trainer itself
        if out.skipped and not (self.is_deepspeed_enabled and model.fp16_enabled()):
            self._hold_scheduler_once()
        return torch.tensor(out.loss, device=self.args.device)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        # over the steps since the previous log line, as the Trainer's `loss` beside it
        if "loss" in logs and self._sam_since_log[1]:
            logs = {**logs, "sharpness_aware_share": self._sam_since_log[0] / self._sam_since_log[1]}
            self._sam_since_log = [0, 0]
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------- the step
    def _window_closes(self) -> bool:
        """Whether this micro-batch is the last of the Trainer's accumulation window."""
        return self.accelerator.sync_gradients

    def _sam_optimizer(self) -> SAMOptimizer:
        """Without DeepSpeed: the SAMOptimizer under accelerate's wrapper."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def _sam_engine_for(self, engine: Any) -> SAMEngine:
        # a new train() (auto_find_batch_size, hyperparameter search) prepares a new engine
        if self.sam_engine is None or self.sam_engine.engine is not engine:
            # planned_steps: the schedule late:f starts at a fraction of the Trainer's max_steps
            self.sam_engine = SAMEngine(engine, self.sam_config, planned_steps=self.state.max_steps)
            if self._sam_resume_state is not None:
                self.sam_engine.load_sam_state(self._sam_resume_state)
        return self.sam_engine

    def _given_loss(self, engine: Any, inputs: Mapping[str, Any], num_items_in_batch: Any, count: int) -> Tensor:
        return self.sam_loss_fn(engine, dict(inputs))  # a copy: the loss may pop keys, every pass needs them all

    def _outputs_loss_of(self, engine: Any, inputs: Mapping[str, Any], num_items_in_batch: Any,
                         count: int) -> Tensor:
        inputs = dict(inputs)
        outputs = engine(**inputs)
        if self._outputs_loss is not None:
            return self._outputs_loss(outputs, inputs)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0]
        if not isinstance(loss, Tensor):
            raise ValueError(f"the model returned no loss for inputs {sorted(inputs)}; pass its labels, or "
                             "sam_loss_fn=(model, inputs) -> per-example losses.")
        return loss.reshape(1)  # the micro-batch's mean loss as one value: non-ESAM types only average it

    def _trainer_loss(self, engine: Any, inputs: Mapping[str, Any], num_items_in_batch: Any, count: int) -> Tensor:
        """The trainer's own `compute_loss` of one micro-batch, as one value on the SAM step's scale.

        The SAM step divides each micro-batch's loss by the window's length (and DeepSpeed averages over
        ranks). The Trainer does the same unless the loss is already normalised over the whole window and
        all ranks (`num_items_in_batch`, `loss_is_scaled_for_ga`), in which case it adds the micro-batches'
        losses up: then the value is multiplied by the window's length, so both passes minimise exactly the
        Trainer's loss and the step's first-pass loss is the Trainer's logged loss."""
        with self.compute_loss_context_manager():
            loss = self.compute_loss(engine, dict(inputs), num_items_in_batch=num_items_in_batch)
        return (loss * count if self._loss_is_scaled_for_ga(num_items_in_batch) else loss).reshape(1)

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """The Trainer's rule (transformers 5.23, `Trainer.training_step`)."""
        declared = getattr(self, "loss_is_scaled_for_ga", None)
        if declared is not None:
            return bool(declared)
        return bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            self.compute_loss_func is not None

    def _first_pass_logs_only(self, loss_fn: Callable[[Any, Any], Tensor],
                              count: int) -> tuple[Callable[[Any, Any], Tensor], Callable[[], None]]:
        """`loss_fn` that records the trainer's logging state (`sam_logging_state`) after the first pass
        (the first `count` calls: each micro-batch once, at w), and the call that puts it back after the
        step, so that the later passes (at w + e, ESAM's selection) leave no trace in the logs."""
        names = [name for name in self.sam_logging_state if hasattr(self, name)]
        kept: dict[str, Any] = {}
        calls = 0

        def counted(engine: Any, batch: Any) -> Tensor:
            nonlocal calls
            loss = loss_fn(engine, batch)
            calls += 1
            if calls == count:
                kept.update((name, copy.deepcopy(getattr(self, name))) for name in names)
            return loss

        def restore() -> None:
            for name, value in kept.items():
                setattr(self, name, value)

        return counted, restore

    def _hold_scheduler_once(self) -> None:
        """The Trainer steps its own scheduler after every step it counts unless DeepSpeed reports an fp16
        overflow; this step applied nothing either, so its next `step()` call is skipped once."""
        scheduler = self.lr_scheduler
        if scheduler is None or isinstance(scheduler, DeepSpeedSchedulerWrapper):
            return  # the engine's scheduler, which steps in engine.step() only; the Trainer's step() is a no-op
        own = vars(scheduler).get("step")

        def skip_once(*args: Any, **kwargs: Any) -> None:
            if own is None:
                del scheduler.step
            else:
                scheduler.step = own

        scheduler.step = skip_once

    # ---------------------------------------------------------- refusals
    def _refuse_unsupported(self) -> None:
        """Raises ConfigError, before any work, for what this integration does not run exactly."""
        args, name = self.args, type(self).__name__
        if getattr(self, "is_fsdp_enabled", False) or args.fsdp:
            raise ConfigError(f"{name} does not run under FSDP: the SAM step drives a DeepSpeed engine. Replace "
                              "--fsdp with --deepspeed and a ZeRO stage 3 config, which shards the model likewise.")
        if not self.is_deepspeed_enabled and args.fp16:
            raise ConfigError(f"{name} without DeepSpeed does not support --fp16 (torch's GradScaler would unscale "
                              "and step outside the SAM step); use --bf16, or --deepspeed ds_config.json with an "
                              "fp16 section, whose loss scaler the SAM step drives.")
        if args.torch_compile:
            raise ConfigError(f"{name} does not support --torch_compile (the SAM step runs the model's forward "
                              "and backward twice per step outside the compiled region); remove --torch_compile.")
        sizes = {"tensor": self.get_tp_size(), "context": self.get_cp_size(), "sequence": self.get_sp_size()}
        split = [kind for kind, size in sizes.items() if size > 1]
        if split:
            raise ConfigError(f"{name} does not support {' and '.join(split)} parallelism (the SAM step needs each "
                              "rank's whole examples); use data parallelism with ZeRO (stage 3 to shard the model).")
        if self.is_deepspeed_enabled:
            # --deepspeed, or `accelerate launch` with a DeepSpeed accelerate config and no --deepspeed: the
            # plugin holds the config either way (the Trainer moved its own arguments into it)
            source = ("the --deepspeed config" if getattr(args, "hf_deepspeed_config", None) is not None
                      else "accelerate's DeepSpeed config")
            check_sam_compatible(self.accelerator.state.deepspeed_plugin.hf_ds_config.config, source=source,
                                 auto_filled_later=True)
        self._refuse_bypassed_training_step()
        self._sam_step_loss = self._choose_loss()

    def _refuse_bypassed_training_step(self) -> None:
        """The mixin's training_step replaces those of the classes after it; refuses the ones that do more
        than TRL's activation-offload context (which the SAM step enters itself)."""
        mro = type(self).__mro__
        for cls in mro[mro.index(SAMTrainerMixin) + 1:mro.index(Trainer)]:
            if "training_step" not in vars(cls) or trl_support.only_enters_offload_context(cls):
                continue
            why = trl_support.why_not_supported(cls) or (
                f"Override training_step in a subclass of sam_trainer({cls.__name__}) instead (it then runs "
                "around the mixin's, once per micro-batch, and calls super().training_step).")
            raise ConfigError(f"{cls.__name__} overrides training_step, which {type(self).__name__} replaces "
                              f"with the SAM step (collect the micro-batches, run both passes at the "
                              f"accumulation boundary), so it would never run. {why}")

    def _choose_loss(self) -> StepLoss:
        """The loss the SAM step runs with, or ConfigError where it cannot be exact."""
        if self.sam_loss_fn is not None:
            return self._given_loss
        name = type(self).__name__
        fix = ("Pass sam_loss_fn=(model, inputs) -> per-example losses (a 1-D tensor, one per example), computed "
               "with reduction='none'.")
        own_loss = []
        if type(self).compute_loss is not Trainer.compute_loss:
            own_loss.append("overrides compute_loss")
        if self.compute_loss_func is not None:
            own_loss.append("has compute_loss_func")
        if self.label_smoother is not None:
            own_loss.append("has label_smoothing_factor > 0")
        if own_loss and not self.sam_config.uses_esam:
            return self._trainer_loss
        if own_loss:
            trl_loss = trl_support.per_example_loss(self)  # TRL's SFT loss, one value per sequence
            if trl_loss is not None:
                return trl_loss
            reason = trl_support.why_no_per_example_loss(self) or (
                f"{name} {' and '.join(own_loss)}, whose loss is one value per micro-batch")
            raise ConfigError(f"sam_type={self.sam_config.sam_type!r} ranks examples by their loss, which needs one "
                              f"loss per example, but {reason}. {fix} Or use a non-ESAM type (sam, fisher-sam, "
                              f"gsam, fisher-gsam), which runs with {name}'s own loss.")
        model = self.accelerator.unwrap_model(self.model)
        if outputs_loss_for(model) is not None and self.label_names not in (None, ["labels"]):
            raise ConfigError(f"{name} reads per-example losses off `labels`, but the model's labels are "
                              f"{self.label_names}. {fix}")
        if outputs_loss_for(model) is None and self.sam_config.uses_esam:
            raise ConfigError(f"sam_type={self.sam_config.sam_type!r} ranks examples by their loss, which needs one "
                              f"loss per example, and fsam-ds cannot read it off the outputs of {type(model).__name__} "
                              f"(loss_type {getattr(model, 'loss_type', None)!r}). {fix} Or use a non-ESAM type "
                              "(sam, fisher-sam, gsam, fisher-gsam), which then uses the model's own loss.")
        return self._outputs_loss_of


class _StepInTrainingStep(SAMOptimizer):
    """The Trainer's optimizer without DeepSpeed: `training_step` runs the whole SAM step (`train_step`) at the
    accumulation boundary, so the Trainer's own `optimizer.step()` right after it does nothing, as under
    DeepSpeed. A closure still gets the two-pass torch-style step."""

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        return None if closure is None else super().step(closure)


class SAMTrainer(SAMTrainerMixin, Trainer):
    """`transformers.Trainer` whose optimizer step is a SAM-family step (`sam=SAMConfig(...)`)."""


@functools.cache
def sam_trainer(trainer_class: TrainerT) -> TrainerT:
    """`trainer_class` (a Trainer subclass) with `SAMTrainerMixin` in front: `sam_trainer(SFTLikeTrainer)(...,
    sam=SAMConfig(...))`. The same class comes back for the same argument."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"sam_trainer takes a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, SAMTrainerMixin):
        return trainer_class
    return type(f"SAM{trainer_class.__name__}", (SAMTrainerMixin, trainer_class),
                {"__module__": trainer_class.__module__, "__doc__": SAMTrainerMixin.__doc__})
