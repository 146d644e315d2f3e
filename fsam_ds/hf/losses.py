"""Per-example losses of a transformers model's outputs: what the SAM step averages under the Trainer.

The SAM step (`fsam_ds.sam.driver.two_pass_step`) takes one loss per example, averages them over
each micro-batch, then over the step's micro-batches and the ranks: the mean over the global
batch's examples. ESAM needs exactly this shape, since it ranks examples by how much their loss rises
at w + e. The losses below are read off the logits and `labels` by the model's `loss_type` (the
same key transformers uses to pick the model's own loss):

* sequence classification (text, image, audio, video): cross-entropy per example, squared error
  (mean over outputs) for regression, binary cross-entropy (mean over labels) for multi-label;
* token classification and masked LM: the mean cross-entropy over each sequence's labelled tokens
  (label -100 is ignored), one value per sequence;
* causal LM (and decoder-only "ConditionalGeneration"; a class transformers lists as a causal LM
  without saying so in its name, such as GPT2LMHeadModel, too): the same after shifting the labels
  one token left (or `shift_labels` when the collator provides them), as transformers' own loss does.

How this relates to the Trainer's own normalisation. For classification, the mean per example is
the model's own loss and the mean the Trainer intends. (Trainer 5.23 passes `num_items_in_batch` to
any model whose forward takes `**kwargs`; BERT-style classifiers ignore it and return a batch mean,
which the Trainer then treats as already normalised over the accumulation window and multiplies by the
number of processes, so its logged loss and gradient are that many times the mean. This module does
not copy that scale.) For token losses the Trainer, given `num_items_in_batch`, divides the sum of
all token losses of the step, over micro-batches and ranks, by their count: every token weighs the
same. Here every sequence weighs the same (its token mean, then the mean over sequences), which
ESAM needs to rank sequences. The two are equal when every sequence has the same number of labelled
tokens; otherwise a short sequence's tokens weigh more. A sequence with no labelled token counts as
a loss of 0.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100

OutputsLoss = Callable[[Any, Mapping[str, Any]], Tensor]
"""(model outputs, the micro-batch's inputs) -> per-example losses, a 1-D tensor [batch]."""

_SEQUENCE_LOSS_TYPES = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification",
                        "ForVideoClassification")
_TOKEN_LOSS_TYPES = ("ForTokenClassification", "ForMaskedLM")
_NEXT_TOKEN_LOSS_TYPES = ("ForCausalLM", "ForConditionalGeneration")


def outputs_loss_for(model: torch.nn.Module) -> OutputsLoss | None:
    """The per-example loss of `model`'s outputs, or None where its `loss_type` is none of the above."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    loss_type = getattr(model, "loss_type", None)
    config = getattr(model, "config", None)
    if loss_type is None and type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        loss_type = "ForCausalLM"  # a causal LM whose class name does not say so (GPT2LMHeadModel)
    if loss_type in _SEQUENCE_LOSS_TYPES:
        return partial(sequence_loss, config=config)
    if loss_type in _TOKEN_LOSS_TYPES:
        return partial(token_loss, shift=False)
    if loss_type in _NEXT_TOKEN_LOSS_TYPES:
        # encoder-decoders score the decoder's logits against the labels as they are (the Trainer's rule too)
        return partial(token_loss, shift=not getattr(config, "is_encoder_decoder", False))
    return None


def _logits(outputs: Any) -> Tensor:
    logits = outputs["logits"] if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    if logits is None:
        raise ValueError(f"the model returned {type(outputs).__name__} without `logits`; the SAM step reads the "
                         "per-example losses off the logits. Pass sam_loss_fn=(model, inputs) -> per-example losses.")
    return logits.float()


def sequence_loss(outputs: Any, inputs: Mapping[str, Any], config: Any) -> Tensor:
    """One loss per example of a sequence (or image, audio) classifier, by its problem type."""
    logits, labels = _logits(outputs), inputs["labels"]
    num_labels = logits.shape[-1]
    problem = getattr(config, "problem_type", None)
    if problem is None:  # transformers' rule, which the model applies on its first forward with labels
        problem = ("regression" if num_labels == 1 else "single_label_classification"
                   if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1), reduction="none")
    if problem == "regression":
        return (logits.view(labels.shape[0], -1) - labels.float().view(labels.shape[0], -1)).square().mean(dim=1)
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none").mean(dim=1)
    raise ValueError(f"unknown problem_type {problem!r} in the model's config")


def token_loss(outputs: Any, inputs: Mapping[str, Any], shift: bool) -> Tensor:
    """The mean cross-entropy over each sequence's labelled tokens: one loss per sequence."""
    logits = _logits(outputs)
    if "shift_labels" in inputs:  # a padding-free collator's targets, already aligned with the logits
        targets = inputs["shift_labels"]
    elif shift:
        targets = F.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
    else:
        targets = inputs["labels"]
    tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(targets.shape)
    labelled = targets.ne(IGNORE_INDEX)
    return tokens.sum(dim=-1) / labelled.sum(dim=-1).clamp(min=1)
