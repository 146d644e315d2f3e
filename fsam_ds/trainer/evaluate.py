"""What the trainer computes around the step: dev metrics across ranks (through the task's
`Objective`) and the Fisher mask's density per layer."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader

from fsam_ds.trainer.objectives import Objective
from fsam_ds.zero.engine import EngineStepper


@torch.no_grad()
def _outputs(engine: Any, loader: DataLoader, objective: Objective) -> dict[str, Tensor]:
    rows: dict[str, list[Tensor]] = defaultdict(list)
    for batch in loader:
        for name, value in objective.eval_outputs(engine, batch).items():
            rows[name].append(value.cpu())
    # the evaluation sampler pads every rank's shard to the same length (ZeRO-3 needs the same
    # number of forward passes everywhere); the padding is not part of the dev set
    keep = loader.sampler.num_real
    return {name: torch.cat(values)[:keep] for name, values in rows.items()}


def evaluate(engine: Any, loaders: Mapping[str, DataLoader], objective: Objective) -> dict[str, dict[str, float]]:
    """Each dev split's metrics; collective, every rank gets the same result."""
    was_training = engine.training
    engine.eval()
    results: dict[str, dict[str, float]] = {}
    try:
        for split, loader in loaders.items():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, _outputs(engine, loader, objective))
            results[split] = objective.metrics({name: torch.cat([p[name] for p in parts]) for name in parts[0]})
    finally:
        engine.train(was_training)
    return results


def flatten_metrics(results: Mapping[str, Mapping[str, float]], select_split: str) -> dict[str, float]:
    """The selecting split's metrics under their own names, other splits' as `split/name`."""
    flat = dict(results[select_split])
    for split, metrics in results.items():
        if split != select_split:
            flat.update({f"{split}/{name}": value for name, value in metrics.items()})
    return flat


def is_better(value: float, best: float | None) -> bool:
    """Every task metric here is higher-is-better; an undefined (nan) metric never wins."""
    return math.isfinite(value) and (best is None or value > best)


# ------------------------------------------------------------------------------- mask density

_LAYER = re.compile(r"(?:^|\.)(layers?|blocks?|h)\.(\d+)\.")


def layer_of(name: str, base_prefix: str = "") -> str:
    """Groups parameter names by transformer layer ('layer.3') or top-level module ('embeddings')."""
    match = _LAYER.search(name)
    if match:
        return f"layer.{match.group(2)}"
    parts = name.split(".")
    if base_prefix and parts[0] == base_prefix and len(parts) > 1:
        parts = parts[1:]
    return parts[0]


def mask_density_by_layer(sam_engine: EngineStepper, names: list[str], base_prefix: str = "") -> dict[str, float]:
    """Fraction of each layer's Fisher-candidate entries that the current mask keeps (empty without a mask).

    Collective: every rank counts its own pieces, one all-reduce sums them. Under ZeRO stage 0 each
    rank holds every piece in full, which scales numerator and denominator alike.
    """
    counts = sam_engine.mask_counts()
    if counts is None:
        return {}
    kept: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    for name, (ones, size) in zip(names, counts.tolist()):
        if size > 0:
            layer = layer_of(name, base_prefix)
            kept[layer] += ones
            total[layer] += size
    return {layer: kept[layer] / total[layer] for layer in total}
