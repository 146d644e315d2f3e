"""Exported model folders (best/, final/), written one parameter at a time.

An export is a Hugging Face model folder that `from_pretrained` loads: config.json (dtype float32),
generation_config.json where the model generates, the tokenizer, the fp32 weights as safetensors,
run_config.json (the run's configuration, which fsam-predict rebuilds the task from), best.json for
best/, and manifest.json (`fsam_ds.trainer.run_dir.write_manifest`), written last.

The weights are streamed: no rank ever holds the whole state dict. First the weights an evaluation
left gathered are released (`release_gathered`). The shards are planned from the parameters' names
and full shapes alone (meta tensors, no memory), with the split and the file names
`save_pretrained(max_shard_size=...)` would choose (huggingface_hub's shard split). Then every rank
walks the plan in the same order: each parameter is gathered in fp32 (DeepSpeed's fp32 master where
there is one, else the module's weight), rank 0 appends it to the shard being filled and writes the
shard (safetensors) as soon as it is complete, the other ranks drop it; then the index
model.safetensors.index.json ({"metadata": {"total_parameters", "total_size"}, "weight_map"}) when
there are several shards. A rank therefore holds at most one shard (rank 0) and one gathered
parameter beyond what it holds between training steps.

Names are those `save_pretrained` writes: a tied weight once, under the name that is not a tied
target (it loads back tied), the model's `_keys_to_ignore_on_save` left out, and transformers'
reverse weight conversion applied (a model whose checkpoint format differs from its modules, such as
fused MoE experts, is written in the checkpoint format). A conversion that builds one written tensor
from several parameters (a fused qkv) gathers those parameters together.

A LoRA run's export (`adapters=True`) is peft's adapter folder, the trainable weights only (small);
its merged/ subfolder is the base with the adapters merged in, which peft builds whole on rank 0
(`fsam_ds.trainer.peft_model.merged_model`) and which is then written shard by shard.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from fsam_ds.trainer.run_dir import RUN_CONFIG_FILE, failed_anywhere, write_failed, write_manifest
from fsam_ds.zero.files import read_json, write_json

MAX_SHARD_SIZE = "500MB"
"""The default largest shard (huggingface_hub's units: 1 MB = 10**6 bytes). It bounds what rank 0 holds
beyond its training-time memory; a single tensor larger than it gets a shard of its own, as in
`save_pretrained`."""
WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MERGED_DIR = "merged"

Fetch = Callable[[torch.Tensor], torch.Tensor]
"""A parameter or buffer of the module -> its full value in fp32 (a buffer: in its own dtype) on the CPU;
collective where the module is partitioned."""


# ------------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class WriteGroup:
    """Module tensors written together, and the names they are written under."""

    sources: tuple[str, ...]
    saved: tuple[str, ...]


@dataclass(frozen=True)
class ShardPlan:
    """Which tensor goes into which file, decided before any weight is gathered; the same on every rank."""

    groups: tuple[WriteGroup, ...]
    """In the order the files fill: a file is complete before the next one starts, but for the tail of
    a group whose written tensors straddle two files."""
    files: dict[str, tuple[str, ...]]
    total_size: int
    total_parameters: int
    converted: bool
    """Whether some written names differ from the module's (transformers' reverse conversion then runs on
    each group's gathered tensors)."""

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1


def _revert_weight_conversion() -> Callable[[Any, dict], dict]:
    """transformers' reverse of its load-time weight conversion (what `save_pretrained` applies)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError as err:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no core_model_loading."
                           "revert_weight_conversion, which the export uses to write the names save_pretrained "
                           "writes; install the transformers version of pyproject.toml.") from err
    return revert_weight_conversion


def module_tensors(module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """What `save_pretrained` writes of `module`, in state_dict order: name -> (tensor, is a parameter).
    A parameter shared by several names (tied weights) is kept once, under its first name that is not a
    tied target (`all_tied_weights_keys`: target -> source), so that it loads back tied; persistent
    buffers are included; `_keys_to_ignore_on_save` is left out."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    targets = set(getattr(module, "all_tied_weights_keys", None) or {})
    kept = {next((n for n in aliases if n not in targets), aliases[0]) for aliases in names.values()}
    ignore = set(getattr(module, "_keys_to_ignore_on_save", None) or ())
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        is_param = isinstance(value, torch.nn.Parameter)
        if name not in ignore and (name in kept or not is_param):
            out[name] = (value, is_param)
    return out


def _full_shape(tensor: torch.Tensor) -> torch.Size:
    return tensor.ds_shape if hasattr(tensor, "ds_shape") else tensor.shape  # a ZeRO-3 partition's full shape


def plan_shards(module: torch.nn.Module, max_shard_size: int | str = MAX_SHARD_SIZE) -> ShardPlan:
    """The files and write order of `module`'s export, from names and shapes only (no tensor memory)."""
    from huggingface_hub import get_torch_storage_size, split_state_dict_into_shards_factory

    revert = _revert_weight_conversion()
    tensors = module_tensors(module)
    meta = {name: torch.empty(_full_shape(t), dtype=torch.float32 if is_param else t.dtype, device="meta")
            for name, (t, is_param) in tensors.items()}
    saved = revert(module, meta)  # also the order save_pretrained writes in (sorted where a conversion runs)
    if saved is not meta:
        groups = _conversion_groups(module, meta, revert)
        written = {name for group in groups for name in group.saved}
        if written != set(saved):
            raise RuntimeError(f"Cannot export {type(module).__name__} one group of weights at a time: transformers' "
                               "reverse weight conversion of the whole model writes other names than that of its "
                               f"parts ({sorted(written ^ set(saved))[:5]}).")
    else:
        groups = [WriteGroup((name,), (name,)) for name in meta]
    # a conversion that splits a parameter (fused experts) writes views of it, which save_pretrained's split
    # keeps in one shard and counts once; meta tensors keep those views, and their storage tells them apart
    # (a meta tensor has no data pointer, the id huggingface_hub goes by)
    split = split_state_dict_into_shards_factory(saved, get_storage_size=get_torch_storage_size,
                                                 get_storage_id=lambda t: t.untyped_storage()._cdata,
                                                 filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    files = {file: tuple(names) for file, names in split.filename_to_tensors.items()}
    position = {name: i for i, name in enumerate(n for names in files.values() for n in names)}
    groups.sort(key=lambda group: min(position[name] for name in group.saved))
    parameters = sum(int(meta[name].numel()) for name, (_, is_param) in tensors.items() if is_param)
    converted = any(group.saved != group.sources for group in groups)
    return ShardPlan(tuple(groups), files, int(split.metadata["total_size"]), parameters, converted)


def _conversion_groups(module: torch.nn.Module, meta: dict[str, torch.Tensor],
                       revert: Callable[[Any, dict], dict]) -> list[WriteGroup]:
    """Module tensors whose reverse conversions write the same name belong together (q, k and v of a
    fused qkv), with the names each group writes."""
    groups: list[tuple[list[str], set[str]]] = []  # (module names, written names)
    for name, tensor in meta.items():
        written = set(revert(module, {name: tensor}))
        linked = [g for g in groups if g[1] & written]
        groups = [g for g in groups if not g[1] & written]
        groups.append(([source for g in linked for source in g[0]] + [name], written.union(*(g[1] for g in linked))))
    return [WriteGroup(tuple(sources), tuple(sorted(written))) for sources, written in groups]


# ------------------------------------------------------------------------------- gathering

def tensor_fetch(stage: int) -> Fetch:
    """The full fp32 value of one of a module's tensors under ZeRO `stage`: from DeepSpeed's fp32 master
    where there is one (a trainable parameter at stages 1-3; in bf16 runs it is more precise than the
    module), else from the module (gathered for the moment of the copy at stage 3). Collective at 1-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    def fetch(tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):  # a buffer: whole on every rank
            return tensor.detach().to("cpu", copy=True)
        master = safe_get_full_fp32_param(tensor) if stage > 0 and tensor.requires_grad else None
        if master is not None:
            return master.to("cpu", torch.float32)
        if stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                return tensor.detach().to("cpu", torch.float32, copy=True)  # copied before the release frees it
        # a copy: at stages 1-2 the module's weights are views into DeepSpeed's flat buffers
        return tensor.detach().to("cpu", torch.float32, copy=True)

    return fetch


def release_gathered(engine: Any) -> None:
    """ZeRO-3: partitions again every parameter an evaluation left gathered. Forward passes without a
    backward do not release what they fetched, so after the dev evaluation every rank holds the whole
    module's weights; the export would otherwise gather beside them. The next training forward fetches
    what it needs again."""
    if engine.zero_optimization_stage() == 3:
        engine.empty_partition_cache()


def trainable_state_dict(engine: Any, keep: bool = True) -> dict[str, torch.Tensor]:
    """The trainable parameters (a LoRA run's adapters and head) in fp32 on the CPU; collective under ZeRO 1-3.
    A rank that passes keep=False takes part in the gathers and keeps nothing."""
    fetch = tensor_fetch(engine.zero_optimization_stage())
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            value = fetch(p)
            if keep:
                out[name] = value
    return out


# ------------------------------------------------------------------------------- writing

class ExportStopped(Exception):
    """A write of the streamed export failed on some rank; every rank stops at the same shard."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__(str(error))
        self.error = error


def write_weights(folder: Path | None, module: torch.nn.Module, plan: ShardPlan, fetch: Fetch,
                  collective: bool = True) -> None:
    """Gathers the tensors in the plan's order and writes each shard once complete (`write_index` then
    writes the index). `folder` None: this rank takes part in the gathers and writes nothing.
    `collective`: after each shard every rank learns whether a write failed anywhere and all raise
    ExportStopped together (a rank that stopped alone would leave the others waiting in a gather);
    otherwise a failed write raises at once."""
    from safetensors.torch import save_file

    revert = _revert_weight_conversion() if plan.converted else None
    file_of = {name: file for file, names in plan.files.items() for name in names}
    left = {file: len(names) for file, names in plan.files.items()}
    pending: dict[str, dict[str, torch.Tensor]] = {file: {} for file in plan.files}
    tensors = module_tensors(module)
    error: BaseException | None = None
    for group in plan.groups:
        values = {name: fetch(tensors[name][0]) for name in group.sources}
        if folder is None or error is not None:
            values = {}
        elif revert is not None:
            values = revert(module, values)
        for name in group.saved:
            file = file_of[name]
            if name in values:
                pending[file][name] = values.pop(name).contiguous()
            left[file] -= 1
            if left[file]:
                continue
            shard = pending.pop(file)
            if folder is not None and error is None:
                try:
                    save_file(shard, str(folder / file), metadata={"format": "pt"})
                except (OSError, RuntimeError) as err:  # safetensors reports a short write as a RuntimeError
                    if not collective:
                        raise
                    error = err
            del shard
            if collective and failed_anywhere(error):
                raise ExportStopped(error)


def write_index(folder: Path, plan: ShardPlan) -> None:
    """model.safetensors.index.json, as save_pretrained writes it, where the weights are in several shards."""
    if plan.sharded:
        index = {"metadata": {"total_parameters": plan.total_parameters, "total_size": plan.total_size},
                 "weight_map": {name: file for file, names in plan.files.items() for name in names}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_config(folder: Path, module: Any) -> None:
    """What `save_pretrained` writes beside the weights: the config (dtype float32, the weights' dtype,
    whatever the module trained in), the generation config, and the model's own code for a custom model."""
    config = copy.deepcopy(module.config)
    config.dtype = "float32"
    config.architectures = [type(module).__name__]
    if module.is_remote_code():  # before the config, whose auto_map it fills in
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(module, folder, config=config)
    config.save_pretrained(folder)
    if module.can_generate():
        module.generation_config.save_pretrained(folder)


def _finish_folder(folder: Path, tokenizer: Any, info: tuple[str, dict] | None,
                   run_config: dict[str, Any] | None) -> None:
    tokenizer.save_pretrained(folder)
    if info is not None:
        write_json(folder / info[0], info[1])
    if run_config is not None:
        write_json(folder / RUN_CONFIG_FILE, run_config)
    write_manifest(folder)


def write_model(folder: Path, module: Any, tokenizer: Any, run_config: dict[str, Any] | None,
                max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """A whole model this process holds (not partitioned) as a model folder, shard by shard; one process."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = plan_shards(module, max_shard_size)
    write_weights(folder, module, plan, tensor_fetch(0), collective=False)
    write_index(folder, plan)
    _write_config(folder, module)
    _finish_folder(folder, tokenizer, None, run_config)


def _write_adapter_folder(tmp: Path, module: Any, state_dict: dict, tokenizer: Any, info: tuple[str, dict] | None,
                          run_config: dict[str, Any] | None, merged: Callable[[Path], Any] | None,
                          max_shard_size: int | str) -> None:
    module.save_pretrained(tmp, state_dict=state_dict)  # peft's adapter folder
    # save_pretrained records the module's (bf16/fp16) dtype; the weights written are fp32
    config = read_json(tmp / "config.json") if (tmp / "config.json").is_file() else {}
    if "dtype" in config:
        config["dtype"] = "float32"
        write_json(tmp / "config.json", config)
    if merged is not None:
        write_model(tmp / MERGED_DIR, merged(tmp), tokenizer, run_config, max_shard_size)
    _finish_folder(tmp, tokenizer, info, run_config)


def export_model(engine: Any, tokenizer: Any, folder: str | os.PathLike, info: dict | None = None,
                 run_config: dict[str, Any] | None = None, adapters: bool = False,
                 merged: Callable[[Path], Any] | None = None, max_shard_size: int | str = MAX_SHARD_SIZE) -> Path:
    """Writes a Hugging Face model folder (loadable with from_pretrained), with the run's configuration
    as run_config.json when given; collective. `adapters` (a peft model): peft's adapter folder, the
    trainable weights only; `merged(folder)` then gives the model written into its merged/ subfolder.

    Rank 0 writes into `folder`.tmp, which replaces `folder` once complete. A write that fails (a full
    disk, a file-size limit) stops every rank with CheckpointWriteFailed; `folder` is left as it was."""
    folder = Path(folder)
    writer = dist.get_rank() == 0
    tmp = folder.with_name(folder.name + ".tmp")
    error: BaseException | None = None
    if writer:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            error = err
    if not failed_anywhere(error):
        named_info = None if info is None else (f"{folder.name}.json", info)
        error = _export_into(folder, tmp if writer else None, engine, tokenizer, named_info, run_config, adapters,
                             merged, max_shard_size)
    if writer and error is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if failed_anywhere(error):
        kept = f"{folder} is as it was before." if folder.exists() else "nothing was exported there."
        raise write_failed(folder, error, kept)
    return folder


def _export_into(folder: Path, tmp: Path | None, engine: Any, tokenizer: Any, info: tuple[str, dict] | None,
                 run_config: dict[str, Any] | None, adapters: bool, merged: Callable[[Path], Any] | None,
                 max_shard_size: int | str) -> BaseException | None:
    """`export_model`'s gathers (every rank) and writes (the rank given `tmp`, which then replaces
    `folder`); returns this rank's write error."""
    release_gathered(engine)
    try:
        if adapters:
            state_dict = trainable_state_dict(engine, keep=tmp is not None)
        else:
            plan = plan_shards(engine.module, max_shard_size)
            write_weights(tmp, engine.module, plan, tensor_fetch(engine.zero_optimization_stage()))
    except ExportStopped as stopped:
        return stopped.error
    if tmp is None:
        return None
    try:
        if adapters:
            _write_adapter_folder(tmp, engine.module, state_dict, tokenizer, info, run_config, merged, max_shard_size)
        else:
            write_index(tmp, plan)
            _write_config(tmp, engine.module)
            _finish_folder(tmp, tokenizer, info, run_config)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except (OSError, RuntimeError) as err:  # torch and safetensors report a short write as a RuntimeError
        return err
    return None
