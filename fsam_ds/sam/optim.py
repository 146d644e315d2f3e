"""The SAM family as a torch optimizer, for plain PyTorch (one process or DDP).

    optimizer = SAMOptimizer(model.named_parameters(), torch.optim.AdamW,
                             SAMConfig(sam_type="fisher-sam", rho=0.05), lr=2e-5)

    # one call, every type (ESAM's data selection needs per-example losses):
    out = optimizer.step_batch(batch, lambda b: F.cross_entropy(model(b["x"]), b["y"], reduction="none"))

    # or the two phases by hand:
    loss_fn(model(x), y).backward(); optimizer.first_step(zero_grad=True)
    loss_fn(model(x), y).backward(); optimizer.second_step(zero_grad=True)

Under DDP the first backward already averages g over ranks, so every rank computes the same e
(the global-batch SAM). For per-rank perturbations ("m-sharpness") run the first pass inside
`model.no_sync()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.core import SharpnessAware, StepStats
from fsam_ds.sam.shards import Comm, LocalComm, TensorShards

PerExampleLoss = Callable[[Any], Tensor]


@dataclass
class StepOutput:
    loss: float
    """Mean first-pass loss (at w)."""
    perturbed_loss: float
    """Mean second-pass loss (at w + e, over the examples kept)."""
    stats: StepStats
    skipped: bool
    """True when a non-finite gradient (either pass) left the parameters unchanged."""
    examples_kept: int


def _named_groups(params: Iterable) -> tuple[list[dict], list[str]]:
    """Accepts tensors, (name, tensor) pairs, or param-group dicts of either."""
    items = list(params)
    if not items:
        raise ValueError("SAMOptimizer got an empty parameter list; pass model.named_parameters().")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out_groups, names = [], []
    for g, group in enumerate(groups):
        group = dict(group)
        tensors = []
        for i, entry in enumerate(group["params"]):
            if isinstance(entry, tuple):
                name, tensor = entry
            else:
                name, tensor = f"group{g}.param{i}", entry
            names.append(name)
            tensors.append(tensor)
        group["params"] = tensors
        out_groups.append(group)
    return out_groups, names


def index_batch(batch: Any, index: Tensor) -> Any:
    """Selects examples `index` (along dim 0) from a tensor, or a dict / list / tuple of them."""
    if isinstance(batch, Tensor):
        return batch[index.to(batch.device)]
    if isinstance(batch, dict):
        return type(batch)((k, index_batch(v, index)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(index_batch(v, index) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(index_batch(v, index) for v in batch)
    return batch


def check_per_example(losses: Tensor, expected: int | None = None) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return per-example losses, a 1-D tensor [batch_size]; got {shape}. "
                         "Compute the loss with reduction='none' (ESAM ranks examples by their loss).")
    if expected is not None and losses.numel() != expected:
        raise ValueError(f"loss_fn returned {losses.numel()} losses for a batch of {expected} examples; "
                         "it must return one loss per example of the batch it is given.")
    return losses


class SAMOptimizer(Optimizer):
    """Sharpness-aware wrapper around a base optimizer; `param_groups` and `state` are the base's.

    Args:
        params: `model.named_parameters()` (names drive the Fisher candidate rule), tensors,
            or param-group dicts of either.
        base_optimizer: the base optimizer class (or a factory taking param groups).
        config: the SAM-family configuration.
        comm: the data-parallel group's all-reduce (`fsam_ds.shards.TorchComm()`) so that ESAM ranks the
            examples of the global batch under DDP; by default each process ranks its own.
        **base_kwargs: passed to the base optimizer (lr, weight_decay, ...).
    """

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer],
                 config: SAMConfig | None = None, comm: Comm | None = None, **base_kwargs: Any) -> None:
        self.config = config or SAMConfig()
        groups, names = _named_groups(params)
        tensors = [p for g in groups for p in g["params"]]
        if not any(isinstance(p, Tensor) and p.requires_grad for p in tensors):
            raise ValueError("SAMOptimizer got no trainable tensors (none has requires_grad=True); "
                             "unfreeze some parameters or pass model.named_parameters().")
        if self.config.uses_fisher_mask and self.config.candidate_exclude and all(
                n.startswith("group") and ".param" in n for n in names):
            raise ValueError(f"sam_type={self.config.sam_type!r} applies candidate_exclude="
                             f"{self.config.candidate_exclude!r} to parameter names, but the parameters came "
                             "without names; pass model.named_parameters() or set candidate_exclude=().")
        super().__init__(groups, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.names = names
        # under DDP every rank holds the full, averaged gradient: parameter reductions stay local
        self.shards = TensorShards(names, tensors, [self.config.is_candidate(n) for n in names])
        lr = self.param_groups[0].get("initial_lr", self.param_groups[0].get("lr", 0.0))
        self.core = SharpnessAware(self.config, self.shards.pieces, len(tensors), lr)
        self.example_comm = comm or LocalComm()
        self.skipped_steps = 0
        self._perturbed = False

    @property
    def step_count(self) -> int:
        return self.core.step_count

    # ---------------------------------------------------------------- two-phase API
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> StepStats:
        """Perturbs w <- w + e from the gradients in `.grad` (the first pass)."""
        stats = self.core.first_pass(self.shards, float(self.param_groups[0]["lr"]))
        self._perturbed = stats.finite
        if zero_grad:
            self.zero_grad()
        return stats

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restores w exactly and steps the base optimizer with the second-pass gradient.

        Returns False (nothing updated, step not counted) if either pass had a non-finite gradient.
        """
        updated = self._perturbed and self.core.second_pass(self.shards)
        self.shards.remove_perturbation()
        self._perturbed = False
        if updated:
            self.base_optimizer.step()
            self.core.end_step()
        else:
            self.core.discard_step()
            self.skipped_steps += 1
        if zero_grad:
            self.zero_grad()
        return updated

    # ---------------------------------------------------------------- one-call API
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """torch-style step: `closure` clears nothing, computes the mean loss and calls backward.

        It is called twice (at w, then at w + e). ESAM's data selection needs per-example losses:
        use `step_batch` for esam types with gamma < 1.
        """
        if closure is None:
            raise ValueError("SAMOptimizer.step needs a closure that computes the loss and calls backward() "
                             "(SAM evaluates it twice); or use first_step()/second_step() or step_batch().")
        if self.config.uses_esam and self.config.gamma < 1:
            raise ValueError(f"sam_type={self.config.sam_type!r} with gamma={self.config.gamma} selects examples "
                             "by their per-example loss; call step_batch(batch, per_example_loss_fn) instead.")
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step(zero_grad=True)
        return loss

    def step_batch(self, batch: Any, loss_fn: PerExampleLoss) -> StepOutput:
        """One full step of any type on `batch`; `loss_fn(batch)` returns per-example losses.

        Both passes use the mean of the per-example losses (the paper's code summed the second
        pass: defect B7/B8).
        """
        self.zero_grad()
        losses = check_per_example(loss_fn(batch))
        n = losses.numel()
        losses.mean().backward()
        stats = self.first_step(zero_grad=True)
        if not stats.finite:
            self.second_step(zero_grad=True)
            return StepOutput(float(losses.detach().mean()), float("nan"), stats, True, 0)
        second_batch, kept, weight = batch, n, None
        if self.config.uses_esam and self.config.gamma < 1:
            with torch.no_grad():
                after = check_per_example(loss_fn(batch), n)
            keep, total = self.core.select_examples(losses, after, self.example_comm)
            kept = int(keep.sum())
            rows = keep.nonzero().squeeze(1)
            if self.example_comm.world_size > 1:
                # DDP averages over ranks; weight each rank's sum so the result is the mean over the
                # examples kept in the whole global batch (ranks keep different numbers of them)
                weight = self.example_comm.world_size / total
                if kept == 0:  # every rank must still run backward for DDP's gradient all-reduce
                    rows, weight = torch.tensor([0]), 0.0
            second_batch = index_batch(batch, rows)
        per_example = check_per_example(loss_fn(second_batch), max(kept, 1) if weight == 0.0 else kept)
        second = per_example.mean() if weight is None else per_example.sum() * weight
        second.backward()
        updated = self.second_step(zero_grad=True)
        second = per_example.detach().mean() if kept else torch.tensor(float("nan"))
        return StepOutput(float(losses.detach().mean()), float(second.detach()), stats, not updated, kept)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        state = self.base_optimizer.state_dict()
        state["sam"] = {**self.core.state_dict(), "skipped_steps": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state = dict(state_dict)
        if "sam" not in state:
            raise ValueError("this state dict has no 'sam' entry: it was not written by SAMOptimizer.state_dict()")
        sam = state.pop("sam")
        self.base_optimizer.load_state_dict(state)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.core.load_state_dict(sam)
        self.skipped_steps = int(sam.get("skipped_steps", 0))
