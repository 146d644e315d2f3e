"""What the trainer computes around the step: the per-example loss, dev metrics across ranks, and
the Fisher mask's density per layer."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from fsam_ds.sam.shards import unpack_bits
from fsam_ds.trainer.tasks import TaskSpec, compute_metrics

LossFn = Callable[[Any, Mapping[str, Tensor]], Tensor]


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(engine: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Logits in fp32 (whatever the model's dtype) and the labels, on the engine's device."""
    batch = _to_device(batch, engine.device)
    labels = batch.pop("labels")
    return engine(**batch).logits.float(), labels


def _losses(logits: Tensor, labels: Tensor, regression: bool) -> Tensor:
    if regression:  # one output, mean squared error, as the Hugging Face head computes it
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none")
    return F.cross_entropy(logits, labels, reduction="none")


def per_example_loss(regression: bool) -> LossFn:
    """`loss_fn(engine, batch)` for SAMEngine.train_step: one loss per example (ESAM ranks them)."""

    def loss_fn(engine: Any, batch: Mapping[str, Tensor]) -> Tensor:
        logits, labels = _forward(engine, batch)
        return _losses(logits, labels, regression)

    return loss_fn


def _gather(local: Any) -> list[Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


@torch.no_grad()
def _predict(engine: Any, loader: DataLoader, regression: bool) -> tuple[Tensor, Tensor, Tensor]:
    logits, labels, losses = [], [], []
    for batch in loader:
        out, gold = _forward(engine, batch)
        logits.append(out.cpu())
        labels.append(gold.cpu())
        losses.append(_losses(out, gold, regression).cpu())
    # the evaluation sampler pads every rank's shard to the same length (ZeRO-3 needs the same
    # number of forward passes everywhere); the padding is not part of the dev set
    keep = loader.sampler.num_real
    return torch.cat(logits)[:keep], torch.cat(labels)[:keep], torch.cat(losses)[:keep]


def evaluate(engine: Any, loaders: Mapping[str, DataLoader], task: TaskSpec) -> dict[str, dict[str, float]]:
    """Each dev split's metrics plus its mean loss; collective, every rank gets the same result."""
    was_training = engine.training
    engine.eval()
    results: dict[str, dict[str, float]] = {}
    try:
        for split, loader in loaders.items():
            parts = _gather(_predict(engine, loader, task.is_regression))
            logits, labels, losses = (torch.cat([p[i] for p in parts]) for i in range(3))
            metrics = compute_metrics(task, logits, labels)
            metrics["loss"] = float(losses.double().mean())
            results[split] = metrics
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


def mask_density_by_layer(sam_engine: Any, names: list[str], base_prefix: str = "") -> dict[str, float]:
    """Fraction of each layer's Fisher-candidate entries that the current mask keeps.

    Collective: every rank counts its own pieces, one all-reduce sums them. Under ZeRO stage 0 each
    rank holds every piece in full, which scales numerator and denominator alike.
    """
    core = sam_engine.core
    counts = torch.zeros(len(names), 2, dtype=torch.float64)
    if core.fisher_mask is not None:
        for piece, packed in zip(core.pieces, core.fisher_mask):
            if packed is not None:
                counts[piece.index, 0] += float(unpack_bits(packed, piece.size).sum())
                counts[piece.index, 1] += piece.size
    sam_engine.data_comm.all_reduce(counts)
    kept: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    for name, (ones, size) in zip(names, counts.tolist()):
        if size > 0:
            layer = layer_of(name, base_prefix)
            kept[layer] += ones
            total[layer] += size
    return {layer: kept[layer] / total[layer] for layer in total}
