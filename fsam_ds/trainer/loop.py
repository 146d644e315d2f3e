"""The training run, top to bottom (`train`): configuration and objective, the pretrained model checked
(`fsam_ds.trainer.model_loading.open_pretrained`), the run folder (`RunDir`: claimed, resume point found,
another run refused), build (`fsam_ds.trainer.build`), start (resumed or fresh), loop over steps
(`SAMEngine.train_step` or the AdamW baseline's), evaluate, checkpoint, export.

Writes into output_dir: config.json (`RunDir.start`), metrics.jsonl (every step, evaluation, mask and the
final summary), checkpoints/step<N>/ (exact resume), best/ and final/ (Hugging Face model folders); see
`fsam_ds.trainer.run_dir`. Known input errors are raised as the exceptions in `KNOWN_ERRORS`.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from fsam_ds.sam.config import ConfigError
from fsam_ds.sam.driver import StepOutput
from fsam_ds.trainer.build import build_run
from fsam_ds.trainer.data.batches import Data, set_epoch
from fsam_ds.trainer.data.checks import DataError
from fsam_ds.trainer.evaluate import evaluate, flatten_metrics, is_better, mask_density_by_layer
from fsam_ds.trainer.metrics_log import open_run_logger
from fsam_ds.trainer.model_loading import TrainError, open_pretrained
from fsam_ds.trainer.objectives import Objective, objective_for
from fsam_ds.trainer.peft_model import merged_model
from fsam_ds.trainer.run_config import TrainConfig, config_to_dict
from fsam_ds.trainer.run_dir import CheckpointWriteFailed, RunDir, TrainerState, set_rng_state
from fsam_ds.trainer.tasks import UnknownTaskError
from fsam_ds.zero.adapters import UnsupportedConfiguration
from fsam_ds.zero.engine import EngineStepper

KNOWN_ERRORS = (ConfigError, DataError, TrainError, UnknownTaskError, UnsupportedConfiguration)


class TrainingFailed(Exception):
    """The run itself went wrong (e.g. every update skipped); fsam-train exits with status 3."""


RUN_ERRORS = (TrainingFailed, CheckpointWriteFailed)
"""Failures while training, reported in one paragraph with exit status 3."""


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
    objective: Objective
    data: Data
    sam_engine: EngineStepper
    tokenizer: Any
    logger: Any
    state: TrainerState
    param_names: list[str]
    base_prefix: str
    run_dir: RunDir

    @property
    def engine(self) -> Any:
        return self.sam_engine.engine


def _batches(run: Run, epoch: int, skip_steps: int) -> Iterator[dict]:
    """The epoch's micro-batches from step `skip_steps` on, identical to those of an uninterrupted run."""
    loader = run.data.train
    set_epoch(loader, epoch)  # the shuffle depends only on seed and epoch
    if skip_steps == 0:
        return iter(loader)
    # skipping indices instead of batches avoids loading and collating what the run already trained on;
    # the skip is a whole number of batches, so the remaining batches are cut the same way
    skip = skip_steps * run.cfg.data.grad_accum * loader.batch_size
    return iter(DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=list(loader.sampler)[skip:],
                           collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                           pin_memory=loader.pin_memory, drop_last=loader.drop_last, generator=loader.generator))


def _global_losses(out: StepOutput, device: torch.device) -> tuple[float, float]:
    """The step's mean loss and mean perturbed loss over the global batch. Every rank has as many
    examples in the first pass, but ESAM's ranks keep different numbers (maybe none) for the second,
    so its mean is the sum over the examples kept on all ranks over their count."""
    kept = out.examples_kept
    perturbed_sum = out.perturbed_loss * kept if kept else 0.0  # a rank that kept none reports nan
    sums = torch.tensor([out.loss, perturbed_sum, kept], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    loss, perturbed_sum, kept = sums.tolist()
    return loss / dist.get_world_size(), perturbed_sum / kept if kept else math.nan


def log_step(run: Run, out: StepOutput, lr: float, examples: int, epoch: float) -> None:
    """Counts the step if it was lost (see `stop_if_not_training`) and logs it."""
    loss, perturbed = _global_losses(out, run.engine.device)
    lost = out.skipped or not math.isfinite(loss)  # any rank's non-finite loss makes the mean non-finite
    run.state.skipped_steps += int(lost)
    run.state.consecutive_skipped = run.state.consecutive_skipped + 1 if lost else 0
    run.state.sam_steps += int(not lost and run.cfg.sam.sam_type != "none" and out.stats.sharpness_aware)
    s = out.stats
    scalars: dict[str, Any] = {"lr": lr, "epoch": round(epoch, 4)}
    if run.cfg.sam.sam_type != "none" or math.isfinite(s.grad_norm):  # DeepSpeed may not compute it
        scalars["grad_norm"] = s.grad_norm
    if run.cfg.sam.sam_type != "none":
        scalars.update(perturbed_loss=perturbed, perturbation_norm=s.perturbation_norm, rho=s.rho,
                       mask_rebuilt=s.mask_rebuilt, sharpness_aware=s.sharpness_aware, sam_steps=run.state.sam_steps)
        if s.mask_density is not None:
            scalars["mask_density"] = s.mask_density
        if run.cfg.sam.sam_type.endswith("esam"):
            scalars["perturbed_tensors"] = s.perturbed_tensors
    scalars.update(skipped_steps=run.state.skipped_steps, loss_scale=out.loss_scale)
    run.logger.train_step(run.state.step, loss, examples, **scalars)
    if s.mask_rebuilt:  # collective
        density = mask_density_by_layer(run.sam_engine, run.param_names, run.base_prefix)
        run.logger.log_mask(run.state.step, density)


def stop_if_not_training(run: Run) -> None:
    """Stops a run that lost more than `max_consecutive_skipped` steps in a row to a non-finite loss or
    gradients (skipped by the SAM step or fp16's scaler; the baseline's fp32 step applies them and its
    weights turn non-finite): it trains nothing, and would otherwise report a success it did not have.
    Same verdict on every rank: the counts come from global checks and the all-reduced loss."""
    state, limit = run.state, run.cfg.max_consecutive_skipped
    if limit and state.consecutive_skipped > limit:
        _fail(run, f"{state.consecutive_skipped} consecutive steps (up to step {state.step}) had a non-finite "
                   f"loss or gradients, more than max_consecutive_skipped = {limit}")


def _fail(run: Run, what: str) -> None:
    cfg, state = run.cfg, run.state
    run.logger.log("failed", step=state.step, reason=what, skipped_steps=state.skipped_steps)
    raise TrainingFailed(
        f"The run in {cfg.output_dir!r} stopped: {what} ({state.skipped_steps} of {state.step} steps lost in "
        f"all; nothing was exported to final/). The usual causes: a learning rate too high for this model "
        f"(optim.lr = {cfg.optim.lr:g}), a perturbation too large (sam.rho = {cfg.sam.rho:g}), or under "
        "precision fp16 a loss scale that overflows (lower fp16.initial_scale_power in the DeepSpeed config, "
        "or use bf16). Lower the one that applies and start again; set max_consecutive_skipped=0 to never "
        "stop for skipped steps.")


def run_eval(run: Run, epoch: float) -> None:
    cfg, state, objective = run.cfg, run.state, run.objective
    results = evaluate(run.engine, run.data.dev, run.objective)
    metrics = flatten_metrics(results, objective.select_split)
    state.last_eval_step, state.last_metrics, state.eval_pending = state.step, metrics, False
    run.logger.log_eval(state.step, metrics, metric_name=objective.select_metric, epoch=round(epoch, 4))
    value = results[objective.select_split][objective.select_metric]
    if is_better(value, state.best_metric):  # identical on every rank: all of them computed it
        state.best_metric, state.best_step, state.best_metrics = value, state.step, metrics
        if cfg.eval.save_best:
            info = {"step": state.step, "epoch": round(epoch, 4), "metric_name": objective.select_metric,
                    "value": value, "metrics": metrics}
            export(run, "best", info)


def export(run: Run, name: str, info: dict) -> Path:
    """output_dir/`name`: the model, or under LoRA the adapter folder (and merged/ on request); collective."""
    cfg = run.cfg
    merged = partial(merged_model, objective=run.objective) if cfg.peft.export_merged else None
    return run.run_dir.export(name, run.engine, run.tokenizer, info, adapters=cfg.peft.frozen_base, merged=merged)


def after_step(run: Run, epoch_done: bool, epoch: float) -> None:
    """Checkpoints, then evaluates when due. The checkpoint comes first so that an evaluation (or the
    best/ export) that fails or is killed loses no training: the run resumes from this step and
    evaluates it again (`TrainerState.eval_pending`)."""
    cfg, state = run.cfg, run.state
    final = state.step >= state.total_steps
    due = bool((cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0)
               or (cfg.eval.every_epoch and epoch_done) or final)
    every = cfg.checkpoint_every
    if due or (every and state.step % every == 0):
        state.eval_pending = due
        run.run_dir.save(run.sam_engine, state, cfg.keep_checkpoints, frozen_base=cfg.peft.frozen_base)
    if due:
        with _resumable(run, "the evaluation"):
            run_eval(run, epoch)


@contextmanager
def _resumable(run: Run, what: str) -> Iterator[None]:
    """Turns a failure of `what` after a checkpoint of this step into TrainingFailed saying how to resume."""
    try:
        yield
    except (*KNOWN_ERRORS, *RUN_ERRORS):
        raise
    except Exception as err:
        if dist.get_rank() == 0:
            traceback.print_exc()
        raise TrainingFailed(
            f"{what} at step {run.state.step} failed ({type(err).__name__}: {err}). The training up to this step "
            f"is saved in {run.run_dir.step_folder(run.state.step)}: fix the cause (the "
            "traceback above), then continue with the same command and --resume=true; the resumed run evaluates "
            "this step again and goes on.") from err


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
            stop_if_not_training(run)
            after_step(run, epoch_done, epoch)


def start_evaluation(run: Run) -> None:
    """Before the first step: the pretrained model's scores (eval.at_start), or the evaluation of a resumed
    run's checkpoint that was written before its step's evaluation ran."""
    cfg, state = run.cfg, run.state
    if cfg.eval.at_start and state.step == 0 and state.last_eval_step is None:
        run_eval(run, 0.0)  # what the pretrained model scores before fine-tuning changes it
    if state.eval_pending:
        with _resumable(run, "the evaluation"):
            run_eval(run, state.epoch + state.step_in_epoch / run.data.steps_per_epoch)


def finish(run: Run, started: float) -> None:
    """The last evaluation when the last step had none, the final/ export and the run's summary."""
    cfg, state, objective = run.cfg, run.state, run.objective
    if state.last_eval_step != state.step:
        run_eval(run, state.epoch + state.step_in_epoch / run.data.steps_per_epoch)
    if cfg.max_consecutive_skipped and state.step and state.skipped_steps == state.step:
        _fail(run, f"every one of its {state.step} steps had a non-finite loss or gradients")
    with _resumable(run, "the export of final/"):
        final_dir = export(run, "final", {"step": state.step, "metrics": state.last_metrics})
    run.logger.summary(state.best_metric, objective.select_metric, best_step=state.best_step, steps=state.step,
                       best_metrics=state.best_metrics, skipped_steps=state.skipped_steps,
                       sam_type=cfg.sam.sam_type, sam_schedule=cfg.sam.schedule, sam_steps=state.sam_steps,
                       output_dir=cfg.output_dir)
    best = "none" if state.best_metric is None else f"{state.best_metric:.4f} at step {state.best_step}"
    best_dir = (f", best model in {Path(cfg.output_dir) / 'best'}"
                if cfg.eval.save_best and state.best_step is not None else "")
    run.logger.console(
        f"done: {state.step} steps ({state.skipped_steps} skipped) in {time.time() - started:.0f} s; "
        f"best dev {objective.select_metric} {best}; final model in {final_dir}{best_dir}")


def train(cfg: TrainConfig, rank: int, world: int) -> None:
    """The run: its folder held for its whole life (a second launch into it stops at once) and nothing in
    it deleted, cut or replaced until the configuration, resume point, tokenizer, data, model, DeepSpeed
    config and engine have all been checked and built (`RunDir`)."""
    started = time.time()
    _quiet_libraries(rank, cfg.log.progress)
    objective = objective_for(cfg)
    run_config = config_to_dict(cfg)  # after the objective, which records an own-data label set in cfg.data.labels
    pretrained = open_pretrained(cfg, objective.model_class())  # checked before the folder is claimed
    with RunDir.open(cfg.output_dir, cfg.resume, cfg.overwrite, run_config, rank) as run_dir:
        built = build_run(cfg, objective, pretrained, rank, world)
        order = {"world_size": world, "micro_batch_size": cfg.data.micro_batch_size,
                 "grad_accum": cfg.data.grad_accum, "seed": cfg.seed, "steps_per_epoch": built.data.steps_per_epoch}
        state, rng = run_dir.start(built.sam_engine, order, built.total_steps, frozen_base=cfg.peft.frozen_base)
        with open_run_logger(cfg, run_config, rank, total_steps=built.total_steps, start_step=state.step,
                             resumed=run_dir.point.folder is not None) as logger:
            for note in run_dir.notes:
                logger.console(note)
            run = Run(cfg, objective, built.data, built.sam_engine, built.tokenizer, logger, state,
                      built.param_names, built.base_prefix, run_dir)
            start_evaluation(run)
            train_loop(run, rng)
            finish(run, started)
