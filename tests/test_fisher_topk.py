"""The global top-k selection behind the Fisher mask, against a sort-based reference."""

from __future__ import annotations

import pytest
import torch

from fsam_ds.sam.fisher import global_topk, order_key
from fsam_ds.sam.shards import LocalComm, pack_bits, unpack_bits


def reference(values: list[torch.Tensor], bases: list[int], k: int) -> list[torch.Tensor]:
    entries = []
    for t, (v, base) in enumerate(zip(values, bases)):
        for j, x in enumerate(v.tolist()):
            entries.append((-x, base + j, t, j))
    entries.sort()
    masks = [torch.zeros(v.numel(), dtype=torch.bool) for v in values]
    for _, _, t, j in entries[:k]:
        masks[t][j] = True
    return masks


@pytest.mark.parametrize("seed", range(6))
def test_topk_matches_sort_with_ties_and_negative_values(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(0, 40, (4,), generator=g)]
    # few distinct values: many ties, across tensors, including zeros and negatives
    values = [torch.randint(-3, 4, (n,), generator=g).float() * 0.5 for n in sizes]
    bases = []
    start = 0
    for n in sizes:
        bases.append(start)
        start += n
    total = sum(sizes)
    for k in {0, 1, total // 3, total // 2, total - 1, total}:
        got = global_topk(values, bases, k, LocalComm())
        assert sum(int(m.sum()) for m in got) == k
        for a, b in zip(got, reference(values, bases, k)):
            assert torch.equal(a, b)


def test_topk_on_spread_out_scales():
    g = torch.Generator().manual_seed(0)
    values = [torch.rand(1000, generator=g) * 1e-20, torch.rand(1000, generator=g) * 1e10,
              torch.rand(10, generator=g)]
    got = global_topk(values, [0, 1000, 2000], 1005, LocalComm())
    assert int(got[1].sum()) == 1000 and int(got[2].sum()) == 5 and int(got[0].sum()) == 0
    assert torch.equal(got[2], values[2] >= torch.topk(values[2], 5).values.min())


def test_order_key_is_monotonic():
    x = torch.tensor([-float("inf"), -3.0, -1e-30, -0.0, 0.0, 1e-38, 2.0, float("inf")])
    keys = order_key(x)
    assert torch.all(keys[1:] >= keys[:-1])
    assert keys[3] == keys[4]  # -0.0 ranks as +0.0


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 1001])
def test_bit_packing_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)
