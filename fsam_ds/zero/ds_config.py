"""Resolve a DeepSpeed config against the trainer's settings: fill every "auto", reject clashes.

The trainer owns batch sizes, clipping, precision and the ZeRO stage; the JSON may say "auto" for
them or repeat them, but never contradict them. A contradiction is an error rather than a silent
override because the two values would otherwise disagree between the log and the run.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from fsam_ds.sam.config import ConfigError, is_int, is_number
from fsam_ds.zero.offload import allow_client_optimizer, check_offload

__all__ = ["ConfigError", "PRECISIONS", "FP16_SCALER_DEFAULTS", "build_ds_config", "resolve_ds_config"]

PRECISIONS = ("fp32", "bf16", "fp16")
AUTO = "auto"

# DeepSpeed's own defaults for dynamic loss scaling (loss_scale 0 means dynamic).
FP16_SCALER_DEFAULTS: dict[str, Any] = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
_FP16_AUTO_FALSE = ("consecutive_hysteresis", "auto_cast")

# DeepSpeed's default persistence threshold; the SAM integration handles persistent parameters.
STAGE3_PERSISTENCE_THRESHOLD = 100_000

# "auto" values that DeepSpeed itself understands and that must be passed through untouched.
_NATIVE_AUTO = {"data_types.keep_in_fp32_modules"}


def build_ds_config(precision: str, zero_stage: int) -> dict[str, Any]:
    """The config shipped as ds_configs/zero{stage}_{precision}.json, with the trainer's fields "auto"."""
    _check_precision_and_stage(precision, zero_stage)
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3:
        # sized from the model's hidden size (h*h, 0.9*h*h elements) as the Hugging Face integration does:
        # DeepSpeed's own default, 5e8 elements, allocates a 2 GB fp32 reduce buffer on every rank
        zero["reduce_bucket_size"] = AUTO
        zero["stage3_prefetch_bucket_size"] = AUTO
        zero["stage3_param_persistence_threshold"] = STAGE3_PERSISTENCE_THRESHOLD
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    fp16: dict[str, Any] = {"enabled": precision == "fp16"}
    if precision == "fp16":
        fp16.update(FP16_SCALER_DEFAULTS)
    return {
        "train_batch_size": AUTO,
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "gradient_clipping": AUTO,
        "steps_per_print": 2000,
        "wall_clock_breakdown": False,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": fp16,
    }


def resolve_ds_config(
    ds_config: Mapping[str, Any] | str | Path | None,
    *,
    precision: str,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    lr: float | None = None,
    weight_decay: float | None = None,
    betas: Sequence[float] | None = None,
    eps: float | None = None,
    total_steps: int | None = None,
    warmup_steps: int | None = None,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """Return a concrete DeepSpeed config dict (a new object; the input is not modified).

    `ds_config` is a dict, a path to a JSON file, or None (then one is built from `precision` and
    `zero_stage`). Optimizer/scheduler arguments only matter when the config has such sections;
    `hidden_size` fills the Hugging Face style bucket-size "auto" fields (DeepSpeed's defaults
    are used without it). Raises ConfigError on any clash or unresolved "auto".
    """
    _check_precision_and_stage(precision, zero_stage)
    for name, value in (("data.micro_batch_size", micro_batch_size), ("data.grad_accum", grad_accum),
                        ("world_size", world_size)):
        if not is_int(value) or value < 1:
            raise ConfigError(f"{name} is {value!r}; it must be an integer >= 1.")
    if not is_number(grad_clip) or grad_clip < 0:
        raise ConfigError(f"optim.grad_clip is {grad_clip!r}; it must be a number >= 0 (0 disables clipping).")

    config, source = _load(ds_config, precision, zero_stage)
    r = _Resolver(config, source)
    _reject_unsupported(r)
    _resolve_precision(r, precision)
    _resolve_zero(r, zero_stage, hidden_size)
    r.match(config, "train_micro_batch_size_per_gpu", micro_batch_size, "data.micro_batch_size")
    r.match(config, "gradient_accumulation_steps", grad_accum, "data.grad_accum")
    _resolve_train_batch(r, micro_batch_size, grad_accum, world_size)
    r.match(config, "gradient_clipping", float(grad_clip), "optim.grad_clip")
    _match_params(r, "optimizer", {"lr": (lr, "optim.lr"), "weight_decay": (weight_decay, "optim.weight_decay"),
                                   "betas": (list(betas) if betas is not None else None, "optim.betas"),
                                   "eps": (eps, "optim.eps")})
    scheduler = _match_params(r, "scheduler", {
        "warmup_num_steps": (warmup_steps, "warmup steps (optim.warmup_ratio x total steps)"),
        "total_num_steps": (total_steps, "optim.max_steps"), "warmup_max_lr": (lr, "optim.lr")})
    if scheduler is not None:
        # The trainer's warmup starts from 0; a concrete floor in the file is the user's choice.
        r.match(scheduler, "warmup_min_lr", 0.0, "", add_missing=False, check=False)
    _reject_leftover_auto(r)
    # last, on the config otherwise resolved: the offload settings, and the optimizer DeepSpeed may force there
    allow_client_optimizer(r.config, r.fail, offloaded=check_offload(r.config, zero_stage, r.fail))
    if precision == "fp16" and zero_stage == 0:
        warnings.warn(
            f"{source}: ZeRO stage 0 with fp16 was measured to apply updates divided by the loss scale "
            "(DeepSpeed 0.19.8, FP16_UnfusedOptimizer). Use zero_stage >= 1 with fp16, or precision bf16.",
            stacklevel=2,
        )
    return config


@dataclass
class _Resolver:
    """Fills or checks one field at a time and words the errors."""

    config: dict[str, Any]
    source: str

    def fail(self, message: str) -> None:
        raise ConfigError(f"{self.source}: {message}")

    def match(self, section: dict[str, Any], key: str, want: Any, arg: str, *, path: str | None = None,
              add_missing: bool = True, check: bool = True) -> None:
        """Set `key` to `want` if it is missing or "auto"; otherwise require it to equal `want`.

        With check=False a concrete value is the user's choice and is kept as it is.
        """
        path = path or key
        if key not in section:
            if add_missing:
                section[key] = want
            return
        have = section[key]
        if have == AUTO:
            section[key] = want
        elif check and not _same(have, want):
            hint = f" (e.g. pass --{arg}={_cli(have)})" if " " not in arg else ""
            self.fail(f'{path} is {have!r} but {arg} is {want!r}. Set {path} to "auto" so the trainer '
                      f"fills it, or make the two agree{hint}.")


def _load(ds_config: Mapping[str, Any] | str | Path | None, precision: str,
          zero_stage: int) -> tuple[dict[str, Any], str]:
    if ds_config is None:
        return build_ds_config(precision, zero_stage), f"built-in DeepSpeed config ({precision}, ZeRO {zero_stage})"
    if isinstance(ds_config, Mapping):
        return copy.deepcopy(dict(ds_config)), "DeepSpeed config (dict)"
    path = Path(ds_config)
    source = f"DeepSpeed config {str(path)!r}"
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{source}: cannot be read ({err.strerror}). Check the ds_config path, "
                          "or leave ds_config unset to build one from precision and zero_stage.") from err
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}: is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).") from err
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: must hold a JSON object, found {type(loaded).__name__}.")
    return loaded, source


def check_sam_compatible(config: Mapping[str, Any], source: str = "DeepSpeed config",
                         auto_filled_later: bool = False) -> None:
    """Raises ConfigError for settings the two-pass SAM step cannot run with (offload, pipeline,
    round-robin gradients at ZeRO 1/2, fp16 at ZeRO stage 0, "auto" values DeepSpeed itself cannot fill).
    `auto_filled_later`: "auto" values are left for a caller that fills them before DeepSpeed reads the
    config (the Hugging Face Trainer does)."""
    r = _Resolver(dict(config), source)
    _reject_unsupported(r)
    fp16 = config.get("fp16") or {}
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    check_offload(r.config, stage, r.fail)
    if zero.get("round_robin_gradients") and stage in (1, 2):
        # DeepSpeed (0.19) orders the flat buffer round-robin over ranks but maps parameters to their
        # fragments (`_hp_mapping`) in the original order when no alignment padding intervenes: the
        # SAM step then reads and writes other parameters' entries (a wrong update, or a crash when
        # sizes differ). tests/test_round_robin.py reproduces both.
        r.fail("has zero_optimization.round_robin_gradients true, but at ZeRO stage 1/2 DeepSpeed's map from "
               "parameters to their shard fragments does not follow the round-robin buffer order, so the SAM "
               "step would perturb and update the wrong entries. Remove zero_optimization.round_robin_gradients "
               "(or set it to false); it only speeds up gradient copies to CPU under offload, and offload runs "
               "without it.")
    if isinstance(fp16, dict) and fp16.get("enabled") is True and stage == 0:
        r.fail("has fp16 enabled at ZeRO stage 0, where DeepSpeed's optimizer unscales a loss it never "
               "scaled (updates come out divided by the loss scale). Use ZeRO stage 1, 2 or 3 with fp16, "
               "or bf16 at stage 0.")
    left = [] if auto_filled_later else _auto_paths(r.config)
    if left:
        r.fail(f'still has "auto" for {", ".join(left)}; DeepSpeed cannot fill these. Pass the config through '
               "fsam_ds.zero.ds_config.resolve_ds_config(...) with the training arguments, or give concrete values.")


def _reject_unsupported(r: _Resolver) -> None:
    if "pipeline" in r.config or r.config.get("pipeline_parallel_size", 1) not in (1, None):
        r.fail("has a 'pipeline' section, but pipeline parallelism is not supported by the SAM step "
               "(it needs both forward-backward passes of a step on the whole model). Remove 'pipeline' "
               "and use ZeRO stage 3 to shard a model that does not fit.")
    zero = r.config.get("zero_optimization", {})
    if not isinstance(zero, dict):
        r.fail(f"zero_optimization is {zero!r}; it must be an object such as {{\"stage\": 2}}.")


def _resolve_precision(r: _Resolver, precision: str) -> None:
    config = r.config
    if "bfloat16" in config:  # DeepSpeed's old spelling
        if "bf16" in config:
            r.fail("has both 'bf16' and 'bfloat16' sections. Keep only 'bf16'.")
        config["bf16"] = config.pop("bfloat16")
    enabled: dict[str, bool] = {}
    for name in ("fp16", "bf16"):
        section = config.setdefault(name, {})
        if not isinstance(section, dict):
            r.fail(f"{name} is {section!r}; it must be an object such as {{\"enabled\": true}}.")
        value = section.get("enabled", AUTO)
        if value == AUTO:
            value = precision == name
        elif not isinstance(value, bool):
            r.fail(f'{name}.enabled is {value!r}; it must be true, false or "auto".')
        section["enabled"] = enabled[name] = value
    if enabled["fp16"] and enabled["bf16"]:
        r.fail(f"fp16.enabled and bf16.enabled are both true but precision is {precision!r}. "
               f"Enable at most one, the one matching precision (or set both to \"auto\").")
    file_precision = next((name for name, on in enabled.items() if on), "fp32")
    for name in ("fp16", "bf16"):
        if enabled[name] != (precision == name):
            r.fail(f"{name}.enabled is {str(enabled[name]).lower()} but precision is {precision!r}. "
                   f"Set {name}.enabled to \"auto\", or pass --precision={file_precision} to match the file.")
    fp16 = config["fp16"]
    if enabled["fp16"]:
        for key, default in FP16_SCALER_DEFAULTS.items():
            r.match(fp16, key, default, "", check=False)
    for key in _FP16_AUTO_FALSE:
        if fp16.get(key) == AUTO:
            fp16[key] = False


def _resolve_zero(r: _Resolver, zero_stage: int, hidden_size: int | None) -> None:
    zero = r.config.setdefault("zero_optimization", {})
    stage = zero.get("stage", AUTO)
    if stage != AUTO and (not is_int(stage) or stage != zero_stage):
        r.fail(f"zero_optimization.stage is {stage!r} but zero_stage is {zero_stage!r}. Set "
               f'zero_optimization.stage to "auto", pass --zero_stage={_cli(stage)}, or use '
               f"ds_configs/zero{zero_stage}_<precision>.json.")
    zero["stage"] = zero_stage
    # The Hugging Face integration sizes these from the model; without a size DeepSpeed's defaults apply.
    sized = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, size in sized.items():
        if zero.get(key) == AUTO:
            if hidden_size is None:
                del zero[key]
            else:
                zero[key] = size(hidden_size)


def _resolve_train_batch(r: _Resolver, micro: int, accum: int, world: int) -> None:
    want = micro * accum * world
    have = r.config.get("train_batch_size", AUTO)
    if have != AUTO and (not is_int(have) or have != want):
        r.fail(f"train_batch_size is {have!r} but data.micro_batch_size x data.grad_accum x world size = "
               f"{micro} x {accum} x {world} = {want}. Set train_batch_size to \"auto\", or change "
               f"data.grad_accum / data.micro_batch_size / the number of processes so the product is {have!r}.")
    r.config["train_batch_size"] = want


def _match_params(r: _Resolver, name: str, args: Mapping[str, tuple[Any, str]]) -> dict[str, Any] | None:
    """Fills or checks the params of the optimizer or scheduler section against the trainer's (value,
    argument) pairs; returns the params, or None without such a section."""
    section = r.config.get(name)
    if section is None:
        return None
    if not isinstance(section, dict) or not isinstance(section.get("params", {}), dict):
        r.fail(f"{name} is {section!r}; it must be an object with 'type' and a 'params' object.")
    params = section.setdefault("params", {})
    for key, (value, arg) in args.items():
        # Only fields the file names are checked; absent ones keep DeepSpeed's defaults.
        if value is not None:
            r.match(params, key, value, arg, path=f"{name}.params.{key}", add_missing=False)
    return params


def _reject_leftover_auto(r: _Resolver) -> None:
    # zero_force_ds_cpu_optimizer is filled after this, with the offload settings (`allow_client_optimizer`)
    left = [path for path in _auto_paths(r.config) if path != "zero_force_ds_cpu_optimizer"]
    if left:
        r.fail(f'cannot resolve "auto" for {", ".join(left)}. Only the batch sizes, gradient_clipping, '
               "fp16/bf16 settings, zero_optimization.stage and the optimizer/scheduler values the trainer "
               "knows (lr, weight_decay, betas, eps, warmup/total steps) may be \"auto\"; give these a "
               "concrete value (or pass the missing trainer argument).")


def _auto_paths(node: Any, prefix: str = "") -> list[str]:
    """Where `node` still says "auto", other than where DeepSpeed fills it itself."""
    if isinstance(node, dict):
        return [p for key, value in node.items() for p in _auto_paths(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [p for i, value in enumerate(node) for p in _auto_paths(value, f"{prefix}{i}.")]
    return [prefix[:-1]] if node == AUTO and prefix[:-1] not in _NATIVE_AUTO else []


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple)):
        return isinstance(have, (list, tuple)) and len(have) == len(want) and all(map(_same, have, want))
    if is_number(have) and is_number(want):
        return math.isclose(have, want, rel_tol=1e-9, abs_tol=0.0)
    return have == want


def _cli(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _check_precision_and_stage(precision: Any, zero_stage: Any) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision is {precision!r}; it must be one of {', '.join(PRECISIONS)}.")
    if not is_int(zero_stage) or not 0 <= zero_stage <= 3:
        raise ConfigError(f"zero_stage is {zero_stage!r}; it must be 0, 1, 2 or 3.")
