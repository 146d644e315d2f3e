"""Which tensors take part in the Fisher top-k: the rule by name and the rule by module type.

Embedding tables are left out of the mask's candidates because their Fisher scores concentrate on
the rows of the tokens in the batch, so they would take most of the mask on any one batch. A name
rule alone (`SAMConfig.candidate_exclude`) misses them when a model names them otherwise (GPT-2's
`wte`/`wpe`) and misses a decoder's output projection tied to the token embedding (`lm_head.weight`
is the embedding's own Parameter; `named_parameters()` lists it once, under whichever name comes
first). The module-type rule finds both, whatever the names.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from fsam_ds.sam.config import ConfigError, SAMConfig

__all__ = ["embedding_parameter_names", "fisher_candidates"]


def embedding_parameter_names(module: nn.Module) -> set[str]:
    """Every name under which `module` reaches an `nn.Embedding` weight or a parameter tied to one.

    Tied parameters are the same Parameter object, so identity finds them; a parameter partitioned by
    ZeRO-3 keeps its identity. All names of a shared tensor are returned, so the set matches
    `named_parameters()` whether or not duplicates are removed.
    """
    embedding_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return {name for name, p in module.named_parameters(remove_duplicate=False) if id(p) in embedding_weights}


def fisher_candidates(config: SAMConfig, names: Sequence[str], module: nn.Module | None = None) -> list[bool]:
    """Per name, whether the tensor is a Fisher candidate: its name matches no `candidate_exclude`
    pattern and, with `exclude_embeddings` and the `module` that owns the names, it is no embedding.
    A Fisher type with no candidate at all is refused here, before any step: its mask would be empty."""
    embeddings = embedding_parameter_names(module) if module is not None and config.exclude_embeddings else set()
    candidates = [config.is_candidate(name) and name not in embeddings for name in names]
    if config.uses_fisher_mask and names and not any(candidates):
        shown = ", ".join(list(names)[:4]) + (", ..." if len(names) > 4 else "")
        raise ConfigError(f"candidate_exclude = {list(config.candidate_exclude)!r} leaves no Fisher candidate: it "
                          f"matches every trainable tensor ({len(names)}: {shown})"
                          + (" once embeddings are left out" if embeddings else "")
                          + f", so {config.sam_type}'s mask would be empty. Narrow the patterns (they are regular "
                          "expressions searched in each parameter name) or use a sam_type without the Fisher mask.")
    return candidates
