"""The SAM family on a DeepSpeed engine: `fsam_ds.initialize` mirrors `deepspeed.initialize`.

    sam_engine = fsam_ds.initialize(model=model, config="ds_configs/zero2_bf16.json",
                                    optimizer=torch.optim.AdamW(model.parameters(), lr=2e-5),
                                    sam=SAMConfig(sam_type="fisher-sam", rho=0.05))
    out = sam_engine.train_step(micro_batches, per_example_loss)   # both passes, one optimizer step
    sam_engine.engine.eval(); sam_engine.save_checkpoint("ckpt")

`per_example_loss(module, batch)` runs the forward through `module` (the engine) and returns the
per-example losses. DeepSpeed's optimizer is neither subclassed nor patched: the step drives the
public engine calls (backward, set_gradient_accumulation_boundary, step) and reads the rank's
shards through `fsam_ds.zero.adapters`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fsam_ds.sam.config import SAMConfig
from fsam_ds.zero.ds_config import check_sam_compatible
from fsam_ds.zero.distributed import release_shm_buffer
from fsam_ds.sam.core import SharpnessAware, StepStats
from fsam_ds.sam.optim import check_per_example, index_batch
from fsam_ds.sam.shards import TorchComm
from fsam_ds.zero.adapters import shards_for_engine

EngineLoss = Callable[[Any, Any], Tensor]


@dataclass
class EngineStepOutput:
    loss: float
    """Mean first-pass loss on this rank's examples."""
    perturbed_loss: float
    """Second-pass loss on this rank (mean over the examples it kept)."""
    stats: StepStats
    skipped: bool
    """Nothing was updated: a pass overflowed (fp16) or had a non-finite gradient."""
    loss_scale: float


def allow_fp16_on_cpu() -> None:
    """Lets DeepSpeed's CPU accelerator run fp16, which it refuses on CPUs without fp16 arithmetic.
    Tests use this to exercise loss scaling on CPU; never needed on a GPU."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def _load_config(config: dict | str | os.PathLike) -> dict:
    if isinstance(config, dict):
        return config
    with open(config) as f:
        return json.load(f)


def initialize(model: torch.nn.Module, config: dict | str | os.PathLike, sam: SAMConfig,
               optimizer: Any = None, lr_scheduler: Any = None, model_parameters: Any = None,
               **kwargs: Any) -> "SAMEngine":
    """`deepspeed.initialize` plus the sharpness-aware configuration; returns a `SAMEngine`."""
    import deepspeed

    config = _load_config(config)
    check_sam_compatible(config)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to optimize")
    if model_parameters is None and optimizer is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, config=config, optimizer=optimizer,
                                           lr_scheduler=lr_scheduler, model_parameters=model_parameters, **kwargs)
    release_shm_buffer()  # deepspeed.initialize may have created the process group itself
    return SAMEngine(engine, sam)


class SAMEngine:
    """Runs SAM-family training steps on a DeepSpeed engine (`.engine`)."""

    def __init__(self, engine, config: SAMConfig) -> None:
        self.engine = engine
        self.config = config
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        params = [p for _, p in named]
        self.data_comm = TorchComm(getattr(engine, "data_parallel_group", None))
        self.shards = shards_for_engine(engine, names, params, [config.is_candidate(n) for n in names],
                                        self.data_comm)
        self.core = SharpnessAware(config, self.shards.pieces, len(params), self._lr(initial=True))
        self.skipped_steps = 0

    def _lr(self, initial: bool = False) -> float:
        group = self.engine.optimizer.param_groups[0]
        if initial:
            return float(group.get("initial_lr", group["lr"]))
        return float(group["lr"])

    def _zero_grads(self) -> None:
        # ZeRO-3 needs the optimizer's zero_grad (it resets the partition copy logic); the stage 1/2
        # fragments of bf16 with fp32 accumulation are only cleared in step(), so clear them here.
        self.engine.optimizer.zero_grad()
        if hasattr(self.shards, "zero_grads"):
            self.shards.zero_grads()

    def train_step(self, micro_batches: Sequence[Any], loss_fn: EngineLoss) -> EngineStepOutput:
        """One full step: both passes over all `micro_batches` (gradient accumulation), one update.

        Args:
            micro_batches: this rank's micro-batches for the step (as many as the engine's
                gradient_accumulation_steps).
            loss_fn: `loss_fn(engine, batch)` -> per-example losses (a 1-D tensor).
        """
        engine, cfg = self.engine, self.config
        gas = engine.gradient_accumulation_steps()
        if len(micro_batches) != gas:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches but the DeepSpeed config has "
                             f"gradient_accumulation_steps = {gas}; pass exactly that many.")
        engine.train()
        before: list[Tensor] = []
        for i, batch in enumerate(micro_batches):
            engine.set_gradient_accumulation_boundary(i == gas - 1)
            losses = check_per_example(loss_fn(engine, batch))
            before.append(losses.detach())
            engine.backward(losses.mean())
        first_loss = float(torch.cat(before).float().mean())

        stats = self.core.first_pass(self.shards, self._lr())
        if not stats.finite:
            return self._skip(first_loss, float("nan"), stats)
        self._zero_grads()

        keep: list[Tensor] | None = None
        if cfg.uses_esam and cfg.gamma < 1:
            with torch.no_grad():
                after = [check_per_example(loss_fn(engine, b), l.numel()) for b, l in zip(micro_batches, before)]
            kept, total_kept = self.core.select_examples(torch.cat(before), torch.cat(after), self.data_comm)
            keep = list(kept.split([l.numel() for l in before]))

        second_losses = []
        for i, batch in enumerate(micro_batches):
            engine.set_gradient_accumulation_boundary(i == gas - 1)
            if keep is None:
                loss = check_per_example(loss_fn(engine, batch)).mean()
                second_losses.append(float(loss.detach()))
            else:
                rows = keep[i].nonzero().squeeze(1)
                # each rank's loss is scaled so that DeepSpeed's mean over ranks and micro-batches is
                # the mean over the examples kept in the whole global batch
                weight = self.data_comm.world_size * gas / total_kept
                if rows.numel() == 0:  # still run forward/backward: ZeRO's collectives must match
                    loss = check_per_example(loss_fn(engine, index_batch(batch, torch.tensor([0])))).sum() * 0.0
                else:
                    per = check_per_example(loss_fn(engine, index_batch(batch, rows)), rows.numel())
                    second_losses.append(float(per.detach().mean()))
                    loss = per.sum() * weight
            engine.backward(loss)
        second_loss = sum(second_losses) / max(1, len(second_losses))

        finite = self.core.second_pass(self.shards)
        self.shards.remove_perturbation()
        if not finite and not engine.fp16_enabled():
            return self._skip(first_loss, second_loss, stats, perturbed=True)
        skipped_before = engine.skipped_steps
        engine.step()
        if engine.skipped_steps != skipped_before or not finite:
            # DeepSpeed's loss scaler saw the overflow and backed off; the master was not applied
            return self._skip(first_loss, second_loss, stats, perturbed=True, stepped=True)
        self.core.end_step()
        return EngineStepOutput(first_loss, second_loss, stats, False, self.shards.loss_scale())

    def _skip(self, first_loss: float, second_loss: float, stats: StepStats, perturbed: bool = False,
              stepped: bool = False) -> EngineStepOutput:
        """Leaves every parameter as it was before the step and lets fp16's scaler back off."""
        if perturbed:
            self.shards.restore_from_master()
        if not stepped and self.engine.fp16_enabled():
            # the non-finite gradient is still in place: DeepSpeed's step detects it, skips the update
            # and reduces the loss scale
            self.engine.step()
        self._zero_grads()
        self.core.discard_step()
        self.skipped_steps += 1
        return EngineStepOutput(first_loss, second_loss, stats, True, self.shards.loss_scale())

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | None = None,
                        client_state: dict | None = None) -> str:
        """DeepSpeed's checkpoint plus each rank's SAM state (mask shard, counters, ESAM generator)."""
        tag = tag or f"global_step{self.engine.global_steps}"
        self.engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state or {})
        path = Path(save_dir) / tag / f"fsam_state_rank{self.data_comm.rank}.pt"
        torch.save({"core": self.core.state_dict(), "skipped_steps": self.skipped_steps}, path)
        torch.distributed.barrier()
        return tag

    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | None = None) -> dict:
        """Restores the DeepSpeed checkpoint and the SAM state; returns the client state."""
        if tag is None:
            latest = Path(load_dir) / "latest"
            if not latest.exists():
                raise FileNotFoundError(f"no checkpoint tag given and {latest} does not exist")
            tag = latest.read_text().strip()
        _, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag)
        path = Path(load_dir) / tag / f"fsam_state_rank{self.data_comm.rank}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by SAMEngine.save_checkpoint "
                                    "or was written with a different number of ranks")
        state = torch.load(path, weights_only=False)
        self.core.load_state_dict(state["core"])
        self.skipped_steps = int(state["skipped_steps"])
        return client_state or {}
