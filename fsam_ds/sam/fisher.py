"""Exact global top-k over values spread across tensors and processes, without gathering them.

The Fisher mask keeps the `int(N * keep_ratio)` largest Fisher scores among all N candidate
entries of the model (FSAM, Zhong et al. 2022, Sec. 3.2: the mask is global, not per tensor). On a
ZeRO shard each rank holds only part of the scores, so the threshold is found by radix selection:
four passes over the 32-bit order key of the scores, each pass building a 256-bin histogram of the
next byte among the entries still in play and summing it across ranks (2 KiB per all-reduce).
Ties at the threshold are broken by the smaller global index (parameter order, then position in
the flattened parameter), found the same way, so the mask is identical on any sharding.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from fsam_ds.sam.shards import Comm

_RADIX_BITS = 8
_BINS = 1 << _RADIX_BITS


def order_key(values: Tensor) -> Tensor:
    """Maps float32 values to int64 keys in [0, 2^32) with the same order (-0.0 counts as +0.0)."""
    bits = (values.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    magnitude = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, magnitude + (1 << 31), (1 << 31) - 1 - magnitude)


def _radix_threshold(keys_of: Callable[[], Iterator[Tensor]], k: int, bits: int, comm: Comm,
                     largest: bool) -> tuple[int, int, int]:
    """Finds the key T of the k-th best entry over all ranks.

    `keys_of` yields the local key tensors (recomputed per pass so only one piece's keys exist at a
    time). Returns (T, number of entries strictly better than T, number of entries equal to T).
    """
    prefix, remaining, ties = 0, k, 0
    for shift in range(bits - _RADIX_BITS, -1, -_RADIX_BITS):
        histogram = torch.zeros(_BINS, dtype=torch.int64)
        for keys in keys_of():
            if shift + _RADIX_BITS < bits:
                keys = keys[(keys >> (shift + _RADIX_BITS)) == prefix]
            histogram += torch.bincount(((keys >> shift) & (_BINS - 1)).cpu(), minlength=_BINS)
        comm.all_reduce(histogram)
        ordered = histogram.flip(0) if largest else histogram
        cumulative = ordered.cumsum(0)
        position = int(torch.searchsorted(cumulative, torch.tensor(remaining), right=False))
        digit = _BINS - 1 - position if largest else position
        remaining -= int(cumulative[position] - ordered[position])
        ties = int(ordered[position])
        prefix = (prefix << _RADIX_BITS) | digit
    return prefix, k - remaining, ties


def global_topk(values: Sequence[Tensor], base_index: Sequence[int], k: int, comm: Comm,
                total: int | None = None, index_bits: int | None = None) -> list[Tensor]:
    """Boolean masks selecting exactly the k largest entries among all ranks' `values`.

    Args:
        values: flat float tensors held by this rank.
        base_index: global index of the first entry of each tensor (ties go to the smaller index).
        k: how many entries to select over all ranks.
        comm: all-reduce across the ranks that share the selection.
        total: the global number of entries, if the caller already knows it.
        index_bits: bits spanned by the global indices (default: enough for 0 .. total - 1).
    """
    if total is None:
        count = torch.tensor([sum(v.numel() for v in values)], dtype=torch.int64)
        total = int(comm.all_reduce(count))
    if k <= 0:
        return [torch.zeros(v.numel(), dtype=torch.bool, device=v.device) for v in values]
    if k >= total:
        return [torch.ones(v.numel(), dtype=torch.bool, device=v.device) for v in values]

    def score_keys() -> Iterator[Tensor]:
        return (order_key(v.reshape(-1)) for v in values)

    threshold, better, ties = _radix_threshold(score_keys, k, 32, comm, largest=True)
    needed = k - better
    if needed == ties:
        return [order_key(v.reshape(-1)) >= threshold for v in values]

    def tie_positions() -> Iterator[Tensor]:
        return ((order_key(v.reshape(-1)) == threshold).nonzero().squeeze(1) + base
                for v, base in zip(values, base_index))

    index_bits = index_bits or max(total - 1, 1).bit_length()
    index_bits = (index_bits + _RADIX_BITS - 1) // _RADIX_BITS * _RADIX_BITS
    last_index, _, _ = _radix_threshold(tie_positions, needed, index_bits, comm, largest=False)
    masks = []
    for v, base in zip(values, base_index):
        keys = order_key(v.reshape(-1))
        mask = keys > threshold
        tied = (keys == threshold).nonzero().squeeze(1)
        mask[tied[tied + base <= last_index]] = True
        masks.append(mask)
    return masks
