"""Code that runs inside the 2-rank Hugging Face Trainer test processes (imported by the spawned workers).

Each case trains the tiny BERT classifier with `SAMTrainer` under a `deepspeed=` config dict, records
the micro-batches the Trainer handed to each of its optimizer steps, then trains a second copy through
fsam-ds's own engine path (`fsam_ds.initialize` + `train_step`) on those same micro-batches with the
same optimizer, parameter groups and schedule."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.ranks import accelerate_on_gloo
from ds_workers import (ds_config, engine_state, full_params, lora_bert, named_full_params, sam_config, tiny_bert,
                        with_lora)

LR = 1e-2
WEIGHT_DECAY = 0.01
PER_DEVICE_BATCH = 2
ACCUMULATION = 2
SEQ_LEN = 12


def examples(count: int) -> list[dict[str, torch.Tensor]]:
    """The training set, in memory: `count` sequences of random tokens with 3-class labels."""
    g = torch.Generator().manual_seed(5)
    return [{"input_ids": torch.randint(1, 97, (SEQ_LEN,), generator=g),
             "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(count)]


def bert_loss(module, batch) -> torch.Tensor:
    """The engine path's per-example loss, written apart from fsam_ds.hf.losses."""
    logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def param_groups(model: torch.nn.Module) -> list[dict]:
    """The Trainer's two AdamW groups: weight decay except on biases and LayerNorm weights."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]


def named_param_groups(model: torch.nn.Module) -> list[dict]:
    """The same weight decay per parameter as `param_groups`, as SAMOptimizer takes it: one group per
    (name, tensor) in the model's order, the order SAMEngine sees them in (ESAM's random subset of
    tensors is drawn by position)."""
    decay = {id(p): g["weight_decay"] for g in param_groups(model) for p in g["params"]}
    return [{"params": [(n, p)], "weight_decay": decay[id(p)]} for n, p in model.named_parameters()]


def ds_scheduler_section(warmup: int, total: int) -> dict:
    return {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_type": "linear",
                                                "warmup_num_steps": warmup, "total_num_steps": total}}


FP16_SCALER = {"loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 100, "hysteresis": 1,
               "min_loss_scale": 1}  # as ds_workers.ds_config's fp16 section


def trainer_ds_config(stage: int, scheduler: str, offload: bool = False) -> dict:
    """What a user's ds_config.json holds under the Trainer: "auto" where the Trainer fills it in."""
    zero = {"stage": stage, **({"offload_optimizer": {"device": "cpu"}} if offload else {})}
    config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
              "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto", **FP16_SCALER},
              "zero_force_ds_cpu_optimizer": False,  # the Trainer's torch AdamW, also under offload
              "zero_optimization": zero, "steps_per_print": 10 ** 6, "wall_clock_breakdown": False}
    if scheduler == "deepspeed":  # the engine's scheduler; the Trainer fills its "auto" values
        config["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_type": "linear",
            "warmup_num_steps": "auto", "total_num_steps": "auto"}}
    return config


def training_args(output_dir: str, stage: int | None, scheduler: str = "trainer", precision: str = "fp32",
                  offload: bool = False, **overrides: Any):
    """The tests' TrainingArguments: one epoch, AdamW with weight decay, a linear schedule, no clipping.
    bf16 on a CPU needs `use_cpu` (transformers refuses bf16 without a bf16 GPU otherwise); fp16 needs
    DeepSpeed's test switch (`allow_fp16_on_cpu`)."""
    from transformers import TrainingArguments

    if precision == "fp16":
        from fsam_ds.zero.engine import allow_fp16_on_cpu

        allow_fp16_on_cpu()
    mixed = {"bf16": {"bf16": True, "use_cpu": True}, "fp16": {"fp16": True}}.get(precision, {})
    deepspeed = None if stage is None else trainer_ds_config(stage, scheduler, offload)  # None: without DeepSpeed
    return TrainingArguments(**{
        "output_dir": output_dir, "deepspeed": deepspeed, **mixed,
        "per_device_train_batch_size": PER_DEVICE_BATCH, "gradient_accumulation_steps": ACCUMULATION,
        "num_train_epochs": 1, "learning_rate": LR, "weight_decay": WEIGHT_DECAY, "max_grad_norm": 0.0,
        "optim": "adamw_torch", "lr_scheduler_type": "linear", "report_to": [], "save_strategy": "no",
        "logging_steps": 1, "disable_tqdm": True, "dataloader_pin_memory": False, **overrides})


def recording(base: type) -> type:
    """`base` (a SAMTrainer class) that records the micro-batches of each of the Trainer's optimizer
    steps, the learning rate each `engine.step()` ran with, and whether each SAM step was skipped."""

    class Recording(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.windows: list[list[dict]] = []
            self.step_lrs: list[float] = []
            self.skipped: list[bool] = []
            self.watch: int | None = None  # the update around which the engine's whole state is recorded
            self.around_watch: list[dict] = []
            self.loss_scales: list[float] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            if not self.windows:
                self.first_step = self.state.global_step  # after a resume, the checkpoint's
            if len(self.windows) == self.state.global_step - self.first_step:
                self.windows.append([])
            self.windows[-1].append({k: v.detach().clone() for k, v in inputs.items()})
            if hasattr(model, "step") and "step" not in vars(model):  # the DeepSpeed engine
                real_step = model.step

                def step(*args, **kwargs):
                    self.step_lrs.append(float(model.optimizer.param_groups[0]["lr"]))
                    return real_step(*args, **kwargs)

                model.step = step
            skipped_before = self.sam_skipped_steps()
            watched = self.watch == self.state.global_step and self._window_closes()
            if watched:
                self.around_watch.append(engine_state(model))
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not self._sam_window:  # the window closed: a SAM step ran
                self.skipped.append(self.sam_skipped_steps() > skipped_before)
                if self.sam_engine is not None:
                    self.loss_scales.append(self.sam_engine.shards.loss_scale())
            if watched:
                self.around_watch.append(engine_state(model))
            return loss

        def sam_skipped_steps(self) -> int:
            if self.is_deepspeed_enabled:
                return self.sam_engine.skipped_steps if self.sam_engine is not None else 0
            return self._sam_optimizer().skipped_steps

    return Recording


def every_micro_batch(base: type) -> type:
    """The deliberately wrong variant: a SAM step (and an update) at every micro-batch."""

    class EveryMicroBatch(base):
        def _window_closes(self) -> bool:
            return True

    return EveryMicroBatch


def poisoned_loss(trainer, update: int, in_pass: int = 1):
    """`bert_loss`, infinite in pass `in_pass` (1 at w, 2 at w + e) of the Trainer's optimizer step `update`:
    each pass calls the loss once per micro-batch of the step's window."""
    calls = {"step": None, "n": 0}

    def loss(module, batch):
        value = bert_loss(module, batch)
        if calls["step"] != trainer.state.global_step:
            calls["step"], calls["n"] = trainer.state.global_step, 0
        calls["n"] += 1
        window = len(trainer.windows[update]) if len(trainer.windows) > update else 0
        this_pass = 1 + (calls["n"] - 1) // max(window, 1)
        return value * float("inf") if trainer.state.global_step == update and this_pass == in_pass else value
    return loss


def train_with_trainer(case: dict, out_dir: str) -> dict:
    from fsam_ds.hf.trainer import SAMTrainer

    accelerate_on_gloo()
    name = "-".join(str(case[key]) for key in ("stage", "sam_type", "variant", "scheduler", "precision"))
    args = training_args(os.path.join(out_dir, name), case["stage"], case["scheduler"], case["precision"],
                         case["offload"], warmup_steps=case["warmup"], gradient_checkpointing=case["checkpointing"])
    trainer_class = recording(SAMTrainer if case["variant"] == "right" else every_micro_batch(SAMTrainer))
    model, loaded_partitioned = tiny_bert(), None
    if case["from_pretrained"]:  # after TrainingArguments: at ZeRO-3 from_pretrained loads partitioned
        from transformers import BertForSequenceClassification

        model = BertForSequenceClassification.from_pretrained(case["from_pretrained"])
        loaded_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    if case["lora"]:  # the peft model as a user's script passes it, after loading
        model = with_lora(model)
    trainer = trainer_class(model=model, args=args, train_dataset=examples(case["count"]),
                            sam=sam_config(case["sam_type"]))
    if case["poison"] is not None:
        trainer.sam_loss_fn = poisoned_loss(trainer, case["poison"], case["poison_pass"])
        trainer.watch = case["poison"]
    trainer.train()
    engine = trainer.model_wrapped
    predicted = torch.as_tensor(trainer.predict(examples(8)).predictions) if case["evaluate"] else None
    unchanged = None
    if trainer.around_watch:
        before, after = trainer.around_watch
        unchanged = {key: all(torch.equal(a, b) for a, b in zip(before[key], after[key])) for key in before}
    settings = {"dtype": str(next(engine.module.parameters()).dtype), "offload": bool(engine.zero_cpu_offload()),
                "checkpointing": engine.module.is_gradient_checkpointing}
    return {"settings": settings, "unchanged_by_watched_update": unchanged, "loss_scales": trainer.loss_scales,
            "loaded_partitioned": loaded_partitioned, "predicted": predicted,
            "ds_skipped": engine.skipped_steps, "windows": trainer.windows,
            # a peft model's by name, its frozen base gathered at ZeRO-3
            "params": None if case["lora"] else full_params(engine),
            "named": named_full_params(engine) if case["lora"] else None,
            "step_lrs": trainer.step_lrs,
            "global_step": trainer.state.global_step, "engine_steps": engine.global_steps,
            "logged_lrs": [e["learning_rate"] for e in trainer.state.log_history if "loss" in e],
            "logged_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "scheduler": type(trainer.lr_scheduler).__name__, "engine_scheduler": type(engine.lr_scheduler).__name__,
            "skipped": trainer.skipped, "scheduler_steps": getattr(trainer.lr_scheduler, "last_epoch", None)}


def train_with_engine(case: dict, windows: list[list[dict]]) -> list | dict:
    """fsam-ds's own path over the Trainer's micro-batches: same init, optimizer groups, schedule, precision,
    offload and activation checkpointing (transformers' own, which `gradient_checkpointing=True` turns on).
    The full parameters, or for a LoRA case every parameter by name."""
    from transformers import get_linear_schedule_with_warmup

    import fsam_ds.zero.engine as fe

    model = lora_bert() if case["lora"] else tiny_bert()
    if case["checkpointing"]:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR)
    config = ds_config(case["stage"], case["precision"], micro=PER_DEVICE_BATCH, gas=ACCUMULATION,
                       **({"offload_optimizer": {"device": "cpu"}} if case["offload"] else {}))
    schedule = None
    if case["scheduler"] == "deepspeed":
        config["scheduler"] = ds_scheduler_section(case["warmup"], len(windows))
    else:
        schedule = get_linear_schedule_with_warmup(optimizer, case["warmup"], len(windows))
    sam_engine = fe.initialize(model=model, config=config, sam=sam_config(case["sam_type"]), optimizer=optimizer,
                               lr_scheduler=schedule)
    for window in windows:
        assert not sam_engine.train_step(window, bert_loss).skipped
    return named_full_params(sam_engine.engine) if case["lora"] else full_params(sam_engine.engine)


CASE_DEFAULTS = {"variant": "right", "scheduler": "trainer", "precision": "fp32", "offload": False,
                 "checkpointing": False, "from_pretrained": False, "evaluate": False, "count": 20, "warmup": 0,
                 "poison": None, "poison_pass": 1, "lora": False,
                 "reference": True}


def run_trainer_cases(rank: int, world: int, cases: list[dict], out_dir: str) -> list[dict]:
    """Per case (stage, sam_type, variant "right"/"every-micro-batch", scheduler "trainer"/"deepspeed",
    precision, offload, checkpointing, from_pretrained: a folder with tiny_bert's weights, loaded after the
    TrainingArguments, lora: the model under `with_lora` (after loading),
    evaluate: the Trainer's predictions (logits) on 8 examples after training, count examples, warmup steps,
    poison: an update whose losses are
    infinite in pass poison_pass, reference: whether to run the engine path): the Trainer's run, and the engine path's
    parameters on its batches."""
    out = []
    for case in cases:
        started = time.perf_counter()
        case = {**CASE_DEFAULTS, **case}
        run = train_with_trainer(case, out_dir)
        if case["reference"]:
            run["engine_params"] = train_with_engine(case, run["windows"])
        run["seconds"] = time.perf_counter() - started
        out.append(run)
    return out


# ---------------------------------------------------------------- resuming from the Trainer's checkpoint-N/
RESUME_EXAMPLES = 20  # 2 ranks x 2 per micro-batch x 2 per step: steps of 2, 2 and 1 micro-batches per epoch
RESUME_EPOCHS = 2  # 6 steps
RESUME_AT = 4  # the second step of epoch 2; fisher-sam with mask_interval 3 built its mask at step 3


def without_sam_state(base: type) -> type:
    """The deliberately wrong variant: resumes DeepSpeed's state, the scheduler, the RNG and the data
    position from checkpoint-N/, but not the SAM state (a fresh Fisher mask, counters and generators)."""

    class WithoutSamState(base):
        def _sam_engine_for(self, engine):
            self._sam_resume_state = None
            return super()._sam_engine_for(engine)

    return WithoutSamState


def resume_trainer(stage: int, out_dir: str, trainer_class: type | None = None, sam_type: str = "fisher-sam",
                   save_steps: int | None = None):
    from fsam_ds.hf.trainer import SAMTrainer

    saving = {"save_strategy": "steps", "save_steps": save_steps} if save_steps else {}
    args = training_args(out_dir, stage, num_train_epochs=RESUME_EPOCHS, **saving)
    return (trainer_class or SAMTrainer)(model=tiny_bert(), args=args, train_dataset=examples(RESUME_EXAMPLES),
                                         sam=sam_config(sam_type, mask_interval=3))


def run_resume_cases(rank: int, world: int, stages: list[int], out_dir: str) -> list[dict]:
    """Per ZeRO stage: a run of 6 steps that saves checkpoint-4 on its way; a new Trainer resumed from
    checkpoint-4 to step 6; the same without the SAM state; a resume with another sam_type (refused)."""
    from fsam_ds.hf.trainer import SAMTrainer
    from fsam_ds.sam.config import ConfigError

    accelerate_on_gloo()
    out = []
    for stage in stages:
        folder = os.path.join(out_dir, f"stage{stage}")
        checkpoint = os.path.join(folder, f"checkpoint-{RESUME_AT}")
        full = resume_trainer(stage, folder, save_steps=RESUME_AT)
        full.train()
        run = {"full": full_params(full.model_wrapped), "full_steps": full.sam_engine.core.step_count,
               "checkpoint_files": sorted(os.listdir(checkpoint))}
        for name, trainer_class in (("resumed", SAMTrainer), ("without_sam_state", without_sam_state(SAMTrainer))):
            trainer = resume_trainer(stage, os.path.join(folder, name), trainer_class)
            trainer.train(resume_from_checkpoint=checkpoint)
            run[name] = full_params(trainer.model_wrapped)
            run[f"{name}_steps"] = trainer.sam_engine.core.step_count
            run[f"{name}_global_step"] = trainer.state.global_step
        other = resume_trainer(stage, os.path.join(folder, "other"), sam_type="sam")
        try:  # refused on every rank before any collective
            other.train(resume_from_checkpoint=checkpoint)
        except ConfigError as err:
            run["other_sam_type"] = str(err)
        run["other_prepared_nothing"] = other.model_wrapped is other.model and other.sam_engine is None
        out.append(run)
    return out


# ---------------------------------------------------------------- your own accelerate loop
def accelerate_loop(stage: int, sam_type: str, window_size: int) -> tuple[list, list[list[dict]]]:
    """The recipe of `fsam_ds.hf.accelerator`: prepare model, optimizer, loader and scheduler under the DeepSpeed
    plugin, then one `train_step` per window of `window_size` micro-batches (ACCUMULATION is right; 1, an update
    at every micro-batch, is the deliberately wrong variant). Returns the weights and the windows."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    from fsam_ds.hf import accumulation_windows, sam_engine_from_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)  # a new Accelerator per loop in this process
    accelerate_on_gloo()
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(
        stage, micro=PER_DEVICE_BATCH, gas=ACCUMULATION)))
    model = tiny_bert()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR)
    loader = DataLoader(examples(20), batch_size=PER_DEVICE_BATCH)
    steps = -(-len(loader) // accelerator.num_processes // window_size)
    # accelerate steps a prepared scheduler once per process: built for steps x processes, as in any accelerate loop
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, steps * accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    sam_engine = sam_engine_from_accelerator(accelerator, model, sam_config(sam_type))
    windows = []
    for window in accumulation_windows(loader, window_size):
        windows.append([{k: v.detach().clone() for k, v in batch.items()} for batch in window])
        out = sam_engine.train_step(window, bert_loss)
        if not out.skipped:
            scheduler.step()
    return full_params(model), windows


def run_accelerate_cases(rank: int, world: int, stage: int, sam_type: str) -> dict:
    """The accelerate loop, right and wrong, and fsam-ds's engine path on the right loop's micro-batches."""
    params, windows = accelerate_loop(stage, sam_type, ACCUMULATION)
    wrong, _ = accelerate_loop(stage, sam_type, 1)
    return {"params": params, "wrong": wrong, "windows": [len(w) for w in windows],
            "engine_params": train_with_engine({**CASE_DEFAULTS, "stage": stage, "sam_type": sam_type}, windows)}


# ---------------------------------------------------------------- without DeepSpeed: one process or DDP
def train_without_deepspeed(out_dir: str, sam_type: str, resume: str | None = None, mask_interval: int = 2,
                            lora: bool = False, **overrides: Any) -> dict:
    """SAMTrainer without --deepspeed (the Trainer's AdamW as SAMOptimizer's base; DDP on several ranks), on
    tiny_bert or, with `lora`, on `lora_bert` as it is."""
    from accelerate.state import AcceleratorState

    from fsam_ds.hf.trainer import SAMTrainer

    # accelerate keeps its state per process: a DeepSpeed run earlier in this process would leave its plugin
    # behind, and this Trainer would take itself for a DeepSpeed one
    AcceleratorState._reset_state(reset_partial_state=True)
    # and an Accelerator built with a DeepSpeed plugin sets this for the whole process, which TrainingArguments
    # would read as `accelerate launch --use_deepspeed`
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    accelerate_on_gloo()
    trainer = recording(SAMTrainer)(model=lora_bert() if lora else tiny_bert(),
                                    args=training_args(os.path.join(out_dir, sam_type), None, **overrides),
                                    train_dataset=examples(20), sam=sam_config(sam_type, mask_interval=mask_interval))
    trainer.train(resume_from_checkpoint=resume)
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {"params": [p.detach().clone().reshape(-1) for p in model.parameters()], "windows": trainer.windows,
            "named": {name: p.detach().clone() for name, p in model.named_parameters()},
            "global_step": trainer.state.global_step,
            "wrapped": type(trainer.model_wrapped).__name__, "sam_steps": trainer._sam_optimizer().step_count,
            "logged_grad_norms": [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e],
            "logged_losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}


def run_ddp_cases(rank: int, world: int, sam_types: list[str], out_dir: str) -> list[dict]:
    return [train_without_deepspeed(out_dir, sam_type) for sam_type in sam_types]

