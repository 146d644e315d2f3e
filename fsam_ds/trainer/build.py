"""What the trainer builds from its configuration and its pretrained model's tokenizer and configuration
(`fsam_ds.trainer.model_loading.open_pretrained`): data loaders, DeepSpeed config, model, optimizer,
learning-rate schedule and the engine (SAM-family or the plain AdamW baseline).

The optimizer is torch AdamW without weight decay on biases and other 1-D parameters (LayerNorm
weights), the usual choice for BERT-style fine-tuning. The learning-rate schedule is transformers'
`get_scheduler` curve named by optim.schedule (linear, polynomial with optim.power and optim.lr_end,
cosine, constant), after a linear warmup over int(warmup_ratio x total steps) updates in which the
k-th update uses lr x k / warmup. `linear` then decays to 0 one update after the last, so the k-th of
T updates (k > warmup) uses lr x (T - k + 1) / (T - warmup); `polynomial` with power 1 and end lr 0
is the same curve.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import torch

from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.trainer.activation_checkpointing import enable_activation_checkpointing
from fsam_ds.trainer.data.batches import Data, build_data
from fsam_ds.trainer.model_loading import Pretrained, load_model
from fsam_ds.trainer.objectives import Objective
from fsam_ds.trainer.peft_model import WRAPPED_PREFIX, wrap_with_peft
from fsam_ds.trainer.run_config import OptimSection, TrainConfig
from fsam_ds.zero.engine import EngineStepper


# ------------------------------------------------------------------------ optimizer and schedule

def build_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW; biases and 1-D weights (LayerNorm) get no weight decay, judged from each parameter's full
    shape, so the groups are the same at every ZeRO stage, partitioned loading included.

    torch's fused kernel where it has one for the parameters' device: the per-tensor implementation
    allocates two temporaries the size of what it updates (sqrt of the second moment, then its quotient),
    which under ZeRO is the rank's whole flat partition: a peak of 1x the partition above the optimizer's
    own state at every step (measured by `python -m benchmarks scale`). The fused kernel has none and
    agrees with the per-tensor one to rounding."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            # a ZeRO-3 parameter loaded partitioned is a placeholder of shape [0] here; its own shape is ds_shape
            ndim = len(getattr(p, "ds_shape", p.shape))
            (no_decay if ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    settings = {"lr": optim.lr, "betas": tuple(optim.betas), "eps": optim.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **settings)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(groups, **settings)


SCHEDULES = {"linear": "linear", "polynomial": "polynomial", "cosine": "cosine", "constant": "constant_with_warmup"}
"""optim.schedule -> transformers' scheduler name."""


def _warmup_from_first_update(step: int, *, curve: Callable[[int], float], warmup: int) -> float:
    # transformers gives the update after `step` updates curve(step), so its first update runs at lr 0 and
    # the peak comes at update warmup + 1; reading the warmup one update ahead makes the k-th update use
    # k / warmup. Past the warmup the library's curve is used as it is.
    return curve(step + 1 if step < warmup else step)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSection,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule over `total_steps` updates (see the module doc).

    Its multiplier is a functools.partial, whose state_dict entry is empty: a checkpoint keeps the
    step count and base lrs, and a resumed run rebuilds the curve from its own configuration.
    """
    from transformers import get_scheduler

    warmup = int(optim.warmup_ratio * total_steps)
    extra = {"power": optim.power, "lr_end": optim.lr_end} if optim.schedule == "polynomial" else None
    library = get_scheduler(SCHEDULES[optim.schedule], optimizer, num_warmup_steps=warmup,
                            num_training_steps=total_steps, scheduler_specific_kwargs=extra)
    # a second LambdaLR on the same optimizer starts from the same base lrs (the `initial_lr` the first set)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [partial(_warmup_from_first_update, curve=curve, warmup=warmup) for curve in library.lr_lambdas])


# --------------------------------------------------------------------------------------- engine

def build_engine(cfg: TrainConfig, model: torch.nn.Module, ds_config: dict, total_steps: int) -> Any:
    import fsam_ds.zero.engine as fe

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    if cfg.sam.sam_type == "none":
        return fe.initialize_plain(model, ds_config, optimizer=optimizer, lr_scheduler=scheduler)
    sam = SAMConfig(**dataclasses.asdict(cfg.sam))  # the section holds the core's fields, checked
    return fe.initialize(model, ds_config, sam, optimizer=optimizer, lr_scheduler=scheduler, planned_steps=total_steps)


# ------------------------------------------------------------------------------------ the run

@dataclass
class Built:
    """What the run trains with, built and checked before the run folder changes."""

    tokenizer: Any
    data: Data
    sam_engine: EngineStepper
    total_steps: int
    param_names: list[str]
    """The trainable parameters' names in the model's own terms (mask density by layer)."""
    base_prefix: str


def build_run(cfg: TrainConfig, objective: Objective, pretrained: Pretrained, rank: int, world: int) -> Built:
    """Everything the run trains with, in the order each part needs the one before; every check of the
    configuration against the data and DeepSpeed runs here, before the run folder changes."""
    from deepspeed.accelerator import get_accelerator
    from transformers import set_seed

    from fsam_ds.zero.ds_config import resolve_ds_config

    set_seed(cfg.seed)  # python, numpy, torch and every accelerator
    tokenizer = pretrained.tokenizer
    data = build_data(cfg, objective.prepare_splits(tokenizer), objective.collator(tokenizer), objective.train_split,
                      rank, world)
    total = cfg.optim.max_steps or cfg.optim.epochs * data.steps_per_epoch
    if cfg.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ConfigError(f"precision = fp16 is not supported on this {get_accelerator().device_name()} device "
                          "(DeepSpeed's accelerator reports no fp16 arithmetic); use precision bf16 or fp32.")
    o = cfg.optim
    ds_config = resolve_ds_config(cfg.ds_config, precision=cfg.precision, zero_stage=cfg.zero_stage,
                                  micro_batch_size=cfg.data.micro_batch_size, grad_accum=cfg.data.grad_accum,
                                  world_size=world, grad_clip=o.grad_clip, lr=o.lr, weight_decay=o.weight_decay,
                                  betas=o.betas, eps=o.eps, total_steps=total,
                                  warmup_steps=int(o.warmup_ratio * total),
                                  hidden_size=getattr(pretrained.config, "hidden_size", None))
    model = load_model(cfg, objective, ds_config)  # partitioned from birth at ZeRO-3
    enable_activation_checkpointing(model, cfg.gradient_checkpointing, ds_config)
    model = wrap_with_peft(cfg, model, objective)  # LoRA: adapters beside the frozen base
    if cfg.precision == "fp32" and cfg.dtype != "float32":
        print(f"warning: dtype {cfg.dtype} with precision fp32 trains the {cfg.dtype} weights directly, "
              "without an fp32 master copy.", file=sys.stderr, flush=True)
    # the model's own names (mask density by layer), without the prefix a peft wrapper adds
    names = [n.removeprefix(WRAPPED_PREFIX) for n, p in model.named_parameters() if p.requires_grad]
    sam_engine = build_engine(cfg, model, ds_config, total)
    return Built(pretrained.tokenizer, data, sam_engine, total, names, getattr(model, "base_model_prefix", ""))
