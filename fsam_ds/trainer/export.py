"""Exported model folders (best/, final/): Hugging Face folders that `from_pretrained` loads, with the
run's configuration and a manifest (`fsam_ds.trainer.run_dir`); under LoRA, peft's adapter folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from fsam_ds.trainer.run_dir import (RUN_CONFIG_FILE, failed_anywhere, read_json, write_failed, write_json,
                                     write_manifest)


def full_state_dict(engine: Any, keep: bool = True, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights in fp32 on the CPU: from DeepSpeed's fp32 master where there is one
    (ZeRO 1-3; in bf16 runs that is more precise than the module), else from the module.
    Collective under ZeRO 1-3: every rank must call it. Under ZeRO-3 the weights are consolidated
    from the partitions one parameter at a time (each rank holds one full parameter transiently);
    a rank that passes keep=False takes part in the gathers and keeps nothing, so only the ranks
    that keep hold the whole fp32 model. `trainable_only`: the trainable parameters alone (LoRA's
    adapters and head), without a gather of the frozen base."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage = engine.zero_optimization_stage()
    out: dict[str, torch.Tensor] = {}
    for name, p in engine.module.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        master = safe_get_full_fp32_param(p) if stage > 0 and p.requires_grad else None
        if master is None and stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                master = p.detach().clone()
        value = master if master is not None else p.detach()
        if keep:
            out[name] = value.float().cpu().clone()
    if not keep or trainable_only:
        return out
    for name, buffer in engine.module.state_dict().items():
        if name not in out and buffer.numel() > 0:  # persistent buffers (e.g. position ids)
            out[name] = buffer.cpu().clone()
    return out


def export_model(engine: Any, tokenizer: Any, folder: str | os.PathLike, info: dict | None = None,
                 run_config: dict[str, Any] | None = None, adapters: bool = False,
                 merged: Callable[[Path], Any] | None = None) -> Path:
    """Writes a Hugging Face model folder (loadable with from_pretrained), with the run's configuration
    as run_config.json when given; collective. `adapters` (a peft model): peft's adapter folder, the
    trainable weights only; `merged(folder)` then gives the model written into its merged/ subfolder."""
    folder = Path(folder)
    state_dict = full_state_dict(engine, keep=dist.get_rank() == 0, trainable_only=adapters)  # only rank 0 writes
    error: BaseException | None = None
    if dist.get_rank() == 0:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _write_model_folder(tmp, engine.module, state_dict, tokenizer,
                                None if info is None else (f"{folder.name}.json", info), run_config, merged)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except (OSError, RuntimeError) as err:  # torch and safetensors report a short write as a RuntimeError
            error = err
            shutil.rmtree(tmp, ignore_errors=True)
    if failed_anywhere(error):
        kept = f"{folder} is as it was before." if folder.exists() else "nothing was exported there."
        raise write_failed(folder, error, kept)
    return folder


def _write_model_folder(tmp: Path, module: Any, state_dict: dict, tokenizer: Any, info: tuple[str, dict] | None,
                        run_config: dict[str, Any] | None, merged: Callable[[Path], Any] | None = None) -> None:
    module.save_pretrained(tmp, state_dict=state_dict)  # a peft model keeps the adapters' entries
    # save_pretrained records the module's (bf16/fp16) dtype; the weights written are fp32
    config = read_json(tmp / "config.json") if (tmp / "config.json").is_file() else {}
    if "dtype" in config:
        config["dtype"] = "float32"
        write_json(tmp / "config.json", config)
    if merged is not None:
        model = merged(tmp)
        _write_model_folder(tmp / "merged", model, model.state_dict(), tokenizer, None, run_config)
    tokenizer.save_pretrained(tmp)
    if info is not None:
        write_json(tmp / info[0], info[1])
    if run_config is not None:
        write_json(tmp / RUN_CONFIG_FILE, run_config)
    write_manifest(tmp)
