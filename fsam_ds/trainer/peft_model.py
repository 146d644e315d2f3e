"""LoRA through the peft library: the trainer's model wrapped before DeepSpeed, and its exports read back.

The SAM step needs nothing of its own here. LoRA freezes the base (requires_grad=False), and the engine
builds its shards, Fisher candidates, mask and perturbation from the trainable parameters only
(`fsam_ds.zero.engine.SAMEngine`), so the base is never perturbed and its bits never change; at ZeRO-3 it
is loaded partitioned like any model (`fsam_ds.trainer.model_loading`) and peft adds the adapters beside
the partitioned weights, which DeepSpeed partitions at `initialize` (in bf16 or fp16 after casting them to
the base's dtype, `fsam_ds.zero.engine.cast_added_parameters`: peft makes them fp32).

An export of a LoRA run is peft's adapter folder (adapter_config.json, adapter_model.safetensors: the
adapters and the task head), loadable with `PeftModel.from_pretrained` on the base, and, with
peft.export_merged, `merged/` inside it: the base with the adapters merged in, a plain model folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fsam_ds.trainer.model_loading import TrainError, check_model_path
from fsam_ds.trainer.objectives import Objective
from fsam_ds.trainer.run_config import TrainConfig

ADAPTER_CONFIG = "adapter_config.json"
WRAPPED_PREFIX = "base_model.model."
"""What peft puts before the wrapped model's own parameter names."""
MERGED_DIR = "merged"

# peft's task type for each head the objectives build (`Objective.model_class`); a sequence classifier's
# head (classifier, score) is then trained and saved whole, as peft does for that task type
TASK_TYPES = {"AutoModelForSequenceClassification": "SEQ_CLS", "AutoModelForCausalLM": "CAUSAL_LM",
              "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM"}


def adaptable_modules(model: torch.nn.Module) -> list[str]:
    """The distinct short names (the last part: q_proj, query) of the layers LoRA can adapt, the most
    repeated first (those in every block, which make the best examples), then by name."""
    from collections import Counter

    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    counts = Counter(name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and isinstance(m, kinds))
    return sorted(counts, key=lambda name: (-counts[name], name))


def _missing(model: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    """The entries of `names` that name no module of `model`, by peft's rule for a list: the module's
    full name, or its end after a dot."""
    full = [name for name, _ in model.named_modules() if name]
    return [n for n in names if not any(f == n or f.endswith("." + n) for f in full)]


def _refuse_unknown(model: torch.nn.Module, key: str, names: tuple[str, ...], model_name: str) -> None:
    missing = _missing(model, names)
    if missing:
        layers = adaptable_modules(model)
        verb = "names" if len(missing) == 1 else "name"
        raise TrainError(f"{key} = {list(names)}: {', '.join(missing)} {verb} no module of the model {model_name!r} "
                         f"({type(model).__name__}). The layers LoRA can adapt are named: {', '.join(layers)}. "
                         f"Give some of those, e.g. --{key}={','.join(layers[:2])}, or leave peft.target_modules "
                         "empty for peft's default for this architecture.")


def wrap_with_peft(cfg: TrainConfig, model: torch.nn.Module, objective: Objective) -> torch.nn.Module:
    """`model` with the adapters peft.* asks for (the model itself for peft.method none). Raises
    TrainError before any training when a target module or a module to save is not in the model, or
    peft knows no default targets for its architecture."""
    p = cfg.peft
    if p.method == "none":
        return model
    import peft

    if p.target_modules != ("all-linear",):
        _refuse_unknown(model, "peft.target_modules", p.target_modules, cfg.model)
    _refuse_unknown(model, "peft.modules_to_save", p.modules_to_save, cfg.model)
    targets = "all-linear" if p.target_modules == ("all-linear",) else list(p.target_modules) or None
    config = peft.LoraConfig(task_type=TASK_TYPES[objective.model_class().__name__], r=p.r, lora_alpha=p.alpha,
                             lora_dropout=p.dropout, target_modules=targets,
                             modules_to_save=list(p.modules_to_save) or None)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as err:  # no default targets for the architecture
        layers = adaptable_modules(model)
        raise TrainError(f"peft.target_modules is empty and peft has no default LoRA targets for the model "
                         f"{cfg.model!r} ({type(model).__name__}: {err}). Name the layers to adapt, e.g. "
                         f"--peft.target_modules={','.join(layers[:2])}; the layers LoRA can adapt are named: "
                         f"{', '.join(layers)}.") from None
    # recorded in adapter_config.json: the base that PeftModel.from_pretrained and fsam-predict load
    wrapped.peft_config["default"].base_model_name_or_path = cfg.model
    return wrapped


def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def load_exported(folder: str | Path, objective: Objective, base_model: str | None = None) -> torch.nn.Module:
    """The model an export holds, in fp32 on the CPU: a plain model folder as it is, an adapter folder
    on its base (`base_model`, else the one adapter_config.json records) through peft."""
    cls = objective.model_class()
    if not is_adapter_folder(folder):
        return cls.from_pretrained(folder, dtype=torch.float32)
    from peft import PeftModel

    base = base_model or json.loads((Path(folder) / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    check_model_path(base, f"base model of the adapter in {str(folder)!r} (set it with --base_model)")
    model = cls.from_pretrained(base, dtype=torch.float32, **objective.model_kwargs())
    return PeftModel.from_pretrained(model, folder)


def merged_model(folder: str | Path, objective: Objective) -> torch.nn.Module:
    """The adapter export in `folder` merged into its base: a plain transformers model."""
    return load_exported(folder, objective).merge_and_unload()
