"""The SAM family inside Hugging Face's `Trainer`, under `--deepspeed`: keep the script, change the class.

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

Checkpoints: every `checkpoint-N/` the Trainer writes holds, beside DeepSpeed's checkpoint, each rank's SAM
state (`SAMEngine.save_sam_state`: `fsam_state_rank<r>.pt`, written atomically). `train(resume_from_checkpoint=)`
reads and checks it before any work (`read_sam_state`: none there, another world size or sam_type are refused)
and restores it into the SAMEngine before its first step; DeepSpeed's state, the Trainer's scheduler, RNG
and data position come back as the Trainer restores them.

The loss the Trainer logs is the mean first-pass loss (at w) of this rank's examples, returned at the
boundary (0 for the micro-batches before it, which the Trainer adds up), then averaged over ranks by
the Trainer. Per-example losses: `fsam_ds.hf.losses` (where they relate to the Trainer's
`num_items_in_batch` normalisation), or `sam_loss_fn`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Mapping, TypeVar, get_type_hints

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from torch import Tensor
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from fsam_ds.hf.losses import OutputsLoss, outputs_loss_for
from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.zero.ds_config import check_sam_compatible
from fsam_ds.zero.engine import SAMEngine, read_sam_state

__all__ = ["SAMArguments", "SAMTrainer", "SAMTrainerMixin", "sam_trainer"]

SAMLoss = Callable[[torch.nn.Module, Mapping[str, Any]], Tensor]
"""(model, inputs) -> per-example losses, a 1-D tensor [batch]; `model` is the DeepSpeed engine."""

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
            micro-batch's prepared inputs; by default the losses come from the logits and `labels`
            (`fsam_ds.hf.losses`), or, for non-ESAM types on a model whose loss kind is not known there,
            the model's own `loss` per micro-batch.

    Needs `--deepspeed` (any ZeRO stage); refuses at `train()`, before any work, what it does not run
    exactly. `sam_engine` is the `SAMEngine` of the current training run (None before its first step).
    """

    def __init__(self, *args: Any, sam: SAMConfig | Any = None, sam_loss_fn: SAMLoss | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sam_config: SAMConfig = sam.to_config() if isinstance(sam, SAMArguments) else sam or SAMConfig()
        self.sam_loss_fn = sam_loss_fn
        self.sam_engine: SAMEngine | None = None
        self._sam_resume_state: dict | None = None
        self._sam_window: list[Mapping[str, Any]] = []
        self._outputs_loss: OutputsLoss | None = None
        self._sam_since_log = [0, 0]  # sharpness-aware updates, optimizer steps

    # ---------------------------------------------------------- the Trainer's hooks
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        if resume_from_checkpoint is True:  # the Trainer's own rule, resolved here to read the SAM state from it
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._refuse_unsupported()
        # read (and checked) before any work; restored into each SAMEngine this run builds, before its first step
        self._sam_resume_state = None if resume_from_checkpoint in (None, False) else read_sam_state(
            resume_from_checkpoint, self.args.process_index, self.args.world_size, self.sam_config.sam_type)
        self._sam_window, self._sam_since_log = [], [0, 0]
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # every rank, right after DeepSpeed's checkpoint into checkpoint-N/: this rank's SAM state beside it.
        # A private Trainer method (transformers 5.23): were it renamed, checkpoints would lack the SAM state
        # and resuming from them would be refused by read_sam_state, never continued inexactly.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.sam_engine is not None:
            self.sam_engine.save_sam_state(output_dir)

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
        mean first-pass loss of this rank. `num_items_in_batch` is not used (see `fsam_ds.hf.losses`)."""
        self._sam_window.append(self._prepare_inputs(inputs))
        if not self._window_closes():
            return torch.zeros((), device=self.args.device)
        window, self._sam_window = self._sam_window, []
        sam_engine = self._sam_engine_for(model)
        out = sam_engine.train_step(window, self._per_example_loss)
        self._sam_since_log[0] += int(not out.skipped and out.stats.sharpness_aware)
        self._sam_since_log[1] += 1
        if out.skipped and not model.fp16_enabled():
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

    def _sam_engine_for(self, engine: Any) -> SAMEngine:
        # a new train() (auto_find_batch_size, hyperparameter search) prepares a new engine
        if self.sam_engine is None or self.sam_engine.engine is not engine:
            # planned_steps: the schedule late:f starts at a fraction of the Trainer's max_steps
            self.sam_engine = SAMEngine(engine, self.sam_config, planned_steps=self.state.max_steps)
            if self._sam_resume_state is not None:
                self.sam_engine.load_sam_state(self._sam_resume_state)
            self._outputs_loss = outputs_loss_for(self.accelerator.unwrap_model(self.model))
        return self.sam_engine

    def _per_example_loss(self, engine: Any, inputs: Mapping[str, Any]) -> Tensor:
        inputs = dict(inputs)  # the loss may pop keys (as compute_loss does); every pass needs them all
        if self.sam_loss_fn is not None:
            return self.sam_loss_fn(engine, inputs)
        outputs = engine(**inputs)
        if self._outputs_loss is not None:
            return self._outputs_loss(outputs, inputs)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs[0]
        if not isinstance(loss, Tensor):
            raise ValueError(f"the model returned no loss for inputs {sorted(inputs)}; pass its labels, or "
                             "sam_loss_fn=(model, inputs) -> per-example losses.")
        return loss.reshape(1)  # the micro-batch's mean loss as one value: non-ESAM types only average it

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
        if not self.is_deepspeed_enabled:
            raise ConfigError(f"{name} needs DeepSpeed: pass --deepspeed ds_config.json (TrainingArguments("
                              "deepspeed=...)). Any ZeRO stage works, stage 0 on one process too (start it with "
                              "torchrun --nproc_per_node 1 or deepspeed --num_gpus 1). Without DeepSpeed, use "
                              "fsam_ds.SAMOptimizer in your own loop.")
        if args.torch_compile:
            raise ConfigError(f"{name} does not support --torch_compile (the SAM step runs the model's forward "
                              "and backward twice per step outside the compiled region); remove --torch_compile.")
        sizes = {"tensor": self.get_tp_size(), "context": self.get_cp_size(), "sequence": self.get_sp_size()}
        split = [kind for kind, size in sizes.items() if size > 1]
        if split:
            raise ConfigError(f"{name} does not support {' and '.join(split)} parallelism (the SAM step needs each "
                              "rank's whole examples); use data parallelism with ZeRO (stage 3 to shard the model).")
        check_sam_compatible(args.hf_deepspeed_config.config, source="the --deepspeed config", auto_filled_later=True)
        self._refuse_unknown_loss()

    def _refuse_unknown_loss(self) -> None:
        if self.sam_loss_fn is not None:
            return
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
        if own_loss:
            raise ConfigError(f"{name} {' and '.join(own_loss)}, but the SAM step computes per-example losses "
                              f"itself and would ignore that. {fix}")
        model = self.accelerator.unwrap_model(self.model)
        if outputs_loss_for(model) is not None and self.label_names not in (None, ["labels"]):
            raise ConfigError(f"{name} reads per-example losses off `labels`, but the model's labels are "
                              f"{self.label_names}. {fix}")
        if outputs_loss_for(model) is None and self.sam_config.uses_esam:
            raise ConfigError(f"sam_type={self.sam_config.sam_type!r} ranks examples by their loss, which needs one "
                              f"loss per example, and fsam-ds cannot read it off the outputs of {type(model).__name__} "
                              f"(loss_type {getattr(model, 'loss_type', None)!r}). {fix} Or use a non-ESAM type "
                              "(sam, fisher-sam, gsam, fisher-gsam), which then uses the model's own loss.")


class SAMTrainer(SAMTrainerMixin, Trainer):
    """`transformers.Trainer` whose optimizer step is a SAM-family step (`sam=SAMConfig(...)`); needs --deepspeed."""


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
