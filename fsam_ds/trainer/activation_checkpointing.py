"""Activation checkpointing for both SAM passes: transformers' layers, torch's or DeepSpeed's checkpoint.

Each checkpointed layer keeps only its inputs in the forward and runs again inside the backward, so
SAM pays the recompute twice per step (once per pass) and holds a layer's activations, not the
model's, at any time. The recompute reproduces the forward exactly: both torch's checkpoint
(`preserve_rng_state`, on by default) and DeepSpeed's restore the random state of the forward, so a
dropout mask is the same in the forward and its recompute, and each SAM pass draws its own as it
would without checkpointing (tests/test_activation_checkpointing.py).

`gradient_checkpointing` picks the implementation: non-reentrant (`true` or `non_reentrant`,
torch's recommended one, gradients flow through saved-tensor hooks) or reentrant (`reentrant`,
an inner backward per layer). A DeepSpeed config with an `activation_checkpointing` section swaps in
DeepSpeed's checkpoint function (`deepspeed.checkpointing.checkpoint`, or its non-reentrant variant)
configured from that section: DeepSpeed's engine only parses the section, it is applied by the model
calling DeepSpeed's function, which Hugging Face layers do once it is set here.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

import torch

from fsam_ds.sam.config import ConfigError

__all__ = ["CheckpointingSetting", "checkpointing_mode", "enable_activation_checkpointing", "reused_across_checkpoints"]

CheckpointingSetting = bool | Literal["reentrant", "non_reentrant"]
"""The trainer's `gradient_checkpointing` value: false, true (= non_reentrant), reentrant, non_reentrant."""

# Options of DeepSpeed's section that need model (tensor) parallelism, which fsam-ds does not have:
# they split a layer's inputs over the model-parallel group (none here, so DeepSpeed fails inside the
# forward) and contiguous buffers are only kept for partitioned activations.
_NEEDS_MODEL_PARALLEL = ("partition_activations", "contiguous_memory_optimization")


def checkpointing_mode(setting: CheckpointingSetting) -> Literal["off", "reentrant", "non_reentrant"]:
    """The implementation a `gradient_checkpointing` setting asks for (true means non-reentrant)."""
    if setting is False:
        return "off"
    return "non_reentrant" if setting is True else setting


def enable_activation_checkpointing(model: torch.nn.Module, setting: CheckpointingSetting,
                                    ds_config: Mapping[str, Any] | None = None) -> str:
    """Turns on activation checkpointing in a transformers model as `setting` and the DeepSpeed
    config's `activation_checkpointing` section say; returns the mode ("off", "reentrant", ...)."""
    mode = checkpointing_mode(setting)
    section = (ds_config or {}).get("activation_checkpointing")
    if mode == "off":
        if section is not None:
            raise ConfigError(f"the DeepSpeed config has activation_checkpointing = {section!r} but "
                              "gradient_checkpointing is false, so no layer would be checkpointed. Pass "
                              "--gradient_checkpointing=true (or reentrant), or remove the section.")
        return mode
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"gradient_checkpointing is {setting!r} but {type(model).__name__} does not support "
                          "activation checkpointing in transformers; set gradient_checkpointing to false.")
    reentrant = mode == "reentrant"
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage", 0)
    # the public switch also makes the embeddings' output require grad, which reentrant checkpoints need
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    if section is not None:
        _set_checkpoint_function(model, _deepspeed_checkpoint(section, dict(ds_config or {}), reentrant))
    if reentrant and stage in (2, 3):
        _refuse_reused_parameters(model, stage)
    return mode


def reused_across_checkpoints(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameters that more than one checkpointed layer uses, or a checkpointed layer and the rest of
    the model: {parameter name: the layers (or "outside") that use it}."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [name for name, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    users: dict[int, set[str]] = {}
    first_name: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        owner = next((layer for layer in layers if module_name == layer or module_name.startswith(layer + ".")),
                     "outside")
        for name, p in module.named_parameters(recurse=False):
            users.setdefault(id(p), set()).add(owner)
            first_name.setdefault(id(p), f"{module_name}.{name}" if module_name else name)
    return {first_name[k]: sorted(v) for k, v in users.items() if len(v) > 1 and v != {"outside"}}


def _refuse_reused_parameters(model: torch.nn.Module, stage: int) -> None:
    # A reentrant checkpoint runs its layer's backward as a separate autograd pass, so a parameter that
    # two such passes reach gets two gradient hooks in one backward, and ZeRO-2 (which reduces each
    # partition's gradient once per backward) stops with "Gradient computed twice for this partition"
    # (DeepSpeed#988, transformers#18330), ZeRO-3 with an assertion on a parameter twice in its reduce
    # bucket; with AdamW as well as SAM. tests/test_activation_checkpointing.py reproduces both.
    # Non-reentrant checkpoints run inside the one backward: each parameter's hook fires once.
    reused = reused_across_checkpoints(model)
    if reused:
        name, where = next(iter(reused.items()))
        raise ConfigError(f"gradient_checkpointing is 'reentrant' at ZeRO stage {stage}, but {len(reused)} "
                          "parameter(s) are used by more than one checkpointed layer (e.g. "
                          f"{name} in {', '.join(where)}): reentrant checkpoints give them two gradients per "
                          "backward, which ZeRO-2 and ZeRO-3 reject ('Gradient computed twice for this partition'). "
                          "Use --gradient_checkpointing=non_reentrant (or true), or ZeRO stage 0 or 1.")


def _set_checkpoint_function(model: torch.nn.Module, function: Any) -> None:
    """Hands `function` to every checkpointed layer, through transformers' private setter (the public
    switch only takes torch's checkpoint)."""
    import transformers

    try:
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
    except (AttributeError, TypeError) as err:
        raise RuntimeError(f"transformers {transformers.__version__} has no PreTrainedModel._set_gradient_checkpointing"
                           "(enable, gradient_checkpointing_func) (used since 4.35, checked with 5.23), so DeepSpeed's "
                           "checkpoint cannot be set in the model's layers. Remove the DeepSpeed config's "
                           "activation_checkpointing section to use torch's checkpoint.") from err


def _deepspeed_checkpoint(section: Any, ds_config: dict[str, Any], reentrant: bool) -> Any:
    import deepspeed

    if not isinstance(section, dict):
        raise ConfigError(f"the DeepSpeed config's activation_checkpointing is {section!r}; it must be an object "
                          'such as {"cpu_checkpointing": false}.')
    for key in _NEEDS_MODEL_PARALLEL:
        if section.get(key):
            raise ConfigError(f"the DeepSpeed config has activation_checkpointing.{key} = true, which needs model "
                              "(tensor) parallelism; fsam-ds trains data-parallel only. Remove it or set it "
                              "to false (ZeRO-3 already partitions the weights).")
    deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
    return deepspeed.checkpointing.checkpoint if reentrant else deepspeed.checkpointing.non_reentrant_checkpoint
