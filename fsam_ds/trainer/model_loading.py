"""The run's pretrained model: checked before the run (`open_pretrained`), then loaded (`load_model`),
at ZeRO-3 partitioned: no rank ever holds the whole model.

Without it every rank builds the full model and holds it until `deepspeed.initialize` partitions it
(transformers >= 5 memory-maps the safetensors file, so on CPU those weights sit in shared page cache
until DeepSpeed copies each rank's partition out).

`load_pretrained` at ZeRO-3 builds the model from its config inside `deepspeed.zero.Init`, so each
parameter is partitioned as its module is built (one module whole at a time, the word embeddings
the largest), and then fills each rank's partition straight from the safetensors file(s): a rank's
partition `ds_tensor` holds a contiguous range of the flattened parameter (`zero3_partition`), and
a row-major tensor's flat range is a contiguous byte range of the file, so each rank reads only its
own bytes, with plain file reads (a memory map would count the pages it touches in the rank's
resident memory while mapped), and nothing is gathered. A rank holds its 1/world share of the
weights, plus one module while it is built (README, "DeepSpeed ZeRO", has the measured peaks).

The checkpoint's keys go through transformers' own key mapping (the base-model prefix added or
stripped, renamings such as BERT's legacy LayerNorm `gamma`/`beta`); keys the model does not have
are ignored and parameters the checkpoint lacks are initialised, both as `from_pretrained` does.
Whatever this reading does not cover (no local safetensors file, a weight conversion beyond a rename,
a tensor type it does not read, model arguments that are not configuration fields, NVMe offload)
loads through transformers' own ZeRO-3 path instead, with a one-line note on rank 0: under
`partitioned_loading(ds_config)` its `from_pretrained` builds the model inside `deepspeed.zero.Init`
and loads it one module at a time (gathered, filled on rank 0, partitioned again).

The seam is transformers' DeepSpeed integration: `HfDeepSpeedConfig` registers itself through a
weak reference that `from_pretrained` consults (`is_deepspeed_zero3_enabled`), so the object must
stay alive while the model is built, and no longer: a later model built in the same process (a
test, a second run) must not be partitioned by a configuration that is not its own.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import torch

from fsam_ds.sam.config import ConfigError
from fsam_ds.zero.adapters import zero3_partition

if TYPE_CHECKING:
    from fsam_ds.trainer.objectives import Objective
    from fsam_ds.trainer.run_config import TrainConfig


class TrainError(RuntimeError):
    """A problem with the run's inputs that the user must fix; the message says what to change."""


def check_model_path(name: str, what: str = "model") -> None:
    # A hub id is "name" or "org/name"; anything else with a slash, or a relative/home path, is a folder.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")
    if looks_local and not Path(name).expanduser().is_dir():
        raise TrainError(f"{what} = {name!r} looks like a local folder but does not exist. Give the folder that "
                         "holds config.json and the weights (saved with save_pretrained), or a Hugging Face "
                         "hub id such as FacebookAI/roberta-large.")


def hub_error(name: str, what: str, err: Exception) -> TrainError:
    return TrainError(f"Could not load the {what} {name!r}: it is neither a folder with a Hugging Face "
                      f"checkpoint nor a hub id that could be downloaded ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}). Check the path or id, or the network.")


# ----------------------------------------------------------------------------------- the run's model

@dataclass
class Pretrained:
    """What the run reads of its pretrained model before it claims its folder."""

    tokenizer: Any
    config: Any
    """The model's transformers configuration."""


def open_pretrained(cfg: TrainConfig, model_class: Any) -> Pretrained:
    """Everything about the pretrained model that can be checked without loading its weights, before the
    run folder is claimed and before the data is tokenized: the model's and the tokenizer's paths, whether the
    model has the head `model_class` (a decoder-only model for seq2seq is refused), the tokenizer and the
    lengths it accepts, the model's configuration, and the generation lengths against its positions."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_path(cfg.model)
    check_model_head(model_class, cfg.model, cfg.task)
    tokenizer_name = cfg.tokenizer or cfg.model
    check_model_path(tokenizer_name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    except OSError as err:
        raise hub_error(tokenizer_name, "tokenizer", err) from None
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < cfg.data.max_length:
        raise ConfigError(f"data.max_length = {cfg.data.max_length} exceeds the {limit} tokens the model "
                          f"{tokenizer_name!r} accepts; pass --data.max_length={limit} or less.")
    try:
        config = AutoConfig.from_pretrained(cfg.model)
    except OSError as err:
        raise hub_error(cfg.model, "model", err) from None
    except ValueError as err:  # a model_type this transformers does not know
        raise TrainError(f"model = {cfg.model!r}: transformers cannot read its configuration "
                         f"({str(err).splitlines()[0] if str(err) else type(err).__name__}). Upgrade transformers, "
                         "or give a model it supports.") from None
    check_positions(cfg, config)
    return Pretrained(tokenizer, config)


def check_positions(cfg: TrainConfig, model_config: Any) -> None:
    """Refuses generation lengths beyond the positions a model with learned position embeddings has (GPT-2's
    n_positions, BART's max_position_embeddings): its forward indexes past the table and fails at the first
    evaluation, after training. Rotary models run past max_position_embeddings, so they only get a warning."""
    if cfg.task not in ("causal-lm", "seq2seq"):
        return
    positions = getattr(model_config, "n_positions", None) or getattr(model_config, "max_position_embeddings", None)
    if not isinstance(positions, int):
        return  # relative positions (T5): no table to run out of
    d, e = cfg.data, cfg.eval
    if cfg.task == "causal-lm":
        longest, what = d.max_length + e.max_new_tokens, (f"data.max_length + eval.max_new_tokens = {d.max_length} + "
                                                          f"{e.max_new_tokens}")
        fix = (f"Lower eval.max_new_tokens to {positions - d.max_length} or data.max_length to "
               f"{positions - e.max_new_tokens}" if positions > max(d.max_length, e.max_new_tokens) else
               "Lower data.max_length and eval.max_new_tokens")
    else:  # the decoder starts from its start token, then generates
        longest, what = max(d.max_length, e.max_new_tokens + 1), (f"max(data.max_length, eval.max_new_tokens + 1) "
                                                                  f"= max({d.max_length}, {e.max_new_tokens + 1})")
        fix = f"Keep data.max_length <= {positions} and eval.max_new_tokens <= {positions - 1}"
    if longest <= positions:
        return
    rotary = any(getattr(model_config, key, None) is not None
                 for key in ("rope_theta", "rope_parameters", "rope_scaling"))
    message = f"{what} = {longest} tokens, more than the {positions} positions of the model {cfg.model!r}"
    if rotary:
        print(f"warning: {message}; its rotary positions run past that, but it was not trained on such lengths.",
              file=sys.stderr, flush=True)
        return
    raise ConfigError(f"{message} ({type(model_config).__name__}), so the evaluation's generation would index past "
                      f"its position table, after training. {fix}.")


def load_model(cfg: TrainConfig, objective: Objective, ds_config: dict | None = None) -> torch.nn.Module:
    """The pretrained model with the head `objective` trains; partitioned from birth when
    `ds_config` (resolved) runs ZeRO-3 (`load_pretrained`)."""
    try:
        return load_pretrained(objective.model_class(), cfg.model, getattr(torch, cfg.dtype), ds_config,
                               **objective.model_kwargs())
    except OSError as err:
        raise hub_error(cfg.model, "model", err) from None
    except CheckpointError as err:
        raise TrainError(f"model = {cfg.model!r}: {err}") from None


# The safetensors format's tensor types this reading copies; any other loads through transformers.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8}
_CAST_CHUNK_BYTES = 1 << 24  # a dtype cast reads through a buffer of at most this size
_HEADER_LIMIT = 100 << 20  # the safetensors library refuses larger headers too


class CheckpointError(ValueError):
    """A checkpoint that cannot be the model it claims to hold; the message names the file and the fix."""


class Fallback(Exception):
    """Something partitioned reading does not cover; the checkpoint loads through transformers instead."""


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


def load_pretrained(model_class: Any, name: str, dtype: torch.dtype, ds_config: dict | None = None,
                    **kwargs: Any) -> Any:
    """`model_class.from_pretrained(name, dtype=dtype, **kwargs)`, partitioned from birth when the
    resolved `ds_config` runs ZeRO-3: read partition by partition from a local safetensors checkpoint
    (a folder, or a hub id already in the local cache), else through transformers' ZeRO-3 loading."""
    ds_config = ds_config or {}
    if not zero3_enabled(ds_config):
        check_model_head(model_class, name)
        return model_class.from_pretrained(name, dtype=dtype, **kwargs)
    plan, why, error = None, "another rank cannot read this checkpoint partitioned", None
    try:
        check_model_head(model_class, name)  # here, so that a rank that refuses the model stops the others
        plan = plan_partitioned_load(model_class, name, dtype, ds_config, **kwargs)
    except Fallback as reason:
        why = str(reason)
    except (CheckpointError, ConfigError) as err:
        error = err
    # what follows is collective: every rank takes the same path, or raises
    agreed = _least_over_ranks(0 if error is not None else 2 if plan is not None else 1)
    if agreed == 0:
        raise error or CheckpointError(f"Another rank could not read the checkpoint {name}; its error says what "
                                       "is wrong with the files it sees.")
    if agreed == 1:
        if _rank() == 0:
            print(f"note: {name} loads through transformers' ZeRO-3 loading (one module gathered at a time): {why}")
        with partitioned_loading(ds_config):
            model = model_class.from_pretrained(name, dtype=dtype, **kwargs)
        drop_unused_weight_conversions(model)
        return model
    return load_planned(model_class, plan, dtype, ds_config)


@dataclass(frozen=True)
class Head:
    """A transformers Auto class that a kind of task builds its model with."""

    mapping: str
    """transformers' public mapping of the Auto class: configuration class -> model class."""
    tasks: str
    """The tasks that use it, as a user names them."""
    models: str
    """Examples of the models that have it."""


HEADS: dict[str, Head] = {
    "AutoModelForCausalLM": Head("MODEL_FOR_CAUSAL_LM_MAPPING", "--task=causal-lm",
                                 "a decoder-only model (GPT-2, Llama, Qwen, SmolLM2, ...)"),
    "AutoModelForSeq2SeqLM": Head("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING", "--task=seq2seq",
                                  "an encoder-decoder model (T5, BART, an EncoderDecoderModel, ...)"),
    "AutoModelForSequenceClassification": Head(
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
        "--task=classification, --task=regression or a GLUE/SuperGLUE task",
        "a model with a sequence-classification head (BERT, RoBERTa, DeBERTa, and most decoders)"),
}
"""The Auto classes the objectives build their models with (`Objective.model_class`), by name."""


def check_model_head(model_class: Any, name: str, task: str | None = None) -> None:
    """Raises ConfigError, before anything is built, when the model `name` has no `model_class` (one of
    `HEADS`) in transformers: from its config.json alone, in a local folder or a hub id's snapshot
    already in the local cache (nothing is downloaded here; a model it cannot read is left to the
    loading, which says what is wrong). `task` names the run's task in the message."""
    import transformers

    head = HEADS.get(getattr(model_class, "__name__", ""))
    folder = checkpoint_folder(name)
    if head is None or folder is None:
        return
    try:
        config = transformers.AutoConfig.from_pretrained(folder)
    except (OSError, ValueError):  # no config.json, or a model_type this transformers does not know
        return
    if type(config) in getattr(transformers, head.mapping):
        return
    able = [h.tasks for h in HEADS.values() if type(config) in getattr(transformers, h.mapping)]
    architectures = getattr(config, "architectures", None) or []
    kind = f"model_type {config.model_type!r}"
    if architectures:
        kind += f", architecture {', '.join(architectures)}"
    wanted = f"--task={task}" if task else head.tasks
    can = (f"What this model can do: {'; '.join(able)}. Choose {'that' if len(able) == 1 else 'one of those'}, "
           f"or give a model made for {wanted}." if able else f"Give a model made for {wanted}.")
    raise ConfigError(f"model = {name!r} ({kind}) cannot be fine-tuned for {wanted}: transformers has no "
                      f"{model_class.__name__} for {config.model_type} models, and that task needs {head.models}. "
                      f"{can}")


def drop_unused_weight_conversions(model: Any) -> None:
    """Keeps only the checkpoint-name conversions that loading used, as transformers' own loading
    does. Its ZeRO-3 loading keeps every conversion of the model class, and `save_pretrained` then
    writes the export under legacy names (BERT's LayerNorm `gamma`/`beta` instead of
    `weight`/`bias`), unlike an export of the same model loaded whole."""
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if c.was_used()]


# ------------------------------------------------------------------------------ the checkpoint files

@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: its type, shape and where its row-major bytes start."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of its first element in the file

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"The checkpoint file {path} is damaged or not a safetensors file: {problem}. Save the "
                           "model again with save_pretrained, or download it again (a partial download leaves a "
                           "truncated file).")


def read_safetensors_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its header (the documented format: an 8-byte
    little-endian header length, a JSON header with each tensor's type, shape and byte range, then
    the data), checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"it has {size} bytes, fewer than the 8 of a header length")
        length = int.from_bytes(head, "little")
        if length > min(size - 8, _HEADER_LIMIT):
            raise _corrupt(path, f"its header claims {length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _corrupt(path, f"its header is not JSON ({err})") from None
    data_start = 8 + length
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            type_name, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"the header entry of {key!r} is not a tensor's dtype, shape and "
                                 "data_offsets") from None
        dtype = SAFETENSORS_DTYPES.get(type_name)
        if dtype is None:
            raise Fallback(f"{path.name} stores {key!r} as {type_name}, a type this reading does not copy")
        stored = StoredTensor(path, key, dtype, shape, data_start + begin)
        if end - begin != stored.numel * dtype.itemsize or data_start + end > size:
            raise _corrupt(path, f"{key!r} ({type_name}, shape {list(shape)}) claims bytes {begin}..{end} of "
                                 f"the {size - data_start} data bytes")
        tensors[key] = stored
    return tensors


def checkpoint_folder(name: str) -> Path | None:
    """The local folder of `name`: a folder, or a hub id's snapshot already in huggingface_hub's cache
    (nothing is downloaded); None when there is none."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid hub id, or no cache: transformers' own loading says what is wrong
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def checkpoint_tensors(folder: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's safetensors checkpoint: model.safetensors, or the shards its
    model.safetensors.index.json names."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors_header(single)
    if not index.is_file():
        raise Fallback(f"{folder} has no model.safetensors nor model.safetensors.index.json")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"The checkpoint index {index} cannot be read ({type(err).__name__}: {err}); it "
                              "must be JSON with a weight_map from tensor names to shard files. Save the model "
                              "again with save_pretrained.") from None
    tensors: dict[str, StoredTensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise Fallback(f"the shard {shard} that {index.name} names is not in {folder}")
        tensors.update(read_safetensors_header(folder / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise _corrupt(index, f"it places {len(absent)} tensor(s), such as {absent[0]!r}, in shards that do not "
                              "hold them")
    return tensors


# ------------------------------------------------------------------------------ which bytes go where

@dataclass
class LoadPlan:
    """What partitioned loading reads: for each parameter (by its name in `named_parameters()`) and
    persistent buffer, the checkpoint tensor that fills it; parameters the checkpoint lacks (or holds
    in another shape, with `ignore_mismatched_sizes`) keep the model's initialisation."""

    name: str
    folder: Path
    config: Any
    parameters: dict[str, StoredTensor]
    buffers: dict[str, StoredTensor]
    missing: list[str]
    unexpected: list[str]
    conversions: list[Any] = field(default_factory=list)  # transformers' key renamings the checkpoint used


def _construct(model_class: Any, config: Any, dtype: torch.dtype) -> Any:
    # Auto classes take a config through `from_config`; a model class itself through `_from_config`
    build = getattr(model_class, "from_config", None) or model_class._from_config
    return build(copy.deepcopy(config), dtype=dtype)


def plan_partitioned_load(model_class: Any, name: str, dtype: torch.dtype, ds_config: dict,
                          **kwargs: Any) -> LoadPlan:
    """Maps the checkpoint of `name` onto the model `from_pretrained(name, dtype=dtype, **kwargs)`
    would build, from the files' headers and a model skeleton on the meta device (no weights are
    read). Raises `Fallback` for what this reading does not cover, `CheckpointError` for a
    checkpoint that does not fit the model."""
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    if sys.byteorder != "little":
        raise Fallback("safetensors files are little-endian and this machine is not")
    if ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device") == "nvme":
        raise Fallback("offload_param to NVMe keeps the partitions on disk")
    folder = checkpoint_folder(name)
    if folder is None:
        raise Fallback("it is not a local folder nor in the local hub cache")
    kwargs = dict(kwargs)
    ignore_mismatched_sizes = bool(kwargs.pop("ignore_mismatched_sizes", False))
    config, unused = AutoConfig.from_pretrained(folder, return_unused_kwargs=True, **kwargs)
    if unused:
        raise Fallback(f"the model arguments {sorted(unused)} are not configuration fields")
    if getattr(config, "quantization_config", None) is not None:
        raise Fallback("the checkpoint is quantized")
    tensors = checkpoint_tensors(folder)
    with torch.device("meta"):
        skeleton = _construct(model_class, config, dtype)

    expected = skeleton.state_dict(keep_vars=True)
    conversions = get_model_conversion_mapping(skeleton)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    by_model_key: dict[str, StoredTensor] = {}
    unexpected = []
    for key, stored in tensors.items():
        target, converter = rename_source_key(key, renamings, converters, skeleton.base_model_prefix or None,
                                              expected)
        if converter is not None:
            raise Fallback(f"the checkpoint's {key!r} needs transformers' weight conversion {converter!r}")
        if target not in expected:
            unexpected.append(key)
        elif target in by_model_key:
            raise Fallback(f"the checkpoint's {key!r} and {by_model_key[target].key!r} both map to {target!r}")
        else:
            by_model_key[target] = stored

    def fits(model_key: str, target: torch.Tensor, stored: StoredTensor) -> bool:
        if tuple(target.shape) == stored.shape:
            return True
        if ignore_mismatched_sizes:
            return False  # a new head of another size, initialised as from_pretrained does
        raise CheckpointError(f"The checkpoint {folder} holds {stored.key!r} with shape {list(stored.shape)}, but "
                              f"the model built from its config.json has {model_key!r} with shape "
                              f"{list(target.shape)}: config.json and the weights disagree. Save the model again "
                              "with save_pretrained, or pass ignore_mismatched_sizes=True to give it new weights.")

    aliases: dict[int, list[str]] = {}  # tied weights: one parameter, several names
    for key, p in skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(key)
    parameters, missing = {}, []
    for key, p in skeleton.named_parameters():
        source = next((by_model_key[k] for k in aliases[id(p)] if k in by_model_key), None)
        if source is not None and fits(key, p, source):
            parameters[key] = source
        else:
            missing.append(key)
    buffers = {key: by_model_key[key] for key, b in skeleton.named_buffers()
               if key in by_model_key and fits(key, b, by_model_key[key])}
    return LoadPlan(name, folder, config, parameters, buffers, missing, unexpected,
                    [c for c in conversions if c.was_used()])


def _rank() -> int:
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if initialized else 0


def _least_over_ranks(value: int) -> int:
    """The smallest of the ranks' `value`s (an all-reduce; the value itself without a process group)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    from deepspeed.accelerator import get_accelerator

    flag = torch.tensor([value], device=get_accelerator().current_device_name())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return int(flag.item())


# ------------------------------------------------------------------------------ reading the partitions

def _read_into(file: BinaryIO, offset: int, out: torch.Tensor) -> None:
    """Fills the contiguous CPU tensor `out` with the file's bytes from `offset`."""
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    file.seek(offset)
    while view.nbytes:
        got = file.readinto(view)
        if not got:
            raise _corrupt(Path(file.name), f"it ends before byte {file.tell() + view.nbytes}")
        view = view[got:]


def read_flat_range(file: BinaryIO, stored: StoredTensor, first: int, out: torch.Tensor) -> None:
    """Elements [first, first + out.numel()) of the flattened `stored` into `out`, cast to its dtype."""
    start = stored.start + first * stored.dtype.itemsize
    if out.dtype == stored.dtype and out.device.type == "cpu" and out.is_contiguous():
        _read_into(file, start, out)
        return
    chunk = max(1, _CAST_CHUNK_BYTES // stored.dtype.itemsize)
    for done in range(0, out.numel(), chunk):
        piece = torch.empty(min(chunk, out.numel() - done), dtype=stored.dtype)
        _read_into(file, start + done * stored.dtype.itemsize, piece)
        out[done:done + piece.numel()].copy_(piece)


def _init_without_broadcast() -> type:
    """`deepspeed.zero.Init` minus its broadcast of every new parameter from rank 0, which only makes
    random initialisations agree across ranks: here every loaded weight is read by each rank from the
    same file, and the rest is initialised on rank 0 and broadcast when gathered. On CPU, gloo's
    receive leaves freed buffers resident, a fifth of this model's size on every rank but rank 0."""
    import deepspeed

    init = deepspeed.zero.Init
    for method in ("_zero_init_param", "_convert_to_deepspeed_param"):
        if not callable(getattr(init, method, None)):
            return init  # another DeepSpeed: keep its own construction, broadcast included

    class InitWithoutBroadcast(init):
        def _zero_init_param(self, param: torch.nn.Parameter) -> None:
            self._convert_to_deepspeed_param(param)
            param.partition()

    return InitWithoutBroadcast


def load_planned(model_class: Any, plan: LoadPlan, dtype: torch.dtype, ds_config: dict) -> Any:
    """Builds the model partitioned inside `deepspeed.zero.Init` (weights left uninitialised, as
    transformers' ZeRO-3 loading does) and fills each rank's partitions from the checkpoint; the
    parameters the checkpoint lacks are then initialised on rank 0, gathered, as transformers does."""
    import deepspeed
    from transformers import GenerationConfig
    from transformers.initialization import guard_torch_init_functions, no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change
    from transformers.modeling_utils import set_zero3_state

    # set_zero3_state tells transformers the model is already inside zero.Init: its own from_config
    # would otherwise enter it again and initialise every module gathered, one at a time
    with partitioned_loading(ds_config), no_init_weights(), prevent_arange_dtype_change(), \
            _init_without_broadcast()(config_dict_or_path=ds_config), set_zero3_state():
        model = _construct(model_class, plan.config, dtype)
    model.tie_weights()  # no_init_weights skips the tying that post_init does

    rank = _rank()
    parameters, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    with contextlib.ExitStack() as files, torch.no_grad():
        opened: dict[Path, BinaryIO] = {}

        def file_of(stored: StoredTensor) -> BinaryIO:
            if stored.file not in opened:
                opened[stored.file] = files.enter_context(open(stored.file, "rb", buffering=0))
            return opened[stored.file]

        for key, stored in plan.parameters.items():
            p = parameters[key]
            offset, size = zero3_partition(p, rank)
            read_flat_range(file_of(stored), stored, offset, p.ds_tensor.view(-1)[:size])
            p._is_hf_initialized = True  # transformers' mark: initialisation leaves it alone
        for key, stored in plan.buffers.items():  # buffers are not partitioned: every rank reads them whole
            b = buffers[key]
            whole = torch.empty(stored.shape, dtype=b.dtype)
            read_flat_range(file_of(stored), stored, 0, whole.view(-1))
            b.copy_(whole)
            b._is_hf_initialized = True

    with partitioned_loading(ds_config):
        pending = [p for p in model.parameters() if not getattr(p, "_is_hf_initialized", False)]
        with torch.no_grad(), guard_torch_init_functions(), \
                deepspeed.zero.GatheredParameters(pending, modifier_rank=0):
            model.initialize_weights()
    model._weight_conversions = plan.conversions  # save_pretrained writes the names the checkpoint had
    model.config.name_or_path = plan.name
    if model.can_generate() and (plan.folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(plan.folder)
    model.eval()  # as from_pretrained leaves it
    return model
