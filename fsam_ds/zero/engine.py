"""The SAM family on a DeepSpeed engine: `fsam_ds.initialize` mirrors `deepspeed.initialize`.

    sam_engine = fsam_ds.initialize(model=model, config="ds_configs/zero2_bf16.json",
                                    optimizer=torch.optim.AdamW(model.parameters(), lr=2e-5),
                                    sam=SAMConfig(sam_type="fisher-sam", rho=0.05))
    out = sam_engine.train_step(micro_batches, per_example_loss)   # both passes, one optimizer step
    sam_engine.engine.eval(); sam_engine.save_checkpoint("ckpt")

`per_example_loss(module, batch)` runs the forward through `module` (the engine) and returns the
per-example losses. DeepSpeed's optimizer is neither subclassed nor patched: the step drives the
public engine calls (backward, set_gradient_accumulation_boundary, step) and reads the rank's
shards through `fsam_ds.zero.adapters`; the step itself is `fsam_ds.sam.driver.two_pass_step`, the
same as plain PyTorch's. `observer=` (a `StepObserver`, settable as `.observer`) times its phases.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import Tensor

from fsam_ds.sam.candidates import fisher_candidates
from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.sam.core import SharpnessAware, StepStats
from fsam_ds.sam.driver import (NULL_OBSERVER, ObservedThroughCore, StepObserver, StepOutput, TrainStepper,
                                check_per_example, two_pass_step)
from fsam_ds.sam.shards import TorchComm, require_first_moment
from fsam_ds.zero.adapters import EngineShards, UnsupportedConfiguration, shards_for_engine
from fsam_ds.zero.distributed import release_shm_buffer
from fsam_ds.zero.ds_config import check_sam_compatible
from fsam_ds.zero.files import WrittenFiles, save_atomically

EngineLoss = Callable[[Any, Any], Tensor]


class EngineStepper(TrainStepper, Protocol):
    """A `TrainStepper` on a DeepSpeed engine (`SAMEngine`, `PlainEngine`): what the trainer drives."""

    engine: Any

    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | None = None,
                        client_state: dict | None = None, exclude_frozen_parameters: bool = False,
                        written: WrittenFiles | None = None) -> str: ...

    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | None = None,
                        load_module_strict: bool = True) -> dict: ...

    def mask_counts(self) -> Tensor | None:
        """Collective: per parameter, [entries the Fisher mask keeps, Fisher-candidate entries], summed over
        the ranks; None for a step without a Fisher mask."""


def allow_fp16_on_cpu() -> None:
    """Lets DeepSpeed's CPU accelerator run fp16, which it refuses on CPUs without fp16 arithmetic.
    Tests use this to exercise loss scaling on CPU; never needed on a GPU."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def zero_init(config: dict | str | os.PathLike) -> Any:
    """`deepspeed.zero.Init(config_dict_or_path=config)`, to build a model partitioned from birth for ZeRO-3.

    torch._dynamo is imported first: inside zero.Init, torch.Tensor.__new__ is DeepSpeed's, and dynamo's
    first import (transformers' `from_config` triggers it) checks its polyfill of that method against it
    and raises "Signature mismatch". Imported before, dynamo keeps torch's own."""
    import deepspeed
    import torch._dynamo  # noqa: F401

    return deepspeed.zero.Init(config_dict_or_path=config)


def cast_added_parameters(model: torch.nn.Module) -> list[str]:
    """Casts the floating-point parameters that a model built under `zero.Init` gained afterwards (peft's
    adapters and the copies of the modules it saves; a layer added by hand) to the dtype of its partitioned
    ones, and returns their names; a model with no partitioned parameter is left as it is.

    DeepSpeed (0.19.2 and later) casts every parameter to the run's bf16 or fp16 at `initialize` unless
    some are partitioned already; then it casts none, taking all as zero.Init made them. peft keeps LoRA
    adapters in fp32 over a bf16 base, so the trainable tensors come in two dtypes, which the ZeRO-3
    optimizer refuses (an AssertionError in `defragment`). Cast here, they are what DeepSpeed makes of them
    on a model built without zero.Init: the run's dtype in the module, an fp32 master in the optimizer;
    the same start, bit for bit, as at ZeRO 0-2."""
    partitioned = {p.dtype for p in model.parameters() if hasattr(p, "ds_id")}
    if len(partitioned) != 1:
        return []
    (dtype,) = partitioned
    cast = []
    for name, p in model.named_parameters():
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            cast.append(name)
    return cast


def initialize(model: torch.nn.Module, config: dict | str | os.PathLike, sam: SAMConfig,
               optimizer: Any = None, lr_scheduler: Any = None, model_parameters: Any = None,
               observer: StepObserver | None = None, planned_steps: int | None = None, **kwargs: Any) -> "SAMEngine":
    """`deepspeed.initialize` plus the sharpness-aware configuration; returns a `SAMEngine`.
    `planned_steps`: the run's planned optimizer steps (the schedule `late:f` needs them)."""
    config = config if isinstance(config, dict) else json.loads(Path(config).read_text())
    check_sam_compatible(config)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to optimize")
    if model_parameters is None and optimizer is None:
        model_parameters = [p for p in model.parameters() if p.requires_grad]
    engine = _deepspeed_initialize(model=model, config=config, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                   model_parameters=model_parameters, **kwargs)
    return SAMEngine(engine, sam, observer, planned_steps)


def initialize_plain(model: torch.nn.Module, config: dict | str | os.PathLike, optimizer: Any = None,
                     lr_scheduler: Any = None, observer: StepObserver | None = None, **kwargs: Any) -> "PlainEngine":
    """`deepspeed.initialize` for DeepSpeed's own step (the AdamW baseline); returns a `PlainEngine`."""
    config = config if isinstance(config, dict) else json.loads(Path(config).read_text())
    engine = _deepspeed_initialize(model=model, config=config, optimizer=optimizer, lr_scheduler=lr_scheduler,
                                   **kwargs)
    return PlainEngine(engine, observer)


def _deepspeed_initialize(**kwargs: Any) -> Any:
    import deepspeed

    cast_added_parameters(kwargs["model"])
    engine, _, _, _ = deepspeed.initialize(**kwargs)
    release_shm_buffer()  # deepspeed.initialize may have created the process group itself
    return engine


class _EngineBackend:
    """The step's backend for a DeepSpeed engine: its backward and step, the stage's shard adapter."""

    def __init__(self, engine: Any, core: SharpnessAware, shards: EngineShards, example_comm: TorchComm) -> None:
        self.engine, self.core, self.shards, self.example_comm = engine, core, shards, example_comm

    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def backward(self, loss: Tensor, index: int, count: int) -> None:
        # the boundary (where DeepSpeed reduces the gradients) is the last micro-batch given, and the loss
        # is divided by their count, not by the config's gradient_accumulation_steps: the two differ in
        # an epoch's short last step, whose gradient is the mean over the micro-batches it has
        self.engine.set_gradient_accumulation_boundary(index == count - 1)
        self.engine.backward(loss / count, scale_wrt_gas=False)

    def zero_grads(self) -> None:
        # ZeRO-3 needs the optimizer's zero_grad (it resets the partition copy logic); the stage 1/2
        # fragments of bf16 with fp32 accumulation are only cleared in step(), so clear them too.
        self.engine.optimizer.zero_grad()
        self.shards.zero_grads()

    def step(self, finite: bool) -> bool:
        if not finite and not self.engine.fp16_enabled():
            return False
        # with fp16 the non-finite gradient is still in place: DeepSpeed's step detects it, skips the
        # update and reduces the loss scale
        skipped_before = self.engine.skipped_steps
        self.engine.step()
        return finite and self.engine.skipped_steps == skipped_before

    def restore_unapplied(self) -> None:
        self.shards.restore_from_master()  # the master was not applied: it still holds w

    def loss_scale(self) -> float:
        return self.shards.loss_scale()


class SAMEngine(ObservedThroughCore):
    """Runs SAM-family training steps on a DeepSpeed engine (`.engine`); an `EngineStepper`."""

    def __init__(self, engine: Any, config: SAMConfig, observer: StepObserver | None = None,
                 planned_steps: int | None = None) -> None:
        self.engine = engine
        self.config = config
        if config.uses_momentum:
            require_first_moment(config.sam_type, engine.optimizer)
            if engine.zero_optimization_stage() == 0 and engine.optimizer is not engine.basic_optimizer:
                raise UnsupportedConfiguration(
                    f"sam_type={config.sam_type!r} at ZeRO stage 0 reads the first moment from the torch optimizer's "
                    f"per-parameter state, which DeepSpeed's {type(engine.optimizer).__name__} (bf16/fp16 at stage 0) "
                    "keeps on flattened master weights instead. Use ZeRO stage 1, 2 or 3, or fp32 at stage 0.")
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        params = [p for _, p in named]
        self.data_comm = TorchComm(engine.data_parallel_group)
        self.shards = shards_for_engine(engine, names, params, fisher_candidates(config, names, engine.module),
                                        self.data_comm)
        group = engine.optimizer.param_groups[0]
        self.core = SharpnessAware(config, self.shards.pieces, len(params), float(group.get("initial_lr", group["lr"])),
                                   planned_steps)
        self.observer = observer
        self.skipped_steps = 0
        self._backend = _EngineBackend(engine, self.core, self.shards, self.data_comm)

    def train_step(self, micro_batches: Sequence[Any], loss_fn: EngineLoss) -> StepOutput:
        """One full step: both passes over this rank's `micro_batches` (as many as the engine's
        gradient_accumulation_steps, or fewer in an epoch's short last step, which then averages over
        those it has), one update; `loss_fn(engine, batch)` returns per-example losses."""
        gas = self.engine.gradient_accumulation_steps()
        if not 1 <= len(micro_batches) <= gas:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches but the DeepSpeed config has "
                             f"gradient_accumulation_steps = {gas}; pass that many (fewer only for an epoch's "
                             "short last step, and the same number on every rank).")
        self.engine.train()
        out = two_pass_step(self._backend, micro_batches, lambda batch: loss_fn(self.engine, batch))
        self.skipped_steps += int(out.skipped)
        return out

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | None = None,
                        client_state: dict | None = None, exclude_frozen_parameters: bool = False,
                        written: WrittenFiles | None = None) -> str:
        """DeepSpeed's checkpoint plus each rank's SAM state (mask shard, counters, ESAM generator);
        `exclude_frozen_parameters` leaves the frozen weights out (LoRA's base: the model rebuilt on
        resume holds them), and `load_checkpoint` then needs `load_module_strict=False`. `written`
        records the files this rank wrote, with their digests (`save_deepspeed_checkpoint`)."""
        tag = tag or f"global_step{self.engine.global_steps}"
        save_deepspeed_checkpoint(self.engine, save_dir, tag, client_state, exclude_frozen_parameters, written)
        self.save_sam_state(Path(save_dir) / tag, written)
        torch.distributed.barrier()
        return tag

    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | None = None,
                        load_module_strict: bool = True) -> dict:
        """Restores the DeepSpeed checkpoint and the SAM state; returns the client state."""
        if tag is None:
            latest = Path(load_dir) / "latest"
            if not latest.exists():
                raise FileNotFoundError(f"no checkpoint tag given and {latest} does not exist")
            tag = latest.read_text().strip()
        _, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=load_module_strict)
        self.load_sam_state(read_sam_state(Path(load_dir) / tag, self.data_comm.rank, self.data_comm.world_size,
                                           self.config.sam_type))
        return client_state or {}

    def mask_counts(self) -> Tensor | None:
        if not self.config.uses_fisher_mask:
            return None
        counts = self.core.mask_counts()
        self.data_comm.all_reduce(counts)
        return counts

    def sam_state(self) -> dict:
        """This rank's SAM state: the core's (Fisher mask shard, accumulated Fisher, step counters,
        generators, schedule and reuse state) and the skipped-step counter, with the world size and
        sam_type it belongs to."""
        return {"core": self.core.state_dict(), "skipped_steps": self.skipped_steps,
                "world_size": self.data_comm.world_size, "sam_type": self.config.sam_type}

    def save_sam_state(self, folder: str | os.PathLike, written: WrittenFiles | None = None) -> Path:
        """Writes `sam_state()` to `folder/fsam_state_rank<r>.pt` atomically; every rank writes its own."""
        path = Path(folder) / sam_state_file(self.data_comm.rank)
        save_atomically(self.sam_state(), path, written)
        return path

    def load_sam_state(self, state: dict) -> None:
        """Restores what `sam_state()` returned (read it with `read_sam_state`, which checks it fits)."""
        self.core.load_state_dict(state["core"])
        self.skipped_steps = int(state["skipped_steps"])


class _RecordingCheckpointEngine:
    """DeepSpeed's checkpoint engine with every file it saves recorded in `written`, hashed right after it is
    written; everything else is the engine's. DeepSpeed writes each checkpoint file through
    `checkpoint_engine.save` (model, optimizer and ZeRO partition states); the few it writes itself
    (`latest`, the recovery script) are small."""

    def __init__(self, engine: Any, written: WrittenFiles) -> None:
        self._engine, self._written = engine, written

    def save(self, state_dict: Any, path: str) -> None:
        self._engine.save(state_dict, path)
        self._written.add(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def save_deepspeed_checkpoint(engine: Any, save_dir: str | os.PathLike, tag: str | None, client_state: dict | None,
                              exclude_frozen_parameters: bool, written: WrittenFiles | None = None) -> None:
    """`engine.save_checkpoint`; with `exclude_frozen_parameters`, no frozen parameter under any of its names.
    DeepSpeed drops the frozen entries by the names `named_parameters()` gives, which names a tied weight
    once: a frozen embedding tied to the LM head (SmolLM2, GPT-2) stayed in as `lm_head.weight`, the whole
    table. A state-dict hook drops every name, for the length of the save. `written`: the files this rank
    saves through DeepSpeed's checkpoint engine are recorded there with their digests."""
    own_engine = getattr(engine, "checkpoint_engine", None)
    if written is not None and own_engine is not None:
        engine.checkpoint_engine = _RecordingCheckpointEngine(own_engine, written)
    hook = None
    if exclude_frozen_parameters:
        frozen = [n for n, p in engine.module.named_parameters(remove_duplicate=False) if not p.requires_grad]

        def drop_frozen(module: Any, state_dict: dict, prefix: str, local_metadata: Any) -> None:
            for name in frozen:
                state_dict.pop(prefix + name, None)

        hook = engine.module.register_state_dict_post_hook(drop_frozen)
    try:
        engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state or {},
                               exclude_frozen_parameters=exclude_frozen_parameters)
    finally:
        if hook is not None:
            hook.remove()
        if own_engine is not None:
            engine.checkpoint_engine = own_engine


def sam_state_file(rank: int | str) -> str:
    """The name of rank `rank`'s SAM state file in a checkpoint folder."""
    return f"fsam_state_rank{rank}.pt"


def read_sam_state(folder: str | os.PathLike, rank: int, world_size: int, sam_type: str) -> dict:
    """This rank's SAM state from `folder`, after checking that it belongs to a run of `world_size` ranks
    and `sam_type`; ConfigError with the fix otherwise (a folder without SAM state included)."""
    folder = Path(folder)
    written = sorted(folder.glob(sam_state_file("*")))
    if not written:
        raise ConfigError(f"{str(folder)!r} holds no SAM state ({sam_state_file('<r>')} per rank): it was not written "
                          "by fsam-ds (SAMEngine, SAMTrainer), or was saved with the model only. Resuming from it "
                          "would restart SAM's Fisher mask, step counters and generators, so the run would not "
                          "continue the same run. Resume from a checkpoint fsam-ds wrote, or start a new run from "
                          "its weights.")
    path = folder / sam_state_file(rank)
    state = torch.load(path, weights_only=False) if path.is_file() else None
    saved_world = len(written) if state is None else state.get("world_size", len(written))
    if state is None or saved_world != world_size:
        raise ConfigError(f"{str(folder)!r} was written by {saved_world} rank(s), this run has {world_size}: each "
                          "rank's SAM state (its Fisher mask shard) belongs to one rank of that layout. Resume with "
                          "the checkpoint's number of ranks.")
    saved_type = state.get("sam_type", state["core"]["config"].get("sam_type"))
    if saved_type != sam_type:
        raise ConfigError(f"{str(folder)!r} was written with sam_type={saved_type!r}, this run uses sam_type="
                          f"{sam_type!r}; resume with sam_type={saved_type!r}, or start a new run.")
    return state


def _grad_norm(module: torch.nn.Module) -> float:
    squares = [p.grad.double().square().sum() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(squares).sum().sqrt()) if squares else math.nan


class PlainEngine:
    """DeepSpeed's own step (sam_type none): the AdamW baseline, an `EngineStepper` like `SAMEngine`.

    `observer` measures its "forward", "backward" and "step" phases; settable as `.observer`."""

    def __init__(self, engine: Any, observer: StepObserver | None = None) -> None:
        self.engine = engine
        self.observer: StepObserver = observer or NULL_OBSERVER
        self.skipped_steps = 0

    def train_step(self, micro_batches: Sequence[Any], loss_fn: EngineLoss) -> StepOutput:
        engine, observer = self.engine, self.observer
        engine.train()
        skipped_before, losses, norm, examples = engine.skipped_steps, [], None, 0
        # DeepSpeed records the gradient norm except in stage 0 fp32, where the module holds the
        # averaged gradient after the last backward
        own_norm = engine.zero_optimization_stage() == 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled())
        for i, batch in enumerate(micro_batches):  # DeepSpeed accumulates and updates at the last one
            with observer.phase("forward"):
                per_example = check_per_example(loss_fn(engine, batch))
            loss, examples = per_example.mean(), examples + per_example.numel()
            with observer.phase("backward"):
                engine.backward(loss)
            if own_norm and i == len(micro_batches) - 1:
                norm = _grad_norm(engine.module)
            with observer.phase("step"):
                engine.step()
            losses.append(float(loss.detach()))
        skipped = engine.skipped_steps != skipped_before
        self.skipped_steps += int(skipped)
        norm = engine.get_global_grad_norm() if norm is None else norm
        stats = StepStats(True, float(norm) if norm is not None else math.nan, 0.0, 0.0)
        scale = float(engine.optimizer.loss_scale) if engine.fp16_enabled() else 1.0
        return StepOutput(sum(losses) / len(losses), math.nan, stats, skipped, examples, scale)

    def save_checkpoint(self, save_dir: str | os.PathLike, tag: str | None = None,
                        client_state: dict | None = None, exclude_frozen_parameters: bool = False,
                        written: WrittenFiles | None = None) -> str:
        save_deepspeed_checkpoint(self.engine, save_dir, tag, client_state, exclude_frozen_parameters, written)
        torch.distributed.barrier()
        return tag or ""

    def load_checkpoint(self, load_dir: str | os.PathLike, tag: str | None = None,
                        load_module_strict: bool = True) -> dict:
        _, client_state = self.engine.load_checkpoint(str(load_dir), tag=tag, load_module_strict=load_module_strict)
        return client_state or {}

    def mask_counts(self) -> None:
        return None
