"""Shard access for each DeepSpeed ZeRO stage, behind `fsam_ds.sam.shards.ShardAccess`.

What each stage owns and how e reaches the weights of the next forward pass:

* stage 0: every rank holds full parameters and the already averaged full gradient (`p.grad`).
  Each rank computes the same mask and e; the weights are restored exactly before `engine.step()`.
* stages 1/2: every rank holds full low-precision replicas of the weights, but only its fragment of
  the averaged gradient and of the fp32 master (`param._hp_mapping`, DeepSpeed's link between the
  two). Scores, mask and e are computed on the fragment; e reaches the replicas through one
  all-reduce of a buffer in the weights' dtype (each entry non-zero on exactly one rank, so the sum
  is exact). `engine.step()` rewrites the replicas from the fp32 master, which is the restore.
* stage 3: every rank holds `p.ds_tensor`, its partition of the weights, and its partition of the
  fp32 gradient (`safe_get_local_grad`). e is added to the partition; parameters that are
  materialised at that moment (persistent small ones, or still gathered) also get the full e.
  `engine.step()` rewrites partitions (and persistent parameters) from the master.

Under ZeRO-Offload (`fsam_ds.zero.offload`) the same reads and writes reach CPU buffers: the fp32
master and its gradient (optimizer offload), and `ds_tensor` itself (parameter offload).

MSAM reads the base optimizer's first moment where the optimizer keeps it: stage 0, the torch
optimizer's state of each parameter; stages 1/2, its state of the rank's flat fp32 partition (the
param group's only tensor), at the fragment's `hp_fragment_address`; stage 3,
`safe_get_local_optimizer_state`. Before DeepSpeed's first update there is no state at stages 1-3.

When a step is skipped (overflow) the master was not applied, so stages 1-3 restore the weights
from it explicitly (`restore_from_master`).
"""

from __future__ import annotations

import warnings
from typing import Protocol, Sequence

import torch
from torch import Tensor

from fsam_ds.sam.config import ConfigError
from fsam_ds.sam.shards import FIRST_MOMENT, Comm, Piece, ShardAccess, TensorShards
from fsam_ds.zero.offload import optimizer_offloaded, restart_offloaded_accumulation

# Elements per all-reduce when the replicated weights receive e or the master (stages 1/2).
_BUCKET_ELEMENTS = 1 << 23
# Why MSAM reads the torch optimizer inside DeepSpeed's.
_MOMENT = "to read the base optimizer's first moment (msam types)"
# Why stages 1/2 under offload_optimizer write DeepSpeed's per-parameter gradient norms.
_CLIP_NORMS = "under offload_optimizer so that gradient clipping measures GSAM's corrected gradient"


class UnsupportedConfiguration(ConfigError):
    """A DeepSpeed setting the SAM-family step cannot run with; the message says what to change."""


class EngineShards(ShardAccess, Protocol):
    """What the engine's step needs beyond `ShardAccess`, implemented by every stage's adapter."""

    def loss_scale(self) -> float:
        """fp16's current loss scale (1 otherwise); gradients are read and written unscaled."""

    def restore_from_master(self) -> None:
        """Puts the weights back from the fp32 master after a step that did not apply it (perturbed
        weights that no `engine.step()` rewrote)."""

    def zero_grads(self) -> None:
        """Clears what `engine.optimizer.zero_grad()` leaves of the gradient between the passes."""


_MISSING = object()
TESTED_DEEPSPEED = (0, 19)
"""The DeepSpeed release series whose internals the adapters read (deepspeed>=0.19.8,<0.20 in pyproject.toml)."""


def _private(obj: object, attribute: str, what: str,
             purpose: str = "to reach the rank's gradient fragment") -> object:
    """Reads a DeepSpeed attribute that is not part of its public API, with a clear error if it moved."""
    value = getattr(obj, attribute, _MISSING)
    if value is _MISSING:
        raise RuntimeError(deepspeed_moved(f"has no `{attribute}` on {what}", f"uses it {purpose}",
                                           "use ZeRO stage 0 or 3"))
    return value


def deepspeed_moved(found: str, use: str, otherwise: str = "") -> str:
    """The message for a DeepSpeed internal that is not where the tested release series keeps it:
    "DeepSpeed <version> `found`; fsam-ds `use` (tested with ...). Install ... or `otherwise`."."""
    import deepspeed

    alternative = f" or {otherwise}" if otherwise else ""
    return (f"DeepSpeed {deepspeed.__version__} {found}; fsam-ds {use} (tested with DeepSpeed "
            f"{'.'.join(map(str, TESTED_DEEPSPEED))}.x). Install deepspeed>=0.19.8,<0.20{alternative}.")


def zero3_partition(p: Tensor, rank: int) -> tuple[int, int]:
    """The flat range of ZeRO-3 parameter `p` that partition `rank` holds: its `p.ds_tensor` holds
    elements [offset, offset + size) of the flattened parameter, then padding up to an equal share."""
    for attribute in ("ds_tensor", "ds_numel"):
        _private(p, attribute, "a ZeRO-3 parameter")
    partition = p.ds_tensor.numel()
    offset = rank * partition
    return offset, max(0, min(partition, p.ds_numel - offset))


class _EngineShards:
    """What the stage 1/2 and 3 adapters share: the loss scale, unscaled reads, bucketed full writes."""

    def __init__(self, engine, params: Sequence[Tensor], comm: Comm) -> None:
        self.engine = engine
        self.params = list(params)
        self.comm = comm
        self.pieces: list[Piece] = []
        self._owners: list[Tensor] = []  # the parameter behind each piece

    def loss_scale(self) -> float:
        return float(self.engine.optimizer.loss_scale) if self.engine.fp16_enabled() else 1.0

    def _require_master_apart(self, weights_of, master_of) -> None:  # noqa: ANN001 - parameter -> tensor
        """Refuses a layout where the fp32 master is the weights' own memory.

        The restore is the base step (or `restore_from_master`) writing the master back into the weights,
        which is exact only while the master was not perturbed with them. DeepSpeed 0.19.8 keeps the
        master apart at every stage and precision (at stage 3 with fp32 weights it means to share the
        memory, but compares a torch.device with a device name and never does); a DeepSpeed that shares
        would make every step start from the perturbed weights, silently."""
        for p in self._owners:
            master = master_of(p)
            if master is not None and master.untyped_storage().data_ptr() == \
                    weights_of(p).untyped_storage().data_ptr():
                import deepspeed

                raise UnsupportedConfiguration(
                    f"DeepSpeed {deepspeed.__version__} keeps the fp32 master of the weights in the weights' own "
                    "memory (fp32 weights at this ZeRO stage), so the sharpness-aware step could not put the "
                    "weights back after perturbing them. Install deepspeed>=0.19.8,<0.20, or train with "
                    "precision bf16 or with sam_type none.")

    def _unscaled(self, grad: Tensor | None) -> Tensor | None:
        if grad is None:
            return None
        scale = self.loss_scale()
        grad = grad.reshape(-1).float()
        return grad / scale if scale != 1.0 else grad

    def remove_perturbation(self) -> None:
        """Nothing to do: `engine.step()` copies the fp32 master back into the weights."""

    def zero_grads(self) -> None:
        """Nothing beyond the optimizer's zero_grad (stages 1/2 override it)."""

    def _write_full(self, targets: Sequence[tuple[Tensor, int, bool]],
                    pieces_of: dict[int, list[tuple[Piece, Tensor]]], add: bool) -> None:
        """Assembles full parameters from the pieces every rank holds and adds them to (or copies them
        into) the parameters' data. `targets` lists (parameter, full numel, write here?) identically
        on every rank; one all-reduce per bucket."""
        bucket: list[tuple[Tensor, int, bool]] = []
        size = 0
        for target in list(targets) + [None]:
            if target is not None:
                bucket.append(target)
                size += target[1]
            if bucket and (target is None or size >= _BUCKET_ELEMENTS):
                dtype = bucket[0][0].dtype
                buffer = torch.zeros(size, dtype=dtype, device=bucket[0][0].device)
                start = 0
                for q, numel, _ in bucket:
                    for piece, value in pieces_of.get(id(q), []):
                        buffer[start + piece.offset: start + piece.offset + piece.size] = value.to(dtype)
                    start += numel
                self.comm.all_reduce(buffer)
                start = 0
                for q, numel, write in bucket:
                    if write:
                        full = buffer[start: start + numel].view_as(q.data)
                        if add:
                            q.data.copy_(q.data.float().add_(full.float()))
                        else:
                            q.data.copy_(full)
                    start += numel
                bucket, size = [], 0


class Stage0Shards(TensorShards):
    """ZeRO stage 0: full parameters and full averaged gradients, exactly like one process, so parameter
    reductions stay local (fp16, which would need unscaling, is refused)."""

    def loss_scale(self) -> float:
        return 1.0

    def restore_from_master(self) -> None:
        self.remove_perturbation()

    def zero_grads(self) -> None:
        """Nothing beyond the optimizer's zero_grad: the gradients are the parameters' `.grad`."""


class PartitionShards(_EngineShards):
    """ZeRO stages 1/2: the rank's fragment of the averaged gradient and of the fp32 master."""

    def __init__(self, engine, names, params, candidates, comm) -> None:
        super().__init__(engine, params, comm)
        import deepspeed

        version = tuple(int(x) for x in deepspeed.__version__.split(".")[:2] if x.isdigit())
        if version != TESTED_DEEPSPEED:
            warnings.warn(f"fsam-ds reaches ZeRO-1/2 gradient fragments through DeepSpeed's `_hp_mapping`, "
                          f"tested with DeepSpeed 0.19.x; this is {deepspeed.__version__}. The equivalence tests "
                          "(pytest tests/test_zero_equivalence.py) tell whether it still holds.", stacklevel=2)
        for i, (n, p, c) in enumerate(zip(names, params, candidates)):
            mapping = _private(p, "_hp_mapping", "a ZeRO-1/2 parameter")
            if mapping is None:
                continue  # no fragment of this parameter lives on this rank
            address = mapping.lp_fragment_address
            self.pieces.append(Piece(n, i, p.numel(), address.start, address.numel, c))
            self._owners.append(p)
        # under offload_optimizer the fragments below are views of the CPU fp32 master and its gradient
        self._offloaded = optimizer_offloaded(engine)
        if self._offloaded:
            for attribute in ("norm_for_param_grads", "get_param_id"):
                _private(engine.optimizer, attribute, "the ZeRO-1/2 optimizer", _CLIP_NORMS)
        self._require_master_apart(lambda p: p.data, lambda p: p._hp_mapping.hp_fragment)

    def _fragment(self, p: Tensor) -> Tensor | None:
        index = _private(p, "_index_in_param_group", "a ZeRO-1/2 parameter")
        try:
            fragment = p._hp_mapping.get_lp_grad_fragment(index)
        except (KeyError, IndexError, ValueError, TypeError):
            return None
        if fragment is None:
            return None
        fragment = fragment.reshape(-1)
        if fragment.numel() == p.numel() and p._hp_mapping.lp_fragment_address.numel != p.numel():
            # bf16 with fp32 accumulation keeps the whole gradient; the fragment is our slice of it
            address = p._hp_mapping.lp_fragment_address
            fragment = fragment.narrow(0, address.start, address.numel)
        return fragment

    def grads(self) -> list[Tensor | None]:
        return [self._unscaled(self._fragment(p)) for p in self._owners]

    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        scale = self.loss_scale()
        written = []
        for p, g in zip(self._owners, grads):
            fragment = self._fragment(p)
            if g is not None and fragment is not None:
                fragment.copy_((g * scale).to(fragment.dtype))
                written.append((p, fragment))
        if self._offloaded:
            self._record_offloaded_norms(written)

    def _record_offloaded_norms(self, written: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Makes an offloaded optimizer clip with the gradient as rewritten, not as the backward left it.

        Under offload_optimizer DeepSpeed 0.19.8's `step()` never measures the gradient it steps with:
        at the accumulation boundary of each backward, `copy_grads_in_partition` stores the norm of
        every parameter's loss-scaled fragment in `norm_for_param_grads`; `step()` sums their squares
        over the data-parallel group (`scaled_global_norm` ->
        `complete_grad_norm_calculation_for_cpu_offload`) into the norm that `unscale_and_clip_grads`
        clips with and `get_global_grad_norm` reports. A fragment rewritten after the backward (GSAM's
        correction) would be clipped with the norm of the gradient it replaced (tests/test_zero_offload.py
        fails without this). Each rewritten fragment's norm is stored again, computed as DeepSpeed does."""
        from deepspeed.runtime.zero.utils import get_norm_dtype

        optimizer = self.engine.optimizer
        norms = _private(optimizer, "norm_for_param_grads", "the ZeRO-1/2 optimizer", _CLIP_NORMS)
        param_id = _private(optimizer, "get_param_id", "the ZeRO-1/2 optimizer", _CLIP_NORMS)
        dtype = get_norm_dtype()
        for p, fragment in written:
            norms[param_id(p)] = fragment.to(dtype).norm(2)

    def zero_grads(self) -> None:
        """Clears the fragments between the passes (bf16 with fp32 accumulation keeps them otherwise)."""
        for p in self._owners:
            fragment = self._fragment(p)
            if fragment is not None:
                fragment.zero_()
        if self._offloaded:
            restart_offloaded_accumulation(self.engine.optimizer)

    def weights(self) -> list[Tensor]:
        return [p._hp_mapping.hp_fragment.reshape(-1).float() for p in self._owners]

    def first_moments(self) -> list[Tensor | None]:
        """Read from the torch optimizer's state of the flat partition, not through `_hp_mapping`'s
        `get_optim_state_fragment`: DeepSpeed 0.19.8 links those fragments only after its first step and
        not again after `load_checkpoint` (which replaces the mappings), so they are missing after a resume."""
        torch_optimizer = _private(self.engine.optimizer, "optimizer", "the ZeRO-1/2 optimizer", _MOMENT)
        out = []
        for p, piece in zip(self._owners, self.pieces):
            mapping = p._hp_mapping
            flat = torch_optimizer.param_groups[mapping.param_group_index]["params"][0]
            if flat.untyped_storage().data_ptr() != mapping.hp_fragment.untyped_storage().data_ptr():
                raise RuntimeError(deepspeed_moved(f"keeps {piece.name}'s fp32 fragment outside its param group's "
                                                   "flat partition", f"reads it there {_MOMENT}"))
            moment = torch_optimizer.state.get(flat, {}).get(FIRST_MOMENT)
            address = mapping.hp_fragment_address
            out.append(None if moment is None else moment.narrow(0, address.start, address.numel))
        return out

    @torch.no_grad()
    def apply_perturbation(self, deltas) -> None:
        pieces_of: dict[int, list[tuple[Piece, Tensor]]] = {}
        for p, piece, (delta, _) in zip(self._owners, self.pieces, deltas):
            if delta is not None:
                pieces_of.setdefault(id(p), []).append((piece, delta))
        self._write_full([(p, p.numel(), True) for p in self.params], pieces_of, add=True)

    @torch.no_grad()
    def restore_from_master(self) -> None:
        pieces_of = {id(p): [(piece, p._hp_mapping.hp_fragment.reshape(-1))]
                     for p, piece in zip(self._owners, self.pieces)}
        self._write_full([(p, p.numel(), True) for p in self.params], pieces_of, add=False)


class Stage3Shards(_EngineShards):
    """ZeRO stage 3: the rank's partition `ds_tensor` of every parameter and its fp32 gradient."""

    def __init__(self, engine, names, params, candidates, comm) -> None:
        super().__init__(engine, params, comm)
        for i, (n, p, c) in enumerate(zip(names, params, candidates)):
            _private(p, "ds_status", "a ZeRO-3 parameter")
            offset, size = zero3_partition(p, comm.rank)
            self.pieces.append(Piece(n, i, p.ds_numel, offset, size, c))
            self._owners.append(p)
        from deepspeed.utils import safe_get_local_fp32_param

        self._require_master_apart(lambda p: p.ds_tensor, safe_get_local_fp32_param)

    def grads(self) -> list[Tensor | None]:
        from deepspeed.utils import safe_get_local_grad

        out = []
        for p, piece in zip(self._owners, self.pieces):
            g = safe_get_local_grad(p)
            out.append(None if g is None else self._unscaled(g.reshape(-1)[: piece.size]))
        return out

    def set_grads(self, grads: Sequence[Tensor | None]) -> None:
        from deepspeed.utils import safe_set_local_grad

        scale = self.loss_scale()
        for p, piece, g in zip(self._owners, self.pieces, grads):
            if g is None:
                continue
            padded = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=g.device)
            padded[: piece.size] = g * scale
            safe_set_local_grad(p, padded)

    def weights(self) -> list[Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param

        return [safe_get_local_fp32_param(p).reshape(-1)[: piece.size].float()
                for p, piece in zip(self._owners, self.pieces)]

    def first_moments(self) -> list[Tensor | None]:
        from deepspeed.utils import safe_get_local_optimizer_state

        out = []
        for p, piece in zip(self._owners, self.pieces):
            try:
                moment = safe_get_local_optimizer_state(p, FIRST_MOMENT)
            except KeyError:  # DeepSpeed creates the state at the optimizer's first step
                moment = None
            out.append(None if moment is None else moment.reshape(-1)[: piece.size])
        return out

    def _materialised(self) -> list[tuple[Tensor, int, bool]]:
        """Parameters whose full data the next forward uses as it is (not re-gathered from the
        partitions), as `_write_full` targets: the same list on every rank, written where available."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        here = [p.ds_status == ZeroParamStatus.AVAILABLE for p in self._owners]
        flags = torch.tensor([float(a) for a in here])
        self.comm.all_reduce(flags)
        return [(p, p.ds_numel, a) for p, a, f in zip(self._owners, here, flags.tolist()) if f > 0]

    @torch.no_grad()
    def apply_perturbation(self, deltas) -> None:
        pieces_of: dict[int, list[tuple[Piece, Tensor]]] = {}
        for p, piece, (delta, _) in zip(self._owners, self.pieces, deltas):
            if delta is None:
                continue
            local = p.ds_tensor.view(-1)[: piece.size]
            # under offload_optimizer delta is on the CPU, next to the gradient, and ds_tensor on the device.
            # e is rounded to the weights' dtype first, as `_write_full` sends it to the materialised copies:
            # otherwise a bf16 partition (w + e rounded once) and a parameter left gathered (w + e rounded
            # twice) would disagree, and the second pass would see one or the other depending on which
            # parameters happen to be gathered (after a checkpoint load, not the same ones)
            local.copy_(local.float().add_(delta.to(device=local.device, dtype=local.dtype).float()))
            pieces_of[id(p)] = [(piece, delta)]
        # every rank takes part in the all-reduces of the materialised parameters, with or without pieces
        self._write_full(self._materialised(), pieces_of, add=True)

    @torch.no_grad()
    def restore_from_master(self) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        pieces_of = {}
        for p, piece in zip(self._owners, self.pieces):
            master = safe_get_local_fp32_param(p).reshape(-1)[: piece.size]
            p.ds_tensor.view(-1)[: piece.size].copy_(master)
            pieces_of[id(p)] = [(piece, master)]
        self._write_full(self._materialised(), pieces_of, add=False)


def shards_for_engine(engine, names: Sequence[str], params: Sequence[Tensor], candidates: Sequence[bool],
                      comm: Comm) -> EngineShards:
    """The shard adapter for the engine's ZeRO stage; `comm` is the data-parallel group's."""
    stage = engine.zero_optimization_stage()
    if stage == 0:
        return Stage0Shards(names, params, candidates, engine.optimizer)
    if stage in (1, 2):
        return PartitionShards(engine, names, params, candidates, comm)
    if stage == 3:
        return Stage3Shards(engine, names, params, candidates, comm)
    raise UnsupportedConfiguration(f"ZeRO stage {stage} is not supported; use stage 0, 1, 2 or 3.")
