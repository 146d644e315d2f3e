"""One sharpness-aware step, written once for plain PyTorch and for DeepSpeed.

The sequence (core.py states the math):

1. first pass: per-example losses of every micro-batch at w, backward of their mean;
2. `core.first_pass`: mask when due, w <- w + e; gradients cleared;
3. ESAM (gamma < 1): a no-grad forward at w + e ranks the examples of the global batch by their
   loss rise and keeps the top share; each rank's loss is weighted so that the data-parallel mean
   is the mean over the examples kept in the whole global batch;
4. second pass at w + e, backward;
5. `core.second_pass` (finite check, GSAM), exact restore of w, base optimizer step; a step whose
   gradient was not finite, or that the base optimizer refused (fp16 overflow), leaves every weight
   and the SAM state as they were before it.

A step the schedule leaves without sharpness ends after 2: the base optimizer applies the first
pass's gradient (`base_step`), with the same skip rules. An MSAM step (`momentum_step`) perturbs first
and has one pass, at w + e, followed by 5.

What differs between plain PyTorch and a DeepSpeed engine (how backward runs, how gradients are
cleared, how the base step reports an overflow, how weights come back after a refused step) is a
`StepBackend`; everything else is here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from fsam_ds.sam.shards import Comm, ShardAccess

if TYPE_CHECKING:  # core imports this module for the observer
    from fsam_ds.sam.core import SharpnessAware, StepStats

PerExampleLoss = Callable[[Any], Tensor]


class StepObserver(Protocol):
    """Measurements of one step's phases: `phase(name)` wraps each phase, nested where phases nest.

    Names: "forward" (every call of the loss function), "backward", "first_pass" (containing
    "rebuild_mask" and "apply_perturbation"), "zero_grads", "select_examples" (ESAM's ranking, after
    its forward), "second_pass", "restore" (putting the weights back) and "step" (the base step). An MSAM
    step's perturbation is its "first_pass" and the check of its only gradient its "second_pass"."""

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]: ...


class _NullObserver:
    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


NULL_OBSERVER: StepObserver = _NullObserver()


class ObservedThroughCore:
    """`.observer` of a stepper that keeps it on its core, so the core's own phases are measured too."""

    core: SharpnessAware

    @property
    def observer(self) -> StepObserver:
        return self.core.observer

    @observer.setter
    def observer(self, observer: StepObserver | None) -> None:
        self.core.observer = observer or NULL_OBSERVER


@dataclass
class StepOutput:
    """What one training step did, the same for every engine."""

    loss: float
    """Mean first-pass loss over this rank's examples (at w; MSAM: of its only pass, at w + e)."""
    perturbed_loss: float
    """Mean second-pass loss over the examples this rank kept (at w + e); nan when it kept none or
    there is no second pass (MSAM: its only pass's loss when it perturbed, else nan)."""
    stats: StepStats
    skipped: bool
    """Nothing was updated: a pass had a non-finite gradient or the engine's loss scaler overflowed."""
    examples_kept: int
    """Examples of this rank whose gradient the update used: ESAM's kept share, all otherwise."""
    loss_scale: float = 1.0


class TrainStepper(Protocol):
    """One optimizer step over a step's micro-batches: what a training loop drives (`SAMOptimizer`,
    `fsam_ds.zero.engine.SAMEngine`, and the AdamW baseline `PlainEngine`)."""

    skipped_steps: int
    observer: StepObserver

    def train_step(self, micro_batches: Sequence[Any], loss_fn: Callable[..., Tensor]) -> StepOutput: ...


class StepBackend(Protocol):
    """What the step sequence needs from whatever holds the model, its gradients and the base optimizer."""

    core: SharpnessAware
    shards: ShardAccess
    example_comm: Comm
    """Ranks ESAM's examples over the data-parallel group (the global batch)."""

    def lr(self) -> float:
        """The learning rate of this step (rho may follow it)."""

    def backward(self, loss: Tensor, index: int, count: int) -> None:
        """Accumulates the gradient of micro-batch `index` of `count` whose (already per-micro-batch
        averaged) loss is `loss`; after the last one the gradient is the mean over the micro-batches
        and ranks."""

    def zero_grads(self) -> None: ...

    def step(self, finite: bool) -> bool:
        """Steps the base optimizer with the gradients in place; returns whether it applied them.
        Given `finite=False` it applies nothing (an fp16 engine still steps so its loss scaler backs off)."""

    def restore_unapplied(self) -> None:
        """Puts back the weights of a perturbed step the base optimizer did not apply, where removing
        the perturbation alone does not (DeepSpeed's stages 1-3 rely on the step to rewrite them)."""

    def loss_scale(self) -> float: ...


def check_per_example(losses: Tensor, expected: int | None = None) -> Tensor:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return per-example losses, a 1-D tensor [batch_size]; got {shape}. "
                         "Compute the loss with reduction='none' (ESAM ranks examples by their loss).")
    if expected is not None and losses.numel() != expected:
        raise ValueError(f"loss_fn returned {losses.numel()} losses for a batch of {expected} examples; "
                         "it must return one loss per example of the batch it is given.")
    return losses


def index_batch(batch: Any, index: Tensor) -> Any:
    """Selects examples `index` (along dim 0) from a tensor, or a mapping / list / tuple of them."""
    if isinstance(batch, Tensor):
        return batch[index.to(batch.device)]
    if isinstance(batch, dict):
        return type(batch)((k, index_batch(v, index)) for k, v in batch.items())
    if isinstance(batch, Mapping):  # e.g. transformers' BatchEncoding, which is not a dict
        return {k: index_batch(v, index) for k, v in batch.items()}
    if isinstance(batch, tuple) and getattr(type(batch), "_fields", None) is not None:  # a namedtuple
        return type(batch)(*(index_batch(v, index) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(index_batch(v, index) for v in batch)
    return batch


def _mean(losses: Sequence[Tensor]) -> float:
    if not losses:
        return float("nan")
    values = torch.cat([loss.reshape(-1) for loss in losses])
    return float(values.mean(dtype=torch.promote_types(values.dtype, torch.float32)))


def finish_step(backend: StepBackend, perturbed: bool) -> bool:
    """Step 5 of the sequence, with the second-pass gradient in place; `perturbed`: the first pass was
    finite and perturbed the weights. Returns whether it updated."""
    finite = perturbed and backend.core.second_pass(backend.shards)
    return apply_update(backend, finite, perturbed, restore=True)


def base_step(backend: StepBackend) -> bool:
    """A step the schedule left without sharpness: the base optimizer applies the first-pass gradient
    in place (nothing was perturbed, so there is nothing to restore). Returns whether it updated."""
    return apply_update(backend, True, perturbed=False, restore=False)


def apply_update(backend: StepBackend, finite: bool, perturbed: bool, restore: bool) -> bool:
    """Takes the perturbation off (`restore`), then the base optimizer applies the gradient in place if
    `finite`; a refused step puts w back (`perturbed`: from before e) and is forgotten by the core.
    Returns whether it updated."""
    core, observer = backend.core, backend.core.observer
    if restore:
        with observer.phase("restore"):
            backend.shards.remove_perturbation()
    with observer.phase("step"):
        applied = backend.step(finite)
    if applied:
        core.end_step()
        return True
    if perturbed:
        with observer.phase("restore"):
            backend.restore_unapplied()
    with observer.phase("zero_grads"):
        backend.zero_grads()
    core.discard_step()
    return False


def _forward_backward(backend: StepBackend, micro_batches: Sequence[Any], loss_fn: PerExampleLoss) -> list[Tensor]:
    """One pass: per-example losses of every micro-batch, backward of their mean; returns the losses."""
    observer, count, losses = backend.core.observer, len(micro_batches), []
    for i, batch in enumerate(micro_batches):
        with observer.phase("forward"):
            per_example = check_per_example(loss_fn(batch))
        losses.append(per_example.detach())
        with observer.phase("backward"):
            backend.backward(per_example.mean(), i, count)
    return losses


def momentum_step(backend: StepBackend, micro_batches: Sequence[Any], loss_fn: PerExampleLoss) -> StepOutput:
    """One MSAM step (core.py states the math): e along the first moment, one pass at w + e, exact restore,
    the base step with that gradient; the same skip rules as the two-pass step."""
    core = backend.core
    stats = core.momentum_perturbation(backend.shards, backend.lr())
    perturbed = stats.sharpness_aware
    losses = _forward_backward(backend, micro_batches, loss_fn)
    stats = core.momentum_gradient(backend.shards, stats)
    updated = apply_update(backend, stats.finite, perturbed, restore=perturbed)
    loss = _mean(losses)
    return StepOutput(loss, loss if perturbed else float("nan"), stats, not updated,
                      sum(l.numel() for l in losses) if stats.finite else 0, backend.loss_scale())


def two_pass_step(backend: StepBackend, micro_batches: Sequence[Any], loss_fn: PerExampleLoss) -> StepOutput:
    """One full step of any type over this rank's `micro_batches`; `loss_fn(batch)` returns per-example
    losses. Both passes use the mean of the per-example losses (the paper's code summed the second
    pass: defect B7/B8)."""
    core, observer = backend.core, backend.core.observer
    if core.config.uses_momentum:
        return momentum_step(backend, micro_batches, loss_fn)
    count = len(micro_batches)

    def losses_of(batch: Any, expected: int | None = None) -> Tensor:
        with observer.phase("forward"):
            return check_per_example(loss_fn(batch), expected)

    def backward(loss: Tensor, index: int) -> None:
        with observer.phase("backward"):
            backend.backward(loss, index, count)

    before = _forward_backward(backend, micro_batches, loss_fn)
    first_loss = _mean(before)

    stats = core.first_pass(backend.shards, backend.lr())
    if not stats.finite:
        finish_step(backend, perturbed=False)
        return StepOutput(first_loss, float("nan"), stats, True, 0, backend.loss_scale())
    if not stats.sharpness_aware:
        updated = base_step(backend)
        return StepOutput(first_loss, float("nan"), stats, not updated, sum(l.numel() for l in before),
                          backend.loss_scale())
    with observer.phase("zero_grads"):
        backend.zero_grads()

    keep: list[Tensor] | None = None
    total_kept = 0
    if core.config.uses_esam and core.config.gamma < 1:
        with torch.no_grad():
            after = [losses_of(b, l.numel()) for b, l in zip(micro_batches, before)]
        with observer.phase("select_examples"):
            kept, total_kept = core.select_examples(torch.cat(before), torch.cat(after), backend.example_comm)
        keep = list(kept.split([l.numel() for l in before]))

    second: list[Tensor] = []
    for i, batch in enumerate(micro_batches):
        if keep is None:
            per_example = losses_of(batch)
            loss = per_example.mean()
        else:
            rows = keep[i].nonzero().squeeze(1)
            if rows.numel() == 0:
                # still run forward and backward: DDP's and ZeRO's collectives must match on every rank
                backward(losses_of(index_batch(batch, torch.tensor([0]))).sum() * 0.0, i)
                continue
            per_example = losses_of(index_batch(batch, rows), rows.numel())
            # the backend averages over ranks and micro-batches; this weight turns that average into
            # the mean over the examples kept in the whole global batch (ranks keep different numbers)
            loss = per_example.sum() * (backend.example_comm.world_size * count / total_kept)
        second.append(per_example.detach())
        backward(loss, i)

    updated = finish_step(backend, perturbed=True)
    examples_kept = sum(losses.numel() for losses in second)
    return StepOutput(first_loss, _mean(second), stats, not updated, examples_kept, backend.loss_scale())
