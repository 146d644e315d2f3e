"""The training run, top to bottom: build (`fsam_ds.trainer.build`), resume, loop over steps
(`SAMEngine.train_step` or the AdamW baseline's), evaluate, checkpoint, export.

Writes into output_dir: metrics.jsonl and config.json (every step, evaluation, mask and the final
summary), checkpoints/step<N>/ (exact resume), best/ and final/ (Hugging Face model folders); see
`fsam_ds.trainer.checkpoint`. Known input errors are raised as the exceptions in `KNOWN_ERRORS`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from fsam_ds.trainer.build import (Data, TrainError, build_data, build_engine, check_model_path, hub_error, load_model,
                           load_tokenizer, resolve_config)
from fsam_ds.trainer.checkpoint import (TrainerState, discard_after, export_model, find_checkpoint, load_checkpoint,
                                save_checkpoint, set_rng_state)
from fsam_ds.trainer.metrics_log import trim_metrics
from fsam_ds.sam.config import ConfigError
from fsam_ds.sam.core import StepStats
from fsam_ds.trainer.data import DataError, set_epoch
from fsam_ds.trainer.evaluate import evaluate, flatten_metrics, is_better, mask_density_by_layer
from fsam_ds.trainer.objectives import Objective, objective_for
from fsam_ds.trainer.run_config import TrainConfig
from fsam_ds.trainer.tasks import TaskSpec, UnknownTaskError, get_task
from fsam_ds.zero.adapters import UnsupportedConfiguration
from fsam_ds.zero.engine import EngineStepper

KNOWN_ERRORS = (ConfigError, DataError, TrainError, UnknownTaskError, UnsupportedConfiguration)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every accelerator device


def _quiet_libraries(rank: int, progress: bool) -> None:
    import datasets
    import transformers

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed's ZeRO code calls a torch collective that torch has renamed; nothing to act on here
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()  # per-file load/save bars would break the step bar
    if rank != 0 or not progress:
        datasets.disable_progress_bars()
    if rank != 0:
        transformers.logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------- loop

@dataclass
class Run:
    """Everything the loop needs."""

    cfg: TrainConfig
    task: TaskSpec
    data: Data
    sam_engine: EngineStepper
    tokenizer: Any
    logger: Any
    state: TrainerState
    param_names: list[str]
    base_prefix: str

    @property
    def engine(self) -> Any:
        return self.sam_engine.engine

    @functools.cached_property
    def objective(self) -> Objective:
        return objective_for(self.task)


class _Skip(Sampler[int]):
    """A sampler without its first `skip` indices."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.sampler), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


def _batches(run: Run, epoch: int, skip_steps: int) -> Iterator[dict]:
    """The epoch's micro-batches from step `skip_steps` on, identical to those of an uninterrupted run."""
    loader = run.data.train
    set_epoch(loader, epoch)  # the shuffle depends only on seed and epoch
    if skip_steps == 0:
        return iter(loader)
    # skipping indices instead of batches avoids loading and collating what the run already trained on;
    # the skip is a whole number of batches, so the remaining batches are cut the same way
    skip = skip_steps * run.cfg.data.grad_accum * loader.batch_size
    return iter(DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=_Skip(loader.sampler, skip),
                           collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                           pin_memory=loader.pin_memory, drop_last=loader.drop_last, generator=loader.generator))


def _global_mean(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


def log_step(run: Run, out: Any, lr: float, examples: int, epoch: float) -> None:
    loss, perturbed = _global_mean([out.loss, out.perturbed_loss], run.engine.device)
    s: StepStats = out.stats
    scalars: dict[str, Any] = {"lr": lr, "epoch": round(epoch, 4)}
    if run.cfg.sam.sam_type != "none" or math.isfinite(s.grad_norm):  # DeepSpeed may not compute it
        scalars["grad_norm"] = s.grad_norm
    if run.cfg.sam.sam_type != "none":
        scalars.update(perturbed_loss=perturbed, perturbation_norm=s.perturbation_norm, rho=s.rho,
                       mask_rebuilt=s.mask_rebuilt)
        if s.mask_density is not None:
            scalars["mask_density"] = s.mask_density
        if run.cfg.sam.sam_type.endswith("esam"):
            scalars["perturbed_tensors"] = s.perturbed_tensors
    scalars.update(skipped_steps=run.sam_engine.skipped_steps, loss_scale=out.loss_scale)
    run.logger.train_step(run.state.step, loss, examples, **scalars)
    if s.mask_rebuilt:  # collective
        density = mask_density_by_layer(run.sam_engine, run.param_names, run.base_prefix)
        run.logger.log_mask(run.state.step, density)


def run_eval(run: Run, epoch: float) -> None:
    cfg, state, task = run.cfg, run.state, run.task
    results = evaluate(run.engine, run.data.dev, run.objective)
    metrics = flatten_metrics(results, task.select_split)
    state.last_eval_step, state.last_metrics = state.step, metrics
    run.logger.log_eval(state.step, metrics, metric_name=task.select_metric, epoch=round(epoch, 4))
    value = results[task.select_split][task.select_metric]
    if is_better(value, state.best_metric):  # identical on every rank: all of them computed it
        state.best_metric, state.best_step, state.best_metrics = value, state.step, metrics
        if cfg.eval.save_best:
            info = {"step": state.step, "epoch": round(epoch, 4), "metric_name": task.select_metric,
                    "value": value, "metrics": metrics}
            export_model(run.engine, run.tokenizer, Path(cfg.output_dir) / "best", info)


def after_step(run: Run, epoch_done: bool, epoch: float) -> None:
    cfg, state = run.cfg, run.state
    final = state.step >= state.total_steps
    due = ((cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
           or (cfg.eval.every_epoch and epoch_done) or final)
    if due:
        run_eval(run, epoch)
    every = cfg.checkpoint_every
    if (every and state.step % every == 0) or (not every and due):
        save_checkpoint(run.sam_engine, cfg.output_dir, state, cfg.keep_checkpoints)


def train_loop(run: Run, rng: dict | None) -> None:
    cfg, state, data = run.cfg, run.state, run.data
    loss_fn = run.objective.per_example_loss
    gas, world = cfg.data.grad_accum, dist.get_world_size()
    while state.step < state.total_steps:
        batches = _batches(run, state.epoch, state.step_in_epoch)
        if rng is not None:  # resume: the generators continue exactly where the checkpoint left them
            set_rng_state(rng)
            rng = None
        for _ in range(state.step_in_epoch, data.steps_per_epoch):
            if state.step >= state.total_steps:
                break
            micro = [next(batches) for _ in range(gas)]
            lr = float(run.engine.get_lr()[0])  # the rate this step's update uses
            out = run.sam_engine.train_step(micro, loss_fn)
            state.step += 1
            state.step_in_epoch += 1
            epoch = state.epoch + state.step_in_epoch / data.steps_per_epoch
            epoch_done = state.step_in_epoch == data.steps_per_epoch
            if epoch_done:  # the checkpoint then records the start of the next epoch
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
            examples = sum(run.objective.batch_size(b) for b in micro) * world
            log_step(run, out, lr, examples, epoch)
            after_step(run, epoch_done, epoch)


def finish(run: Run, started: float) -> None:
    cfg, state, task = run.cfg, run.state, run.task
    final_dir = export_model(run.engine, run.tokenizer, Path(cfg.output_dir) / "final",
                             {"step": state.step, "metrics": state.last_metrics})
    run.logger.summary(state.best_metric, task.select_metric, best_step=state.best_step, steps=state.step,
                       best_metrics=state.best_metrics, skipped_steps=run.sam_engine.skipped_steps,
                       sam_type=cfg.sam.sam_type, output_dir=cfg.output_dir)
    best = "none" if state.best_metric is None else f"{state.best_metric:.4f} at step {state.best_step}"
    run.logger.console(
        f"done: {state.step} steps in {time.time() - started:.0f} s; best dev {task.select_metric} {best}; "
        f"final model in {final_dir}" + (f", best model in {Path(cfg.output_dir) / 'best'}"
                                         if cfg.eval.save_best and state.best_step is not None else ""))


def _resume_point(cfg: TrainConfig, rank: int) -> Path | None:
    found = [str(find_checkpoint(cfg.resume, cfg.output_dir) or "")] if rank == 0 else [None]
    dist.broadcast_object_list(found, src=0)  # rank 0 decides, in case the ranks' file views differ
    return Path(found[0]) if found[0] else None


def train(cfg: TrainConfig, rank: int, world: int) -> None:
    from transformers import AutoConfig

    started = time.time()
    task = get_task(cfg.task)
    _quiet_libraries(rank, cfg.log.progress)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg)
    data = build_data(cfg, task, tokenizer, rank, world)
    total = cfg.optim.max_steps or cfg.optim.epochs * data.steps_per_epoch
    try:
        hidden = getattr(AutoConfig.from_pretrained(cfg.model), "hidden_size", None)
    except OSError as err:
        raise hub_error(cfg.model, "model", err) from None
    ds_config = resolve_config(cfg, world, total, hidden)
    model = load_model(cfg, task)
    if cfg.precision == "fp32" and cfg.dtype != "float32":
        print(f"warning: dtype {cfg.dtype} with precision fp32 trains the {cfg.dtype} weights directly, "
              "without an fp32 master copy.", file=sys.stderr, flush=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sam_engine = build_engine(cfg, model, ds_config, total)

    order = {"world_size": world, "micro_batch_size": cfg.data.micro_batch_size,
             "grad_accum": cfg.data.grad_accum, "seed": cfg.seed, "steps_per_epoch": data.steps_per_epoch}
    state, rng = TrainerState(total_steps=total, data=order), None
    checkpoint = _resume_point(cfg, rank)
    if checkpoint is not None:
        state, rng = load_checkpoint(sam_engine, checkpoint, order, total)
    if rank == 0:
        removed = discard_after(cfg.output_dir, state.step)
        if removed and checkpoint is None:
            print(f"warning: {cfg.output_dir} held checkpoints of an earlier run (up to step {removed[-1]}); "
                  "this run starts afresh (resume=false) and replaces them. Pass --resume=true to continue "
                  "a run instead.", file=sys.stderr, flush=True)
        if checkpoint is not None:
            trim_metrics(Path(cfg.output_dir) / "metrics.jsonl", state.step)
    dist.barrier()
    with _open_logger(cfg, rank, total, state.step, checkpoint is not None) as logger:
        if checkpoint is not None:
            logger.console(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch})")
        run = Run(cfg, task, data, sam_engine, tokenizer, logger, state, names,
                  getattr(model, "base_model_prefix", ""))
        train_loop(run, rng)
        if state.last_eval_step != state.step:
            run_eval(run, state.epoch + state.step_in_epoch / data.steps_per_epoch)
        finish(run, started)


def _open_logger(cfg: TrainConfig, rank: int, total: int, start: int, resumed: bool) -> Any:
    from fsam_ds.trainer.metrics_log import open_run_logger

    return open_run_logger(cfg, rank=rank, total_steps=total, start_step=start, resumed=resumed)
