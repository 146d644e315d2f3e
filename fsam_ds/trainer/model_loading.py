"""Partitioned construction and loading at ZeRO-3: no rank ever holds the whole model.

Without it every rank builds the full model and holds it until `deepspeed.initialize` partitions it
(transformers >= 5 memory-maps the safetensors file, so on CPU those weights sit in shared page cache
until DeepSpeed copies each rank's partition out). Under `partitioned_loading(ds_config)`
transformers' `from_pretrained` constructs the model inside `deepspeed.zero.Init` (each parameter is
partitioned as its module is built) and then loads the checkpoint one module at a time: rank 0 reads
the memory-mapped tensors, the module's parameters are gathered, filled on rank 0 and partitioned
again. A rank then holds its 1/world share of the weights plus one module gathered at a time (on CPU,
gloo's all-gather stages that module through a second buffer, so the largest module, often the word
embeddings, counts about twice; README, "DeepSpeed ZeRO", has the measured peaks).

The seam is transformers' DeepSpeed integration: `HfDeepSpeedConfig` registers itself through a
weak reference that `from_pretrained` consults (`is_deepspeed_zero3_enabled`), so the object must
stay alive while the model is built, and no longer: a later model built in the same process (a
test, a second run) must not be partitioned by a configuration that is not its own.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Iterator

from fsam_ds.sam.config import ConfigError


def zero3_enabled(ds_config: dict) -> bool:
    """Whether the resolved DeepSpeed config runs ZeRO stage 3 (where parameters are partitioned)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0) or 0) == 3


@contextlib.contextmanager
def partitioned_loading(ds_config: dict) -> Iterator[None]:
    """Models built or loaded with transformers inside this block are partitioned from birth under
    ZeRO-3 (`ds_config` must be resolved: no "auto" that DeepSpeed cannot fill); at other stages it
    does nothing. Needs the process group that `deepspeed.initialize` will use."""
    if not zero3_enabled(ds_config):
        yield
        return
    if importlib.util.find_spec("accelerate") is None:
        raise ConfigError("zero_stage = 3 builds and loads the model partitioned across the ranks through "
                          "transformers' DeepSpeed integration, which needs the accelerate package; install it "
                          "(pip install 'accelerate>=1.1'), or use zero_stage 0, 1 or 2.")
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_config = HfDeepSpeedConfig(ds_config)  # registered by weak reference: keep it alive for the block
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def drop_unused_weight_conversions(model: Any) -> None:
    """Keeps only the checkpoint-name conversions that loading used, as transformers' own loading
    does. Its ZeRO-3 loading keeps every conversion of the model class, and `save_pretrained` then
    writes the export under legacy names (BERT's LayerNorm `gamma`/`beta` instead of
    `weight`/`bias`), unlike an export of the same model loaded whole."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]
