"""The trainer's checkpoints (exact resume) and exported model folders.

Layout under the run's output_dir:

    checkpoints/step<N>/   DeepSpeed checkpoint plus each rank's SAM state (SAMEngine.save_checkpoint),
                           rng_state_rank<r>.pt per rank, and trainer_state.json, written last: a
                           folder without it was cut short (a killed run) and is never resumed from.
    best/, final/          Hugging Face model folders (config, tokenizer, fp32 weights); best/ also
                           holds best.json with the step and the dev metrics that selected it.
"""

from __future__ import annotations

import json
import math
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

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
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
    data: dict[str, int] = field(default_factory=dict)
    """The DATA_ORDER_KEYS values of the run."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


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


# ------------------------------------------------------------------------------------ checkpoints

def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _TAG.match(folder.name)
        if match and (folder / STATE_FILE).is_file():
            found.append((int(match.group(1)), folder))
    return sorted(found)


def find_checkpoint(resume: bool | str, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder `--resume` names: true = the newest in output_dir (None if there is none
    yet, so a resubmitted job starts fresh); a path = that checkpoint, or the newest under it."""
    if resume is False:
        return None
    if resume is True:
        found = _complete(Path(output_dir) / CHECKPOINT_DIR)
        return found[-1][1] if found else None
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path / CHECKPOINT_DIR, path):
        found = _complete(root)
        if found:
            return found[-1][1]
    raise ConfigError(f"resume = {str(resume)!r} holds no complete checkpoint: give a checkpoint folder "
                      f"(checkpoints/step<N> with {STATE_FILE}), the checkpoints folder or a run's output_dir, "
                      "or resume=true to continue from the newest checkpoint in output_dir.")


def save_checkpoint(sam_engine: Any, output_dir: str | os.PathLike, state: TrainerState, keep: int) -> Path:
    """Collective: every rank writes its shard and RNG state; rank 0 marks it complete, then prunes."""
    root = Path(output_dir) / CHECKPOINT_DIR
    tag = f"step{state.step}"
    folder = root / tag
    rank = dist.get_rank()
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / STATE_FILE).unlink(missing_ok=True)  # an older attempt at this step is not complete
    torch.save(rng_state(), folder / f"rng_state_rank{rank}.pt")
    sam_engine.save_checkpoint(root, tag=tag, client_state={"trainer": asdict(state)})
    dist.barrier()  # every rank's files are on disk before the folder is marked complete
    if rank == 0:
        _write_json(folder / STATE_FILE, asdict(state))
        _prune(root, keep)
    dist.barrier()
    return folder


def _prune(root: Path, keep: int) -> None:
    complete = _complete(root)
    for _, folder in complete[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    kept = {folder for _, folder in complete[-keep:]}
    for folder in root.iterdir():  # leftovers of a save that was cut short
        if _TAG.match(folder.name) and folder.is_dir() and folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(sam_engine: Any, folder: Path, expected: dict[str, int],
                    total_steps: int) -> tuple[TrainerState, dict[str, Any]]:
    """Restores engine and SAM state; returns the trainer state and this rank's RNG state (to be set
    right before training continues). Every check runs before the first collective, on every rank."""
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
        raise ConfigError(f"Checkpoint {str(folder)!r} has no {rng_file.name}; it is damaged. Resume from "
                          "an older checkpoint (resume=<path of checkpoints/step<N>>).")
    sam_engine.load_checkpoint(folder.parent, tag=folder.name)
    if state.total_steps != total_steps:
        if dist.get_rank() == 0:
            print(f"warning: the checkpoint was written by a run of {state.total_steps} steps, this one has "
                  f"{total_steps}; the learning-rate schedule changes from step {state.step} on.", flush=True)
        state.total_steps = total_steps
    return state, torch.load(rng_file, weights_only=False)


def discard_after(output_dir: str | os.PathLike, step: int) -> list[int]:
    """Removes the checkpoints of steps after `step` (a run started afresh, or resumed from an older
    checkpoint, replaces that future) and returns their steps; rank 0 only."""
    root = Path(output_dir) / CHECKPOINT_DIR
    removed = []
    for folder in root.iterdir() if root.is_dir() else []:
        match = _TAG.match(folder.name)
        if match and int(match.group(1)) > step:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(int(match.group(1)))
    return sorted(removed)


# --------------------------------------------------------------------------------- model export

def full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The model's weights in fp32 on the CPU: from DeepSpeed's fp32 master where there is one
    (ZeRO 1-3; in bf16 runs that is more precise than the module), else from the module.
    Collective under ZeRO 1-3: every rank must call it."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage = engine.zero_optimization_stage()
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p) if stage > 0 and p.requires_grad else None
        if master is None and stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                master = p.detach().clone()
        value = master if master is not None else p.detach()
        out[name] = value.float().cpu().clone()
    for name, buffer in engine.module.state_dict().items():
        if name not in out and buffer.numel() > 0:  # persistent buffers (e.g. position ids)
            out[name] = buffer.cpu().clone()
    return out


def export_model(engine: Any, tokenizer: Any, folder: str | os.PathLike, info: dict | None = None) -> Path:
    """Writes a Hugging Face model folder (loadable with from_pretrained); collective."""
    folder = Path(folder)
    state_dict = full_state_dict(engine)
    if dist.get_rank() == 0:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        engine.module.save_pretrained(tmp, state_dict=state_dict)
        # save_pretrained records the module's (bf16/fp16) dtype; the weights written are fp32
        config = _read_json(tmp / "config.json")
        if "dtype" in config:
            config["dtype"] = "float32"
            _write_json(tmp / "config.json", config)
        tokenizer.save_pretrained(tmp)
        if info is not None:
            _write_json(tmp / f"{folder.name}.json", info)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    dist.barrier()
    return folder


# ------------------------------------------------------------------------------------ helpers

def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _finite(value: Any) -> Any:
    """JSON has no nan/inf; they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
