"""The interface between the SAM-family math and whatever holds the parameters.

The math (`fsam_ds.sam.core`) sees only this: the local pieces of every parameter this process owns,
the matching gradient pieces, and an all-reduce. A plain tensor list (one process, or DDP where
every rank holds everything) is one implementation; a DeepSpeed ZeRO rank's partition is another
(`fsam_ds.zero.adapters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Piece:
    """What this process owns of one parameter: elements [offset, offset + size) of its flat view."""

    name: str
    index: int
    """Position of the parameter in the global parameter order (identical on every rank)."""
    numel: int
    """Elements of the whole parameter."""
    offset: int
    size: int
    candidate: bool
    """Whether the parameter takes part in the Fisher top-k."""


FIRST_MOMENT = "exp_avg"
"""The base optimizer's state entry MSAM perturbs along: the first moment of the Adam family."""


def require_first_moment(sam_type: str, optimizer: Any) -> None:
    """Refuses, at construction, a base optimizer without a first moment for the msam types.

    The Adam family (torch's Adam/AdamW/NAdam/RAdam/Adamax, DeepSpeed's FusedAdam and CPU Adam) keeps
    `exp_avg` and has `betas` in every param group; the state itself appears only at its first step."""
    if not all("betas" in group for group in optimizer.param_groups):
        raise ValueError(f"sam_type={sam_type!r} perturbs along the base optimizer's first moment (Adam's "
                         f"{FIRST_MOMENT!r}), which {type(optimizer).__name__} does not keep. Use torch.optim.AdamW "
                         "(or another Adam-family optimizer) as the base optimizer, or a sam_type without msam.")


class Comm(Protocol):
    """Collectives over the processes that share the parameters (a no-op for one process)."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sums `tensor` over the processes, in place, and returns it."""


class LocalComm:
    rank = 0
    world_size = 1

    def all_reduce(self, tensor: Tensor) -> Tensor:
        return tensor


class TorchComm:
    """`torch.distributed` sum-all-reduce over a process group (gloo or NCCL)."""

    def __init__(self, group: object | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        # An NCCL-only group reduces only CUDA tensors, but the SAM math keeps its small sums and
        # histograms on the CPU: those are staged through the current CUDA device.
        backend = str(dist.get_backend(group))
        self._stage = None
        if "nccl" in backend and "cpu:" not in backend:
            self._stage = torch.device("cuda", torch.cuda.current_device())

    def all_reduce(self, tensor: Tensor) -> Tensor:
        if self._stage is not None and tensor.device.type == "cpu":
            staged = tensor.to(self._stage)
            dist.all_reduce(staged, group=self.group)
            tensor.copy_(staged)
        else:
            dist.all_reduce(tensor, group=self.group)
        return tensor


class ShardAccess(Protocol):
    """Reads and writes what this process owns. Every method that communicates runs on every rank."""

    pieces: Sequence[Piece]
    comm: Comm

    def grads(self) -> list[Tensor | None]:
        """Flat gradient pieces, unscaled, in fp32 or fp64 (None where the parameter has no gradient)."""

    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Writes back gradient pieces (GSAM modifies the second-pass gradient)."""

    def weights(self) -> list[Tensor]:
        """Flat weight pieces in fp32 or fp64 (ASAM scales by |w|)."""

    def apply_perturbation(self, deltas: Sequence[tuple[Tensor | None, Tensor | None]]) -> None:
        """Adds e to the weights the next forward pass uses. Each item is (delta, support): a flat delta
        (None = unperturbed) and an optional bit-packed (`pack_bits`) support outside which delta is
        zero; the support is not modified until `remove_perturbation`."""

    def remove_perturbation(self) -> None:
        """Puts back exactly the weights from before `apply_perturbation`."""

    def first_moments(self) -> list[Tensor | None]:
        """The base optimizer's first moment (`FIRST_MOMENT`) of each piece, flat, as the previous update
        left it; None where the optimizer keeps none yet (before its first step). Read-only for the caller."""


class UndoablePerturbation:
    """Adds a delta to a flat weight view and takes it off again bit for bit.

    Subtracting e again is not exact in floating point (and loses w entirely where |e| >> |w|), so
    the weights under the delta's support are kept verbatim: a copy only where e may be non-zero,
    i.e. the Fisher mask's entries for the fisher types. The support is the caller's bit-packed mask
    (held by reference, not copied); its positions are recomputed at removal rather than kept as
    8-byte indices.
    """

    def __init__(self, weight: Tensor, delta: Tensor, support: Tensor | None) -> None:
        self.weight = weight
        self.support = support
        if support is None:
            self.original = weight.clone()
            weight.copy_(weight.to(delta.dtype).add_(delta))
        else:
            index = self._index()
            self.original = weight.index_select(0, index)
            perturbed = self.original.to(delta.dtype) + delta.index_select(0, index)
            weight.index_copy_(0, index, perturbed.to(weight.dtype))

    def _index(self) -> Tensor:
        return unpack_bits(self.support, self.weight.numel()).nonzero().squeeze(1)

    def remove(self) -> None:
        if self.support is None:
            self.weight.copy_(self.original)
        else:
            self.weight.index_copy_(0, self._index(), self.original)

    def nbytes(self) -> int:
        """Bytes held beyond the caller's mask."""
        return self.original.nbytes


_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: Tensor) -> Tensor:
    """Packs a flat boolean tensor into uint8 (8 entries a byte)."""
    mask = mask.reshape(-1)
    padded = torch.zeros((mask.numel() + 7) // 8 * 8, dtype=torch.uint8, device=mask.device)
    padded[: mask.numel()] = mask
    weights = _BIT_WEIGHTS.to(mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int16).to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_bits`: a flat boolean tensor of `numel` entries."""
    weights = _BIT_WEIGHTS.to(packed.device)
    return (packed.unsqueeze(1) & weights).ne(0).reshape(-1)[:numel]


def flat_view(tensor: Tensor, what: str) -> Tensor:
    if not tensor.is_contiguous():
        raise ValueError(f"{what} is not contiguous; sharpness-aware steps write into a flat view of it. "
                         "Call .contiguous() on the parameter's data before building the optimizer.")
    return tensor.view(-1)


class TensorShards:
    """Full parameters held by this process (single process, or DDP where grads are already averaged)."""

    def __init__(self, names: Sequence[str], params: Sequence[Tensor], candidates: Sequence[bool],
                 optimizer: Any = None) -> None:
        self.params = list(params)
        self.optimizer = optimizer  # its per-parameter state holds the first moment (held, not its state dict,
        # which load_state_dict replaces)
        self.pieces = [Piece(name, i, p.numel(), 0, p.numel(), cand)
                       for i, (name, p, cand) in enumerate(zip(names, params, candidates))]
        # this process holds the whole gradient, so reductions stay local
        self.comm: Comm = LocalComm()
        self._applied: list[UndoablePerturbation | None] = []

    @staticmethod
    def _compute_dtype(t: Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def grads(self) -> list[Tensor | None]:
        return [None if p.grad is None else flat_view(p.grad, "a gradient").to(self._compute_dtype(p))
                for p in self.params]

    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        for p, g in zip(self.params, grads):
            if g is not None and p.grad is not None and g.data_ptr() != p.grad.data_ptr():
                p.grad.copy_(g.view_as(p.grad))

    def weights(self) -> list[Tensor]:
        return [flat_view(p.detach(), "a parameter").to(self._compute_dtype(p)) for p in self.params]

    @torch.no_grad()
    def apply_perturbation(self, deltas: Sequence[tuple[Tensor | None, Tensor | None]]) -> None:
        if self._applied:
            raise RuntimeError("apply_perturbation called twice without remove_perturbation in between")
        self._applied = [None if delta is None
                         else UndoablePerturbation(flat_view(p.data, "a parameter"), delta, support)
                         for p, (delta, support) in zip(self.params, deltas)]

    @torch.no_grad()
    def remove_perturbation(self) -> None:
        for applied in self._applied:
            if applied is not None:
                applied.remove()
        self._applied = []

    def first_moments(self) -> list[Tensor | None]:
        if self.optimizer is None:
            raise RuntimeError("these shards were built without the base optimizer, whose state holds the first "
                               "moment; pass optimizer= to TensorShards")
        state: Mapping[Tensor, dict] = self.optimizer.state
        return [None if state.get(p, {}).get(FIRST_MOMENT) is None else flat_view(state[p][FIRST_MOMENT], "exp_avg")
                for p in self.params]

    def perturbation_nbytes(self) -> int:
        return sum(a.nbytes() for a in self._applied if a is not None)
