"""The SAM family as a torch optimizer, for plain PyTorch (one process or DDP).

    optimizer = SAMOptimizer(model.named_parameters(), torch.optim.AdamW,
                             SAMConfig(sam_type="fisher-sam", rho=0.05), lr=2e-5)

    # one call, every type (ESAM's data selection needs per-example losses):
    out = optimizer.step_batch(batch, lambda b: F.cross_entropy(model(b["x"]), b["y"], reduction="none"))
    # the same over several micro-batches (gradient accumulation):
    out = optimizer.train_step(micro_batches, per_example_loss)

    # or the two phases by hand:
    loss_fn(model(x), y).backward(); optimizer.first_step(zero_grad=True)
    loss_fn(model(x), y).backward(); optimizer.second_step(zero_grad=True)

Under DDP the first backward already averages g over ranks, so every rank computes the same e
(the global-batch SAM). For per-rank perturbations ("m-sharpness") run the first pass inside
`model.no_sync()`. `observer=` (a `fsam_ds.sam.driver.StepObserver`) times the step's phases.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from fsam_ds.sam.candidates import fisher_candidates
from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.core import SharpnessAware, StepStats
from fsam_ds.sam.driver import (ObservedThroughCore, PerExampleLoss, StepObserver, StepOutput, check_per_example,
                                finish_step, index_batch, two_pass_step)
from fsam_ds.sam.shards import Comm, LocalComm, TensorShards, require_first_moment

__all__ = ["SAMOptimizer", "StepOutput", "check_per_example", "index_batch"]


def _named_groups(params: Iterable) -> tuple[list[dict], list[str]]:
    """Accepts tensors, (name, tensor) pairs, or param-group dicts of either."""
    items = list(params)
    if not items:
        raise ValueError("SAMOptimizer got an empty parameter list; pass model.named_parameters().")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    out_groups, names = [], []
    for g, group in enumerate(groups):
        named = [entry if isinstance(entry, tuple) else (f"group{g}.param{i}", entry)
                 for i, entry in enumerate(group["params"])]
        names += [name for name, _ in named]
        out_groups.append({**group, "params": [tensor for _, tensor in named]})
    return out_groups, names


class _TorchBackend:
    """The step's backend for a torch optimizer: autograd's backward, `zero_grad`, the base step."""

    def __init__(self, optimizer: SAMOptimizer) -> None:
        self.optimizer = optimizer
        self.core = optimizer.core
        self.shards = optimizer.shards
        self.example_comm = optimizer.example_comm

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: Tensor, index: int, count: int) -> None:
        (loss if count == 1 else loss / count).backward()

    def zero_grads(self) -> None:
        self.optimizer.zero_grad()

    def step(self, finite: bool) -> bool:
        if finite:
            max_norm = self.optimizer.max_grad_norm
            if max_norm is not None:  # the gradient the base steps with (GSAM's already corrected), as DeepSpeed clips
                self.optimizer.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.shards.params, max_norm))
            self.optimizer.base_optimizer.step()
        return finite

    def restore_unapplied(self) -> None:
        """Nothing to do: `remove_perturbation` already put the weights back exactly."""

    def loss_scale(self) -> float:
        return 1.0


class SAMOptimizer(ObservedThroughCore, Optimizer):
    """Sharpness-aware wrapper around a base optimizer; `param_groups` and `state` are the base's.

    Args:
        params: `model.named_parameters()` (names drive the Fisher candidate rule), tensors,
            or param-group dicts of either. Frozen tensors (requires_grad=False) stay in the base
            optimizer's groups but are never perturbed nor Fisher candidates.
        base_optimizer: the base optimizer class (or a factory taking param groups).
        config: the SAM-family configuration.
        comm: the data-parallel group's all-reduce (`fsam_ds.sam.shards.TorchComm()`) so that ESAM ranks the
            examples of the global batch under DDP; by default each process ranks its own.
        observer: measures the step's phases (`fsam_ds.sam.driver.StepObserver`); settable as `.observer`.
        module: the model the named parameters come from; with it the Fisher candidates also leave out
            embedding weights and parameters tied to them (`SAMConfig.exclude_embeddings`).
        planned_steps: the run's planned optimizer steps; the schedule `late:f` needs them.
        max_grad_norm: clip the gradient each base step takes to this global norm (`inf`: measure it only);
            its norm before clipping is then `grad_norm` after each applied step.
        **base_kwargs: passed to the base optimizer (lr, weight_decay, ...).
    """

    def __init__(self, params: Iterable, base_optimizer: Callable[..., Optimizer],
                 config: SAMConfig | None = None, comm: Comm | None = None,
                 observer: StepObserver | None = None, module: torch.nn.Module | None = None,
                 planned_steps: int | None = None, max_grad_norm: float | None = None,
                 **base_kwargs: Any) -> None:
        self.config = config or SAMConfig()
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm={max_grad_norm!r}: give a positive norm (inf to measure without "
                             "clipping), or None not to clip.")
        self.max_grad_norm = max_grad_norm
        self.grad_norm: float | None = None
        groups, names = _named_groups(params)
        tensors = [p for g in groups for p in g["params"]]
        trainable = [(n, p) for n, p in zip(names, tensors) if isinstance(p, Tensor) and p.requires_grad]
        if not trainable:
            raise ValueError("SAMOptimizer got no trainable tensors (none has requires_grad=True); "
                             "unfreeze some parameters or pass model.named_parameters().")
        if self.config.uses_fisher_mask and self.config.candidate_exclude and all(
                n.startswith("group") and ".param" in n for n in names):
            raise ValueError(f"sam_type={self.config.sam_type!r} applies candidate_exclude="
                             f"{self.config.candidate_exclude!r} to parameter names, but the parameters came "
                             "without names; pass model.named_parameters() or set candidate_exclude=().")
        super().__init__(groups, {})
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        if self.config.uses_momentum:
            require_first_moment(self.config.sam_type, self.base_optimizer)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.names = names
        # Only trainable tensors are perturbed and ranked: a frozen one (no gradient) would count as
        # Fisher candidates with score 0 and enlarge the mask.
        self.shards = TensorShards([n for n, _ in trainable], [p for _, p in trainable],
                                   fisher_candidates(self.config, [n for n, _ in trainable], module),
                                   self.base_optimizer)
        lr = self.param_groups[0].get("initial_lr", self.param_groups[0].get("lr", 0.0))
        self.core = SharpnessAware(self.config, self.shards.pieces, len(trainable), lr, planned_steps)
        self.observer = observer
        self.example_comm = comm or LocalComm()
        self.skipped_steps = 0
        self._backend = _TorchBackend(self)
        self._perturbed = False

    @property
    def step_count(self) -> int:
        return self.core.step_count

    # ---------------------------------------------------------------- two-phase API
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> StepStats:
        """Perturbs w <- w + e from the gradients in `.grad` (the first pass)."""
        self._refuse_one_pass_steps("first_step() / second_step()")
        stats = self.core.first_pass(self.shards, self._backend.lr())
        self._perturbed = stats.finite
        if zero_grad:
            self.zero_grad()
        return stats

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> bool:
        """Restores w exactly and steps the base optimizer with the second-pass gradient.

        Returns False (nothing updated, step not counted, gradients cleared) if either pass had a
        non-finite gradient.
        """
        updated = finish_step(self._backend, self._perturbed)
        self._perturbed = False
        self.skipped_steps += int(not updated)
        if zero_grad:
            self.zero_grad()
        return updated

    def _refuse_one_pass_steps(self, api: str) -> None:
        # these calls run the second pass whatever the schedule decides; train_step skips it
        if self.config.uses_momentum:
            raise ValueError(f"sam_type={self.config.sam_type!r} takes one pass per step, at w + e, which {api} "
                             "cannot express; call train_step(micro_batches, per_example_loss) or "
                             "step_batch(batch, per_example_loss) instead.")
        if self.config.schedule_rule[0] != "always":
            raise ValueError(f"schedule={self.config.schedule!r} skips the second pass on some steps, which {api} "
                             "always runs; call train_step(micro_batches, per_example_loss) or step_batch(batch, "
                             "per_example_loss) instead.")

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
        self._refuse_one_pass_steps("step(closure)")
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step(zero_grad=True)
        return loss

    def train_step(self, micro_batches: Sequence[Any], loss_fn: PerExampleLoss) -> StepOutput:
        """One full step of any type over `micro_batches` (their gradients averaged, as one batch of
        equal-size micro-batches would be); `loss_fn(batch)` returns per-example losses."""
        with self.observer.phase("zero_grads"):  # the caller's gradients, if any, are not the step's
            self.zero_grad()
        out = two_pass_step(self._backend, micro_batches, loss_fn)
        if not out.skipped:  # a skipped step already cleared them
            with self.observer.phase("zero_grads"):
                self.zero_grad()
        self.skipped_steps += int(out.skipped)
        return out

    def step_batch(self, batch: Any, loss_fn: PerExampleLoss) -> StepOutput:
        """One full step of any type on `batch`; `loss_fn(batch)` returns per-example losses."""
        return self.train_step([batch], loss_fn)

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
