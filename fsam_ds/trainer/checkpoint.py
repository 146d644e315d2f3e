"""The trainer's checkpoints (exact resume) and exported model folders.

Layout under the run's output_dir:

    checkpoints/step<N>/   DeepSpeed checkpoint plus each rank's SAM state (SAMEngine.save_checkpoint),
                           rng_state_rank<r>.pt per rank, trainer_state.json, run_config.json (the
                           run's configuration, compared on resume) and manifest.json, written last:
                           size and sha256 of every file. A folder without a manifest was cut short
                           (a killed run) and is never resumed from; one whose files differ from it
                           is damaged and is never loaded.
    checkpoints/damaged-step<N>/   a damaged checkpoint that resume=true passed over, kept for inspection.
                           A checkpoint is written before every evaluation (and every checkpoint_every
                           steps), so a failed evaluation or export loses no training.
    replaced-run/          the earlier run an --overwrite=true run set aside, removed at that run's first
                           checkpoint and put back if it fails before (kept if it is killed).
    run.lock               the claim of the run that holds the folder (`fsam_ds.trainer.run_claim`).
    best/, final/          Hugging Face model folders (config, tokenizer, fp32 weights, manifest.json) with
                           run_config.json, the run's configuration (fsam-predict rebuilds the task from
                           it); best/ also holds best.json with the step and the dev metrics that selected it.

Non-finite floats (a dev metric that is nan) are written as in metrics.jsonl, as the strings "nan", "inf"
and "-inf", and read back as floats (`fsam_ds.trainer.metrics_log.encode_nonfinite`).

Checkpoints assume a file system that every rank sees (as DeepSpeed's do): rank 0 hashes and
verifies the whole folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.metrics_log import decode_nonfinite, encode_nonfinite
from fsam_ds.trainer.run_identity import SAFE_TO_CHANGE_ON_RESUME, run_differences
from fsam_ds.zero.files import TMP_SUFFIX, replace_file

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
MANIFEST = "manifest.json"
EXPORTS = ("best", "final")
RUN_FILES = ("metrics.jsonl", "config.json", "wandb-run-id")
"""The files a run writes at the top of output_dir, beside the folders."""
REPLACED = "replaced-run"
_REPLACED = re.compile(r"^replaced-run(\.\d+)?$")
_TAG = re.compile(r"^step(\d+)$")
# Settings that fix which examples each step sees; resuming with another value would not continue
# the same run.
DATA_ORDER_KEYS = ("world_size", "micro_batch_size", "grad_accum", "seed", "steps_per_epoch")


@dataclass
class TrainerState:
    """Where the run stands; saved as the checkpoint's client state and as trainer_state.json."""

    step: int = 0
    """Optimizer steps done (skipped overflow steps included: they consumed their batches)."""
    epoch: int = 0
    """Epoch of the next step."""
    step_in_epoch: int = 0
    """Steps of `epoch` already done; a resumed run skips that many steps' batches."""
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    total_steps: int = 0
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite gradients or loss), over the whole run."""
    consecutive_skipped: int = 0
    """Skipped steps since the last applied update."""
    sam_steps: int = 0
    """Applied updates that were sharpness-aware (all of them under sam.schedule = always)."""
    data: dict[str, int] = field(default_factory=dict)
    """The DATA_ORDER_KEYS values of the run."""
    eval_pending: bool = False
    """The checkpoint was written before this step's evaluation, which a resumed run runs first."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class CheckpointDamaged(ConfigError):
    """A checkpoint or exported model whose files differ from its manifest."""


# ------------------------------------------------------------------------------------ RNG state

def rng_state() -> dict[str, Any]:
    """Every generator the training step draws from (dropout uses torch's default generator)."""
    from deepspeed.accelerator import get_accelerator

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


# ------------------------------------------------------------------------------------ manifests

def write_manifest(folder: Path) -> None:
    """Records the size and sha256 of every file under `folder`; written last and atomically, so a
    folder with a manifest was written completely, and any later change to a file is detected."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                       and not p.name.endswith(TMP_SUFFIX)):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    _write_json(folder / MANIFEST, {"files": files})


def damage(folder: Path) -> str | None:
    """What is wrong with `folder` against its manifest (one clause naming the file), or None if intact."""
    try:
        files = _read_json(folder / MANIFEST)["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()]
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes where the manifest records {size}"
        if _sha256(path) != digest:
            return f"{name} does not match the sha256 its manifest records"
    return None


def verify_folder(folder: str | os.PathLike) -> None:
    """Raises CheckpointDamaged if a checkpoint or exported model folder differs from its manifest."""
    folder = Path(folder)
    problem = damage(folder)
    if problem is not None:
        raise CheckpointDamaged(f"{str(folder)!r} is damaged: {problem}. Its files were changed after they were "
                                "written (disk or copy error); use another copy of it.")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ checkpoints

def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoints/step<N> under `root`, complete or not, oldest first."""
    matches = [(_TAG.match(folder.name), folder) for folder in (root.iterdir() if root.is_dir() else [])]
    return sorted((int(match.group(1)), folder) for match, folder in matches if match)


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root` (its manifest written), oldest first."""
    return [(step, folder) for step, folder in _step_folders(root) if (folder / MANIFEST).is_file()]


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and the damaged newer ones it passed over (resume=true)."""

    folder: Path | None
    damaged: list[tuple[Path, str]] = field(default_factory=list)


def find_checkpoint(resume: bool | str, output_dir: str | os.PathLike) -> ResumePoint:
    """The checkpoint `--resume` names, verified against its manifest: true = the newest intact one in
    output_dir (none if there is none yet, so a resubmitted job starts fresh; damaged newer ones are
    reported in `damaged`); a path = that checkpoint, or the newest under it, which must be intact."""
    if resume is False:
        return ResumePoint(None)
    if resume is True:
        root = Path(output_dir) / CHECKPOINT_DIR
        damaged = []
        for _, folder in reversed(_complete(root)):
            problem = damage(folder)
            if problem is None:
                return ResumePoint(folder, damaged)
            damaged.append((folder, problem))
        if damaged:
            raise CheckpointDamaged(f"Cannot resume from {str(root)!r}: every checkpoint in it is damaged ("
                                    + "; ".join(f"{f.name}: {p}" for f, p in damaged) + "). Restore them from a "
                                    "copy, or start afresh with --resume=false --overwrite=true.")
        return ResumePoint(None)
    path = Path(resume)
    if (path / MANIFEST).is_file() or (path / STATE_FILE).is_file():
        folder = path
    else:
        found = [f for root in (path / CHECKPOINT_DIR, path) for _, f in _complete(root)[-1:]]
        if not found:
            raise ConfigError(f"resume = {str(resume)!r} holds no complete checkpoint: give a checkpoint folder "
                              f"(checkpoints/step<N> with {MANIFEST}), the checkpoints folder or a run's output_dir, "
                              "or resume=true to continue from the newest checkpoint in output_dir.")
        folder = found[0]
    problem = damage(folder)
    if problem is not None:
        intact = next((f for _, f in reversed(_complete(folder.parent)) if f != folder and damage(f) is None), None)
        fix = (f"Resume from the newest intact checkpoint with --resume={intact}" if intact
               else "No other intact checkpoint is next to it; restore it from a copy or start afresh")
        raise CheckpointDamaged(f"Checkpoint {str(folder)!r} is damaged: {problem}, so resuming from it would "
                                f"load corrupt state. {fix}.")
    return ResumePoint(folder)


def set_aside(folder: Path) -> Path:
    """Renames a damaged checkpoint to damaged-step<N> (kept for inspection, never pruned); rank 0 only."""
    target = folder.with_name(f"damaged-{folder.name}")
    suffix = 1
    while target.exists():
        target, suffix = folder.with_name(f"damaged-{folder.name}.{suffix}"), suffix + 1
    os.replace(folder, target)
    return target


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint or exported model could not be written (a full disk, a file-size limit)."""


def _failed_anywhere(error: BaseException | None) -> bool:
    """Collective: whether any rank's write failed, so that every rank stops at the same point."""
    flag = torch.tensor([float(error is not None)])
    dist.all_reduce(flag)
    return bool(flag.item())


def _write_failed(what: Path, error: BaseException | None, kept: str) -> CheckpointWriteFailed:
    cause = (f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error is not None
             else "another rank's write failed")
    return CheckpointWriteFailed(
        f"Could not write {str(what)!r} ({cause}): the disk may be full or a file-size limit reached. The partly "
        f"written folder was removed; {kept} Free space (or raise the limit), then continue with the same command "
        "and --resume=true.")


def save_checkpoint(sam_engine: Any, output_dir: str | os.PathLike, state: TrainerState, keep: int,
                    run_config: dict[str, Any], frozen_base: bool = False) -> Path:
    """Collective: every rank writes its shard and RNG state; rank 0 writes the trainer state, the run's
    configuration and, last, the manifest that marks the checkpoint complete, then prunes. `frozen_base`
    (LoRA): the frozen weights are left out, since the resumed run loads them from its model again.

    A write that fails on any rank (a full disk, a file-size limit) stops every rank with
    CheckpointWriteFailed: the folder, which has no manifest and would never be resumed from, is removed,
    and the message names the newest complete checkpoint. A rank that fails inside DeepSpeed's save while
    another waits in one of its collectives cannot be told apart from a slow rank; on a shared file system
    a full disk fails every rank's write."""
    root = Path(output_dir) / CHECKPOINT_DIR
    tag = f"step{state.step}"
    folder = root / tag
    rank = dist.get_rank()
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / MANIFEST).unlink(missing_ok=True)  # an older attempt at this step is not complete
    dist.barrier()
    error: BaseException | None = None
    try:
        torch.save(rng_state(), folder / f"rng_state_rank{rank}.pt")
        sam_engine.save_checkpoint(root, tag=tag, client_state={"trainer": asdict(state)},
                                   exclude_frozen_parameters=frozen_base)
    except (OSError, RuntimeError) as err:  # torch.save reports a short write as a RuntimeError
        error = err
    failed = _failed_anywhere(error)  # also: every rank's files are on disk before the folder is marked complete
    if rank == 0 and not failed:
        try:
            _write_json(folder / STATE_FILE, asdict(state))
            _write_json(folder / RUN_CONFIG_FILE, run_config)
            write_manifest(folder)
        except OSError as err:
            error = err
    if _failed_anywhere(error if rank == 0 else None) or failed:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        newest = _complete(root)
        kept = (f"the newest complete checkpoint is {newest[-1][1]}." if newest else
                "no earlier checkpoint exists, so a relaunch starts from the beginning.")
        raise _write_failed(folder, error, kept)
    if rank == 0:
        _prune(root, keep)
    dist.barrier()
    return folder


def _prune(root: Path, keep: int) -> None:
    """Removes all but the `keep` newest complete checkpoints, and the leftovers of saves cut short."""
    kept = {folder for _, folder in _complete(root)[-keep:]}
    for _, folder in _step_folders(root):
        if folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def check_same_run(folder: Path, run_config: dict[str, Any]) -> None:
    """Raises ConfigError listing every run-defining setting (see `fsam_ds.trainer.run_identity`) that
    this run sets differently from the checkpoint's run; the other settings are applied on resume."""
    differences = run_differences(_read_json(folder / RUN_CONFIG_FILE), run_config)
    if differences:
        raise ConfigError(f"Cannot resume from {str(folder)!r}: this command changes settings that define the run "
                          f"({'; '.join(differences)}). A resumed run must continue the same run, so these are "
                          "never applied midway. Resume with the checkpoint's values (its "
                          f"{RUN_CONFIG_FILE}), or start a new run in another output_dir. Settings that may change "
                          f"on resume: {', '.join(SAFE_TO_CHANGE_ON_RESUME)} (a trailing dot: the whole section).")


def load_checkpoint(sam_engine: Any, folder: Path, expected: dict[str, int], total_steps: int,
                    frozen_base: bool = False) -> tuple[TrainerState, dict[str, Any]]:
    """Restores engine and SAM state; returns the trainer state and this rank's RNG state (to be set
    right before training continues). Every check runs before the first collective, on every rank.
    `frozen_base`: the checkpoint lacks the frozen weights (`save_checkpoint`), which the model has."""
    state = TrainerState.from_dict(_read_json(folder / STATE_FILE))
    changed = [f"{key} {state.data.get(key)} -> {expected[key]}" for key in DATA_ORDER_KEYS
               if state.data.get(key) != expected[key]]
    if changed:
        raise ConfigError(f"Cannot resume from {str(folder)!r}: {', '.join(changed)}. These settings decide "
                          "which examples each step sees (and how ZeRO shards the state), so the resumed run "
                          "would not continue the same run. Resume with the checkpoint's values (see its "
                          f"{STATE_FILE}).")
    rng_file = folder / f"rng_state_rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"Checkpoint {str(folder)!r} has no {rng_file.name}; it was written by another number "
                          "of ranks. Resume with the checkpoint's world size.")
    sam_engine.load_checkpoint(folder.parent, tag=folder.name, load_module_strict=not frozen_base)
    if state.total_steps != total_steps:
        if dist.get_rank() == 0:
            print(f"warning: the checkpoint was written by a run of {state.total_steps} steps, this one has "
                  f"{total_steps}; the learning-rate schedule changes from step {state.step} on.", flush=True)
        state.total_steps = total_steps
    return state, torch.load(rng_file, weights_only=False)


def discard_after(output_dir: str | os.PathLike, step: int) -> None:
    """Removes the checkpoints of steps after `step` (a run resumed from an older checkpoint replaces
    that future); rank 0 only."""
    for n, folder in _step_folders(Path(output_dir) / CHECKPOINT_DIR):
        if n > step:
            shutil.rmtree(folder, ignore_errors=True)


def _run_held(out: Path) -> list[str]:
    """What out holds of a run: its complete checkpoints and its final model (a best/ alone is what a run
    killed before its first checkpoint leaves)."""
    held = [f"checkpoints up to step {found[-1][0]}" for found in [_complete(out / CHECKPOINT_DIR)] if found]
    return held + (["final/"] if (out / "final").is_dir() else [])


def replaced_runs(output_dir: str | os.PathLike) -> list[Path]:
    """The runs `set_aside_earlier_run` moved into replaced-run*/ whose replacement never checkpointed."""
    out = Path(output_dir)
    return sorted(p for p in (out.iterdir() if out.is_dir() else []) if p.is_dir() and _REPLACED.match(p.name))


def earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """What output_dir holds of another run that a fresh run must not replace unasked: its complete
    checkpoints, its final model, and an earlier run set aside by an --overwrite=true run that never
    reached its first checkpoint. Empty for a new folder."""
    out = Path(output_dir)
    return _run_held(out) + [f"{folder.name}/, a run set aside by an --overwrite=true run that was stopped before "
                             "its first checkpoint (move its files back into output_dir to keep it)"
                             for folder in replaced_runs(out)]


def clear_earlier_run(output_dir: str | os.PathLike) -> None:
    """Removes what a run writes (its checkpoints, exported models, metrics.jsonl, config.json) when a run
    starts afresh; rank 0 only, after the whole new run has been checked and built, and after an earlier
    run worth keeping was set aside (`set_aside_earlier_run`)."""
    out = Path(output_dir)
    for name in (CHECKPOINT_DIR, *EXPORTS):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in RUN_FILES:  # wandb-run-id among them: the new run is a new wandb run
        (out / name).unlink(missing_ok=True)


def set_aside_earlier_run(output_dir: str | os.PathLike) -> Path | None:
    """--overwrite=true: moves the earlier run in output_dir (if it holds one) into replaced-run/
    (replaced-run.1, ... if taken), where it stays until the new run's first checkpoint is on disk
    (`drop_replaced_runs`) or the new run fails and puts it back (`put_back`); rank 0 only."""
    out = Path(output_dir)
    if not _run_held(out):
        return None
    target, suffix = out / REPLACED, 1
    while target.exists():
        target, suffix = out / f"{REPLACED}.{suffix}", suffix + 1
    target.mkdir()
    for name in (CHECKPOINT_DIR, *EXPORTS, *RUN_FILES):
        if (out / name).exists():
            os.replace(out / name, target / name)
    return target


def put_back(output_dir: str | os.PathLike, aside: Path) -> None:
    """Undoes `set_aside_earlier_run` for a new run that failed before its first checkpoint: the new run's
    files go, the earlier run's come back; rank 0 only."""
    clear_earlier_run(output_dir)
    for item in aside.iterdir():
        os.replace(item, Path(output_dir) / item.name)
    aside.rmdir()


def drop_replaced_runs(output_dir: str | os.PathLike) -> None:
    """Removes the runs an --overwrite=true run set aside, once its own first checkpoint is on disk; rank 0 only."""
    for folder in replaced_runs(output_dir):
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------ helpers

def _write_json(path: Path, data: dict) -> None:
    replace_file(path, json.dumps(encode_nonfinite(data), indent=2, allow_nan=False) + "\n")


def _read_json(path: Path) -> dict:
    return decode_nonfinite(json.loads(path.read_text(encoding="utf-8")))
