"""What the trainer builds from its configuration: tokenizer, model, data loaders, optimizer,
learning-rate schedule, DeepSpeed config and the engine (SAM-family or the plain AdamW baseline).

The optimizer is torch AdamW without weight decay on biases and other 1-D parameters (LayerNorm
weights), the usual choice for BERT-style fine-tuning. The learning-rate schedule is transformers'
`get_scheduler` curve named by optim.schedule (linear, polynomial with optim.power and optim.lr_end,
cosine, constant), after a linear warmup over int(warmup_ratio x total steps) updates in which the
k-th update uses lr x k / warmup. `linear` then decays to 0 one update after the last, so the k-th of
T updates (k > warmup) uses lr x (T - k + 1) / (T - warmup); `polynomial` with power 1 and end lr 0
is the same curve.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.trainer.activation_checkpointing import enable_activation_checkpointing
from fsam_ds.trainer.data.batches import build_dataloader
from fsam_ds.trainer.data.checks import DataError
from fsam_ds.trainer.model_loading import CheckpointError, TrainError, check_model_path, hub_error, load_pretrained
from fsam_ds.trainer.objectives import Objective
from fsam_ds.trainer.peft_model import WRAPPED_PREFIX, wrap_with_peft
from fsam_ds.trainer.run_config import OptimSection, TrainConfig
from fsam_ds.zero.engine import EngineStepper


# ----------------------------------------------------------------------------------- model, data

def load_tokenizer(cfg: TrainConfig) -> Any:
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.model
    check_model_path(name, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as err:
        raise hub_error(name, "tokenizer", err) from None


def load_model(cfg: TrainConfig, objective: Objective, ds_config: dict | None = None) -> torch.nn.Module:
    """The pretrained model with the head `objective` trains; partitioned from birth when
    `ds_config` (resolved) runs ZeRO-3 (`fsam_ds.trainer.model_loading`)."""
    try:
        return load_pretrained(objective.model_class(), cfg.model, getattr(torch, cfg.dtype), ds_config,
                               **objective.model_kwargs())
    except OSError as err:
        raise hub_error(cfg.model, "model", err) from None
    except CheckpointError as err:
        raise TrainError(f"model = {cfg.model!r}: {err}") from None


def check_positions(cfg: TrainConfig, model_config: Any) -> None:
    """Refuses generation lengths beyond the positions a model with learned position embeddings has (GPT-2's
    n_positions, BART's max_position_embeddings): its forward indexes past the table and fails at the first
    evaluation, after training. Rotary models run past max_position_embeddings, so they only get a warning."""
    if cfg.task not in ("causal-lm", "seq2seq"):
        return
    positions = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return  # relative positions (T5): no table to run out of
    d, e = cfg.data, cfg.eval
    if cfg.task == "causal-lm":
        longest, what = d.max_length + e.max_new_tokens, (f"data.max_length + eval.max_new_tokens = {d.max_length} + "
                                                          f"{e.max_new_tokens}")
        fix = (f"Lower eval.max_new_tokens to {positions - d.max_length} or data.max_length to "
               f"{positions - e.max_new_tokens}" if positions > max(d.max_length, e.max_new_tokens) else
               "Lower data.max_length and eval.max_new_tokens")
    else:  # the decoder starts from its start token, then generates
        longest, what = max(d.max_length, e.max_new_tokens + 1), (f"max(data.max_length, eval.max_new_tokens + 1) "
                                                                  f"= max({d.max_length}, {e.max_new_tokens + 1})")
        fix = f"Keep data.max_length <= {positions} and eval.max_new_tokens <= {positions - 1}"
    if longest <= positions:
        return
    rotary = any(getattr(model_config, key, None) is not None
                 for key in ("rope_theta", "rope_parameters", "rope_scaling"))
    message = f"{what} = {longest} tokens, more than the {positions} positions of the model {cfg.model!r}"
    if rotary:
        print(f"warning: {message}; its rotary positions run past that, but it was not trained on such lengths.",
              file=sys.stderr, flush=True)
        return
    raise ConfigError(f"{message} ({type(model_config).__name__}), so the evaluation's generation would index past "
                      f"its position table, after training. {fix}.")


@dataclass
class Data:
    train: torch.utils.data.DataLoader
    dev: dict[str, torch.utils.data.DataLoader]
    steps_per_epoch: int


def build_data(cfg: TrainConfig, objective: Objective, tokenizer: Any, rank: int, world: int) -> Data:
    d = cfg.data
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < d.max_length:
        raise ConfigError(f"data.max_length = {d.max_length} exceeds the {limit} tokens the model "
                          f"{cfg.tokenizer or cfg.model!r} accepts; pass --data.max_length={limit} or less.")
    tokens = objective.prepare_splits(tokenizer)
    collate = objective.collator(tokenizer)
    common = {"rank": rank, "world_size": world, "num_workers": d.num_workers, "seed": cfg.seed}
    train = build_dataloader(tokens[objective.train_split], collate, batch_size=d.micro_batch_size, train=True, **common)
    dev = {s: build_dataloader(tokens[s], collate, batch_size=d.eval_batch_size, train=False, **common)
           for s in tokens if s != objective.train_split}
    for loader in (train, *dev.values()):
        # creating an iterator draws a seed; from its own generator it leaves the global one (dropout,
        # restored on resume) alone
        loader.generator = torch.Generator().manual_seed(cfg.seed)
    steps = len(train) // d.grad_accum
    if steps == 0:
        n = len(tokens[objective.train_split])
        raise DataError(f"{n} training examples give each of the {world} process(es) {len(train)} micro-batch(es) "
                        f"of at most {d.micro_batch_size}, fewer than data.grad_accum = {d.grad_accum}, so not "
                        "one step fits in an epoch. Use more data, a smaller data.micro_batch_size or "
                        "data.grad_accum, or fewer processes.")
    return Data(train, dev, steps)


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
    sam = SAMConfig(**cfg.sam.to_core_kwargs())
    return fe.initialize(model, ds_config, sam, optimizer=optimizer, lr_scheduler=scheduler, planned_steps=total_steps)


def resolve_config(cfg: TrainConfig, world: int, total_steps: int, hidden_size: int | None) -> dict:
    from deepspeed.accelerator import get_accelerator

    from fsam_ds.zero.ds_config import resolve_ds_config

    if cfg.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise ConfigError(f"precision = fp16 is not supported on this {get_accelerator().device_name()} device "
                          "(DeepSpeed's accelerator reports no fp16 arithmetic); use precision bf16 or fp32.")
    o = cfg.optim
    return resolve_ds_config(cfg.ds_config, precision=cfg.precision, zero_stage=cfg.zero_stage,
                             micro_batch_size=cfg.data.micro_batch_size, grad_accum=cfg.data.grad_accum,
                             world_size=world, grad_clip=o.grad_clip, lr=o.lr, weight_decay=o.weight_decay,
                             betas=o.betas, eps=o.eps, total_steps=total_steps,
                             warmup_steps=int(o.warmup_ratio * total_steps), hidden_size=hidden_size)


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


def build_run(cfg: TrainConfig, objective: Objective, rank: int, world: int) -> Built:
    """Everything the run trains with, in the order each part needs the one before; every check of the
    configuration against the model, the data and DeepSpeed runs here, before the run folder changes."""
    from transformers import AutoConfig, set_seed

    set_seed(cfg.seed)  # python, numpy, torch and every accelerator
    tokenizer = load_tokenizer(cfg)
    data = build_data(cfg, objective, tokenizer, rank, world)
    total = cfg.optim.max_steps or cfg.optim.epochs * data.steps_per_epoch
    try:
        model_config = AutoConfig.from_pretrained(cfg.model)
    except OSError as err:
        raise hub_error(cfg.model, "model", err) from None
    check_positions(cfg, model_config)
    ds_config = resolve_config(cfg, world, total, getattr(model_config, "hidden_size", None))
    model = load_model(cfg, objective, ds_config)  # partitioned from birth at ZeRO-3
    enable_activation_checkpointing(model, cfg.gradient_checkpointing, ds_config)
    model = wrap_with_peft(cfg, model, objective)  # LoRA: adapters beside the frozen base
    if cfg.precision == "fp32" and cfg.dtype != "float32":
        print(f"warning: dtype {cfg.dtype} with precision fp32 trains the {cfg.dtype} weights directly, "
              "without an fp32 master copy.", file=sys.stderr, flush=True)
    # the model's own names (mask density by layer), without the prefix a peft wrapper adds
    names = [n.removeprefix(WRAPPED_PREFIX) for n, p in model.named_parameters() if p.requires_grad]
    sam_engine = build_engine(cfg, model, ds_config, total)
    return Built(tokenizer, data, sam_engine, total, names, getattr(model, "base_model_prefix", ""))
