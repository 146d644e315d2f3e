"""The training run, top to bottom: build (`fsam_ds.trainer.build`), resume, loop over steps
(`SAMEngine.train_step` or the AdamW baseline's), evaluate, checkpoint, export.

Writes into output_dir: metrics.jsonl and config.json (every step, evaluation, mask and the final
summary), checkpoints/step<N>/ (exact resume), best/ and final/ (Hugging Face model folders); see
`fsam_ds.trainer.checkpoint`. Known input errors are raised as the exceptions in `KNOWN_ERRORS`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
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

from fsam_ds.trainer.activation_checkpointing import enable_activation_checkpointing
from fsam_ds.trainer.build import (Data, TrainError, build_data, build_engine, check_positions, hub_error, load_model,
                                   load_tokenizer, resolve_config)
from fsam_ds.trainer.checkpoint import (CHECKPOINT_DIR, CheckpointWriteFailed, ResumePoint, TrainerState,
                                        check_same_run, clear_earlier_run, discard_after, drop_replaced_runs,
                                        earlier_run, find_checkpoint, load_checkpoint, put_back,
                                        replaced_runs, save_checkpoint, set_aside, set_aside_earlier_run,
                                        set_rng_state)
from fsam_ds.trainer.export import export_model
from fsam_ds.trainer.metrics_log import open_run_logger, trim_metrics
from fsam_ds.sam.config import ConfigError
from fsam_ds.sam.driver import StepOutput
from fsam_ds.trainer.data import DataError, set_epoch
from fsam_ds.trainer.evaluate import evaluate, flatten_metrics, is_better, mask_density_by_layer
from fsam_ds.trainer.objectives import Objective, objective_for
from fsam_ds.trainer.peft_model import WRAPPED_PREFIX, merged_model, wrap_with_peft
from fsam_ds.trainer.run_config import TrainConfig, config_to_dict
from fsam_ds.trainer.run_claim import claim_output_dir
from fsam_ds.trainer.run_identity import run_differences
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
    replacing: bool = False
    """An earlier run that --overwrite=true set aside waits for this run's first checkpoint to be removed."""

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
    return export_model(run.engine, run.tokenizer, Path(cfg.output_dir) / name, info, config_to_dict(cfg),
                        adapters=cfg.peft.frozen_base, merged=merged)


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
        save_checkpoint(run.sam_engine, cfg.output_dir, state, cfg.keep_checkpoints, config_to_dict(cfg),
                        frozen_base=cfg.peft.frozen_base)
        if run.replacing:
            if dist.get_rank() == 0:
                drop_replaced_runs(cfg.output_dir)  # the new run can now be resumed: the old one may go
            run.replacing = False
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
            f"is saved in {Path(run.cfg.output_dir) / CHECKPOINT_DIR / f'step{run.state.step}'}: fix the cause (the "
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


def finish(run: Run, started: float) -> None:
    cfg, state, objective = run.cfg, run.state, run.objective
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


def _resume_point(cfg: TrainConfig, rank: int) -> ResumePoint:
    """Rank 0 decides (the ranks' file views may differ) and every rank gets the answer or the error.
    Nothing is written: this runs before the run is built and checked."""
    answer: list[Any] = [None]
    if rank == 0:
        try:
            point = find_checkpoint(cfg.resume, cfg.output_dir)
            if point.folder is None and not cfg.overwrite:
                _refuse_earlier_run(cfg)
            answer = [point]
        except ConfigError as err:
            answer = [err]
    dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], ConfigError):
        raise answer[0]
    return answer[0]


def _refuse_earlier_run(cfg: TrainConfig) -> None:
    held = earlier_run(cfg.output_dir)
    if not held:
        return
    config_file = Path(cfg.output_dir) / "config.json"
    differences = []
    if config_file.is_file():
        try:
            differences = run_differences(json.loads(config_file.read_text(encoding="utf-8")), config_to_dict(cfg))
        except (ValueError, AttributeError):
            differences = ["its config.json is unreadable"]
    differ = f" Its settings differ from this run's: {'; '.join(differences)}." if differences else ""
    raise ConfigError(f"output_dir = {cfg.output_dir!r} holds another run ({', '.join(held)}) and this run starts "
                      f"afresh (resume = {cfg.resume}), which would replace it.{differ} Pass --resume=true to "
                      "continue that run, --overwrite=true to replace it, or another --output_dir (the default "
                      "one, runs/{task}-{sam_type}-s{seed}-{config_hash}, differs for every setting that can "
                      "change the result).")


def train(cfg: TrainConfig, rank: int, world: int) -> None:
    """The run, holding output_dir for its whole life (`fsam_ds.trainer.run_claim`): a second launch into
    the same folder stops at once instead of interleaving its files with this run's."""
    with claim_output_dir(cfg.output_dir, rank):
        _train(cfg, rank, world)


def _train(cfg: TrainConfig, rank: int, world: int) -> None:
    """Nothing in output_dir is deleted, cut or replaced until the configuration, resume point,
    tokenizer, data, model, DeepSpeed config and engine have all been checked and built; an earlier run
    that --overwrite=true replaces is set aside until this run's first checkpoint is on disk."""
    from transformers import AutoConfig, set_seed

    started = time.time()
    objective = objective_for(cfg)
    point = _resume_point(cfg, rank)
    if point.folder is not None:
        check_same_run(point.folder, config_to_dict(cfg))
    _quiet_libraries(rank, cfg.log.progress)
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

    order = {"world_size": world, "micro_batch_size": cfg.data.micro_batch_size,
             "grad_accum": cfg.data.grad_accum, "seed": cfg.seed, "steps_per_epoch": data.steps_per_epoch}
    state, rng = TrainerState(total_steps=total, data=order), None
    checkpoint = point.folder
    if checkpoint is not None:
        state, rng = load_checkpoint(sam_engine, checkpoint, order, total, frozen_base=cfg.peft.frozen_base)
    replaced = None
    if rank == 0:  # everything is checked: from here on the run may change what output_dir holds
        for folder, problem in point.damaged:
            print(f"warning: checkpoint {folder} is damaged ({problem}); resuming from the newest intact one, "
                  f"{checkpoint}. The damaged one is kept as {set_aside(folder)}.", file=sys.stderr, flush=True)
        if checkpoint is None:
            replaced = set_aside_earlier_run(cfg.output_dir)  # --overwrite=true: kept until the first checkpoint
            clear_earlier_run(cfg.output_dir)  # what is left: leftovers of a killed attempt
        else:
            discard_after(cfg.output_dir, state.step)
            trim_metrics(Path(cfg.output_dir) / "metrics.jsonl", state.step, keep_eval=not state.eval_pending)
    # runs set aside earlier (by this run, or by an --overwrite=true run killed before its first checkpoint)
    # go once this run has a checkpoint; a fresh run gets here with them only under --overwrite=true
    replacing = [rank == 0 and checkpoint is None and bool(replaced_runs(cfg.output_dir))]
    dist.broadcast_object_list(replacing, src=0)  # every rank keeps step with rank 0's collectives
    run = None
    try:
        with open_run_logger(cfg, rank, total_steps=total, start_step=state.step,
                             resumed=checkpoint is not None) as logger:
            if checkpoint is not None:
                logger.console(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch})")
            if replaced is not None:
                logger.console(f"the earlier run in {cfg.output_dir} is set aside in {replaced} until this run's "
                               "first checkpoint")
            run = Run(cfg, objective, data, sam_engine, tokenizer, logger, state, names,
                      getattr(model, "base_model_prefix", ""), replacing[0])
            if cfg.eval.at_start and state.step == 0 and state.last_eval_step is None:
                run_eval(run, 0.0)  # what the pretrained model scores before fine-tuning changes it
            if state.eval_pending:  # the checkpoint was written before its step's evaluation
                with _resumable(run, "the evaluation"):
                    run_eval(run, state.epoch + state.step_in_epoch / data.steps_per_epoch)
            train_loop(run, rng)
            if state.last_eval_step != state.step:
                run_eval(run, state.epoch + state.step_in_epoch / data.steps_per_epoch)
            finish(run, started)
    except BaseException:
        if replaced is not None and (run is None or run.replacing):
            put_back(cfg.output_dir, replaced)
            print(f"fsam-train: this run stopped before its first checkpoint, so the earlier run it was replacing "
                  f"(--overwrite=true) is back in {cfg.output_dir}.", file=sys.stderr, flush=True)
        raise
