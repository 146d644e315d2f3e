"""What `SAMTrainerMixin` knows about TRL's trainers (TRL 1.16), read off their classes: TRL is never imported here.

* `SFTTrainer`, `DPOTrainer`, `KTOTrainer`, `RewardTrainer`: their `training_step` only enters
  `maybe_activation_offload_context`, which the SAM step enters itself. Non-ESAM types run with the
  trainer's own `compute_loss` (one value per micro-batch, on the Trainer's scale).
* ESAM ranks examples by their loss. `SFTTrainer`'s loss is a sum of token losses, so it has one value per
  sequence (`sft_sequence_losses`); `DPOTrainer`'s is one value per (chosen, rejected) pair inside
  `compute_loss`, over a batch that holds the chosen rows, then the rejected ones: selecting rows would
  split pairs, and the pair losses are not returned. Refused for DPO, KTO and reward models.
* `GRPOTrainer`, `RLOOTrainer`, `DistillationTrainer`: their `training_step` counts the steps that decide
  when to generate new completions and when to reuse them; refused.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

OFFLOAD_CONTEXT_ONLY = frozenset({"SFTTrainer", "DPOTrainer", "KTOTrainer", "RewardTrainer"})
GENERATING = frozenset({"GRPOTrainer", "RLOOTrainer", "DistillationTrainer"})
KNOWN = OFFLOAD_CONTEXT_ONLY | GENERATING
PAIRED = {"DPOTrainer": "DPOTrainer's loss is one value per (chosen, rejected) pair, computed inside its "
                        "compute_loss over a batch of the chosen rows followed by the rejected rows (selecting "
                        "rows would split pairs) and never returned per pair",
          "KTOTrainer": "KTOTrainer's loss mixes each example with a KL estimate over the whole batch, inside its "
                        "compute_loss",
          "RewardTrainer": "RewardTrainer's loss is one value per (chosen, rejected) pair inside its compute_loss"}


def trl_name(cls: type) -> str | None:
    """`cls.__name__` where `cls` is one of TRL's own classes."""
    return cls.__name__ if cls.__module__.split(".")[0] == "trl" else None


def _trl_trainer(trainer: Any) -> str | None:
    """The name of the first of TRL's trainers known here in `trainer`'s MRO (`sam_trainer(SFTTrainer)` keeps
    TRL's module name, so the name is what tells them apart)."""
    return next((name for name in map(trl_name, type(trainer).__mro__) if name in KNOWN), None)


def only_enters_offload_context(cls: type) -> bool:
    return trl_name(cls) in OFFLOAD_CONTEXT_ONLY


def why_not_supported(cls: type) -> str | None:
    if trl_name(cls) in GENERATING:
        return (f"TRL's {cls.__name__} counts its steps there to decide when to generate completions and when to "
                "reuse them; it does not run under the SAM step. Use SFTTrainer or DPOTrainer on the generated data.")
    return None


def why_no_per_example_loss(trainer: Any) -> str | None:
    """Why `trainer`'s loss has no per-example values (None where that is not known here)."""
    name = _trl_trainer(trainer)
    if name in PAIRED:
        return PAIRED[name]
    if name == "SFTTrainer":
        return _sft_refusal(trainer)
    return None


def _sft_refusal(trainer: Any) -> str | None:
    args = trainer.args
    if trainer.padding_free:
        return ("SFTTrainer with padding_free (set by packing with packing_strategy 'bfd' or 'bfd_split') puts all "
                "sequences of a micro-batch into one row, and ESAM selects rows; set padding_free=False and "
                "packing=False, or packing_strategy='wrapped'")
    if trainer.compute_loss_func is not None or trainer.label_smoother is not None:
        return "SFTTrainer's loss here comes from compute_loss_func or label smoothing, one value per micro-batch"
    if getattr(trainer, "aux_loss_enabled", False):
        return "SFTTrainer adds the MoE router's auxiliary loss, one value per micro-batch"
    if args.loss_type not in ("nll", "dft"):
        return f"SFTTrainer's loss_type {args.loss_type!r} is not known here (nll and dft are)"
    return None


def per_example_loss(trainer: Any) -> Callable[[Any, Mapping[str, Any], Any, int], Tensor] | None:
    """The SAM step's per-example loss for `trainer` (an SFTTrainer whose loss allows one), else None."""
    if _trl_trainer(trainer) != "SFTTrainer" or _sft_refusal(trainer) is not None:
        return None

    def loss(engine: Any, inputs: Mapping[str, Any], num_items_in_batch: Any, count: int) -> Tensor:
        return sft_sequence_losses(engine, inputs, num_items_in_batch, count, trainer.args.loss_type,
                                   trainer.args.per_device_train_batch_size,
                                   trainer.accelerator.num_processes if trainer.args.average_tokens_across_devices
                                   else 1)
    return loss


def sft_sequence_losses(engine: Any, inputs: Mapping[str, Any], num_items_in_batch: Any, count: int, loss_type: str,
                        batch_size: int, ranks_counted: int) -> Tensor:
    """One loss per sequence whose mean over the step's examples and ranks is SFTTrainer's loss.

    SFTTrainer's loss of a micro-batch is the sum of its token losses (nll, or dft's probability-weighted
    nll) divided by `num_items_in_batch`, the labelled tokens of the whole window on all `ranks_counted`
    ranks, times `ranks_counted`; the Trainer adds the window's micro-batches up and DeepSpeed averages the
    ranks: the loss is the sum of all token losses over their count. The SAM step averages each
    micro-batch's values, then the window's micro-batches and the ranks, so sequence i gets its token sum
    times `count * batch_size * ranks_counted / num_items_in_batch`: the same loss, exactly when every
    micro-batch holds `batch_size` sequences (a short last batch weighs its sequences a little more).
    ESAM then ranks sequences by their share of the loss. The forward is TRL's fused LM head
    (`fused_lm_head=True`, which SFTTrainer patches in), as in SFTTrainer's own loss."""
    if num_items_in_batch is None:
        raise ValueError("SFTTrainer's per-sequence losses need the Trainer's num_items_in_batch (the labelled "
                         "tokens of the step), which it passes to a model whose forward takes **kwargs.")
    outputs = engine(**{**inputs, "use_cache": False}, fused_lm_head=True)
    per_token = -outputs.log_probs  # zero where the label is -100
    if loss_type == "dft":  # Dynamic Fine-Tuning weighs each token's loss by its (detached) probability
        per_token = per_token * outputs.log_probs.exp().detach()
    scale = count * batch_size * ranks_counted / torch.as_tensor(num_items_in_batch).clamp(min=1)
    return per_token.sum(dim=-1) * scale.to(per_token.device)
