"""The trainer's run configuration: typed sections, parsed from YAML/JSON and command-line overrides.

One dataclass per component; `load_config` is the only entry point that builds a `TrainConfig`
from user input, so every value is converted and range-checked there and nowhere else. The SAM
section is the optimizer core's `SAMConfig` itself, so its fields and checks are written once.
Hand-written rather than OmegaConf, jsonargparse or pydantic: none of them takes the flat names the
wandb agent passes (`--rho`), comma lists or `none`, and each would reword our one-line errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from fsam_ds.sam.config import MSAM_TYPES, SAM_TYPES, ConfigError, SAMConfig, invalid_value, is_number
from fsam_ds.trainer.run_identity import config_hash, flatten_config
from fsam_ds.trainer.tasks import OWN_DATA_TASKS

__all__ = [
    "BASELINE_SAM_TYPE", "ConfigError", "SAMSection", "OptimSection", "DataSection", "LogSection", "EvalSection",
    "PeftSection", "TrainConfig", "load_config", "config_from_dict", "config_to_dict", "config_keys", "format_help",
    "package_version",
]

BASELINE_SAM_TYPE = "none"
"""`sam.sam_type` of the baseline: DeepSpeed's own AdamW step, no perturbation."""
TRAINER_SAM_TYPES = (BASELINE_SAM_TYPE, *SAM_TYPES, *MSAM_TYPES)


@dataclass(frozen=True)
class SAMSection(SAMConfig):
    """The core's SAMConfig (same fields, defaults and checks, errors named `sam.<field>`), plus the baseline."""

    sam_types: ClassVar[tuple[str, ...]] = TRAINER_SAM_TYPES
    key_prefix: ClassVar[str] = "sam."
    sam_type: Literal[TRAINER_SAM_TYPES] = SAMConfig.sam_type  # type: ignore[valid-type]


@dataclass
class OptimSection:
    lr: float = 2e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_ratio: float = 0.06
    schedule: Literal["linear", "polynomial", "cosine", "constant"] = "linear"
    power: float = 1.0  # polynomial: exponent of the decay
    lr_end: float = 0.0  # polynomial: the lr the decay ends at
    max_steps: int = 0  # 0: derived from epochs
    epochs: int = 3
    grad_clip: float = 0.0  # 0: no clipping


@dataclass
class DataSection:
    source: Literal["hub", "local"] = "hub"
    data_dir: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    max_length: int = 128
    micro_batch_size: int = 16
    eval_batch_size: int = 64
    grad_accum: int = 1
    limit_per_class: int = 0  # 0: every example
    num_workers: int = 0
    encoding: str = "utf-8"  # text encoding of local CSV/TSV/JSON files, e.g. latin-1
    # --task=classification|regression (your own files): the one or two columns the model reads
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"  # --task=classification|regression: the column of the class or score
    # --task=classification: the classes in label-id order; empty: the sorted labels of data.train_file
    # (the run then records them here, so resume and fsam-predict rebuild the same mapping)
    labels: tuple[str, ...] = ()
    # causal-lm / seq2seq: the column holding the prompt (source); none: prompt (causal-lm), source (seq2seq)
    input_column: str | None = None
    # causal-lm / seq2seq: the column holding the completion (target); none: completion, target
    output_column: str | None = None


@dataclass
class LogSection:
    # auto: online when an API key is configured, else offline (decided without any network call)
    wandb: Literal["online", "offline", "disabled", "auto"] = "auto"
    wandb_project: str = "fsam-ds"
    log_every: int = 10
    progress: bool = True


@dataclass
class EvalSection:
    every_steps: int = 0  # 0: only at the end of each epoch
    every_epoch: bool = True
    save_best: bool = True
    at_start: bool = False  # also evaluate the loaded model before the first step (logged as step 0)
    generate_examples: int = 32  # causal-lm / seq2seq: dev examples greedily generated and scored; 0: none
    max_new_tokens: int = 64  # causal-lm / seq2seq: the longest generation, in tokens


@dataclass
class PeftSection:
    """Parameter-efficient fine-tuning through the peft library (`fsam_ds.trainer.peft_model`)."""

    method: Literal["none", "lora", "qlora"] = "none"  # none: full fine-tuning; qlora is refused (README)
    r: int = 8  # the rank of each adapter
    alpha: float = 16.0  # LoRA's scale is alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    # module names (the last part, e.g. q_proj) or all-linear; empty: peft's default for the architecture
    target_modules: tuple[str, ...] = ()
    # modules trained and saved whole besides the adapters; a classifier's head (classifier, score) always is
    modules_to_save: tuple[str, ...] = ()
    export_merged: bool = False  # best/ and final/ also hold merged/, the base with the adapters merged in

    @property
    def frozen_base(self) -> bool:
        """Whether the run trains adapters beside a frozen base (checkpoints and exports leave the base out)."""
        return self.method != "none"


def _check(ok: bool, key: str, value: Any, requirement: str, hint: str = "") -> None:
    if not ok:
        raise invalid_value(key, value, requirement, hint)


# {config_hash}: 8 hex digits of every setting that can change the result (fsam_ds.trainer.run_identity)
DEFAULT_OUTPUT_DIR = "runs/{task}-{sam_type}-s{seed}-{config_hash}"


@dataclass
class TrainConfig:
    task: str = ""
    model: str = ""  # hub id or local folder
    tokenizer: str | None = None  # None: same as model
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # dtype the weights are loaded in
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    ds_config: str | None = None
    # activation checkpointing: false, true (= non_reentrant) or reentrant (fsam_ds.trainer.activation_checkpointing)
    gradient_checkpointing: bool | Literal["reentrant", "non_reentrant"] = False
    # load_config fills in {key} placeholders (any config key, e.g. {sam.rho}) so runs get their own folder
    output_dir: str = DEFAULT_OUTPUT_DIR
    seed: int = 42
    resume: bool | str = False  # true: latest checkpoint in output_dir; a path: that checkpoint
    overwrite: bool = False  # a fresh run may replace another run's checkpoints and models in output_dir
    max_consecutive_skipped: int = 10  # stop when more steps than this in a row are skipped; 0: never stop
    checkpoint_every: int = 0  # steps; 0: only at each evaluation (every evaluation is preceded by one)
    keep_checkpoints: int = 2
    sam: SAMSection = field(default_factory=SAMSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    log: LogSection = field(default_factory=LogSection)
    eval: EvalSection = field(default_factory=EvalSection)
    peft: PeftSection = field(default_factory=PeftSection)

    def validate(self) -> None:
        """Range checks across all sections; raises ConfigError naming the first bad key."""
        o, d, lg, e = self.optim, self.data, self.log, self.eval  # sam checked itself when it was built
        _check(bool(self.task), "task", self.task, "is empty; a task name is required", "e.g. --task=sst2")
        _check(bool(self.model), "model", self.model, "is empty; a model is required",
               "Give a hub id (e.g. --model=roberta-base) or a local checkpoint folder.")
        _check(0 <= self.zero_stage <= 3, "zero_stage", self.zero_stage, "must be one of 0, 1, 2, 3")
        if self.ds_config is not None:
            _check(Path(self.ds_config).is_file(), "ds_config", self.ds_config, "is not an existing file")
        if isinstance(self.resume, str):
            _check(Path(self.resume).exists(), "resume", self.resume, "is neither true/false nor an existing path")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "is empty")
        _check(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "must be >= 0",
               "0 saves a checkpoint at each evaluation.")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        _check(self.max_consecutive_skipped >= 0, "max_consecutive_skipped", self.max_consecutive_skipped,
               "must be >= 0", "0 never stops a run for skipped steps.")

        _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
        _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
        _check(all(0 <= b < 1 for b in o.betas), "optim.betas", list(o.betas), "must both lie in [0, 1)")
        _check(o.eps > 0, "optim.eps", o.eps, "must be > 0")
        _check(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", o.warmup_ratio, "must lie in [0, 1)")
        _check(o.power > 0, "optim.power", o.power, "must be > 0")
        _check(0 <= o.lr_end < o.lr, "optim.lr_end", o.lr_end, f"must lie in [0, optim.lr) = [0, {o.lr})")
        _check(o.max_steps >= 0, "optim.max_steps", o.max_steps, "must be >= 0", "0 derives it from optim.epochs.")
        _check(o.epochs >= 1 or o.max_steps > 0, "optim.epochs", o.epochs, "must be >= 1 when optim.max_steps is 0")
        _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0", "0 turns clipping off.")

        for name in ("max_length", "micro_batch_size", "eval_batch_size", "grad_accum"):
            _check(getattr(d, name) >= 1, f"data.{name}", getattr(d, name), "must be >= 1")
        _check(d.limit_per_class >= 0, "data.limit_per_class", d.limit_per_class, "must be >= 0",
               "0 keeps every example.")
        _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "must be >= 0")
        _check(len(d.text_columns) in (1, 2) and all(d.text_columns), "data.text_columns", list(d.text_columns),
               "must name one column (a single text) or two (a pair)", "e.g. --data.text_columns=sentence1,sentence2")
        _check(bool(d.label_column), "data.label_column", d.label_column, "is empty", "e.g. --data.label_column=label")
        _check(len(set(d.labels)) == len(d.labels) and all(d.labels), "data.labels", list(d.labels),
               "must list distinct, non-empty class names", "e.g. --data.labels=negative,neutral,positive")
        _check(len(d.labels) != 1, "data.labels", list(d.labels), "names one class; a classifier needs two or more",
               "List every class, or leave data.labels empty to read them from data.train_file.")

        _check(lg.log_every >= 1, "log.log_every", lg.log_every, "must be >= 1")
        _check(bool(lg.wandb_project), "log.wandb_project", lg.wandb_project, "is empty")

        _check(e.every_steps >= 0, "eval.every_steps", e.every_steps, "must be >= 0", "0 evaluates only per epoch.")
        _check(e.every_steps > 0 or e.every_epoch or not e.save_best, "eval.save_best", e.save_best,
               "needs evaluations, but eval.every_steps is 0 and eval.every_epoch is false",
               "Set eval.every_epoch=true or eval.every_steps > 0, or eval.save_best=false.")
        _check(e.generate_examples >= 0, "eval.generate_examples", e.generate_examples, "must be >= 0",
               "0 turns generation during evaluation off.")
        _check(e.max_new_tokens >= 1, "eval.max_new_tokens", e.max_new_tokens, "must be >= 1")

        pf = self.peft
        _check(pf.method != "qlora", "peft.method", pf.method,
               "(4-bit base weights) is not supported: it needs bitsandbytes' 4-bit kernels on a CUDA GPU and a base "
               "loaded quantized, which fsam-ds does not do", "Use --peft.method=lora (README, \"LoRA\").")
        _check(pf.r >= 1, "peft.r", pf.r, "must be >= 1", "e.g. --peft.r=8")
        _check(pf.alpha > 0, "peft.alpha", pf.alpha, "must be > 0", "e.g. --peft.alpha=16")
        _check(0 <= pf.dropout < 1, "peft.dropout", pf.dropout, "must lie in [0, 1)")
        _check(all(pf.target_modules) and ("all-linear" not in pf.target_modules or len(pf.target_modules) == 1),
               "peft.target_modules", list(pf.target_modules), "must list non-empty module names, or all-linear alone",
               "e.g. --peft.target_modules=q_proj,v_proj")
        _check(all(pf.modules_to_save), "peft.modules_to_save", list(pf.modules_to_save), "has an empty name")
        _check(pf.method != "none" or not pf.export_merged, "peft.export_merged", pf.export_merged,
               "merges adapters, but peft.method is none", "Set --peft.method=lora, or drop peft.export_merged.")


SECTIONS: dict[str, type] = {"sam": SAMSection, "optim": OptimSection, "data": DataSection, "log": LogSection,
                             "eval": EvalSection, "peft": PeftSection}


# ---------------------------------------------------------------------------------------------
# Key resolution


@functools.cache
def _all_keys() -> dict[str, Any]:
    """Dotted key -> resolved field type, for every settable field (dataclass fields, not ClassVars)."""
    keys: dict[str, Any] = {}
    for prefix, cls in [("", TrainConfig), *((f"{section}.", cls) for section, cls in SECTIONS.items())]:
        hints = typing.get_type_hints(cls)
        keys.update({prefix + f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in SECTIONS})
    return keys


def config_keys() -> list[str]:
    """Every dotted key that `load_config` accepts."""
    return list(_all_keys())


def _value(cfg: TrainConfig, key: str) -> Any:
    """The value of a dotted key."""
    return functools.reduce(getattr, key.split("."), cfg)


def _resolve_key(raw: str, source: str) -> str:
    """Map a user-written key (dotted or flat, '-' or '_') to its dotted form."""
    key = raw.replace("-", "_")
    keys = _all_keys()
    if key in keys:
        return key
    if key in SECTIONS:
        example = dataclasses.fields(SECTIONS[key])[0].name
        raise ConfigError(f"Config key '{raw}' ({source}) names a whole section; set its fields one by one, "
                          f"e.g. '{key}.{example}'.")
    # Sweep agents pass flat names; accept them where exactly one section has that field.
    owners = [k for k in keys if "." in k and k.split(".", 1)[1] == key]
    if len(owners) == 1:
        return owners[0]
    if len(owners) > 1:
        raise ConfigError(f"Config key '{raw}' ({source}) is ambiguous: it exists as {', '.join(owners)}. "
                          f"Write the dotted form.")
    candidates = list(keys) + [k.split(".", 1)[1] for k in keys if "." in k]
    close = difflib.get_close_matches(key, candidates, n=4, cutoff=0.6)
    hint = f" Did you mean: {', '.join(dict.fromkeys(close))}?" if close else ""
    raise ConfigError(f"Unknown config key '{raw}' ({source}).{hint} Valid top-level keys: "
                      f"{', '.join(k for k in keys if '.' not in k)}; sections: {', '.join(SECTIONS)} "
                      f"(e.g. 'sam.rho'). Run with --help for the full list.")


# ---------------------------------------------------------------------------------------------
# Value conversion

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")
_NONE = ("none", "null", "~")


_PLURALS = {str: "strings", int: "integers", float: "finite numbers", bool: "true/false values"}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        text = " or ".join(_describe(a) for a in args if a is not type(None))
        return text + " or none" if type(None) in args else text
    if origin in (tuple, list):
        if origin is list or args[1:] == (Ellipsis,):
            return f"a list of {_PLURALS.get(args[0]) or _describe(args[0])} (comma list or JSON list)"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {bool: "true/false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """`value` converted to `tp`; ValueError if it does not fit (turned into a ConfigError naming the key)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or str(value).strip().lower() in _NONE):
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        for choice in (c for c in args if str(c) == str(value).strip()):
            return choice
        raise ValueError
    if origin in (tuple, list):
        items = _split_list(value)
        item_types = [args[0]] * len(items) if origin is list or args[1:] == (Ellipsis,) else list(args)
        if len(items) != len(item_types):
            raise ValueError
        converted = [_coerce(v, t) for v, t in zip(items, item_types)]
        return tuple(converted) if origin is tuple else converted
    if tp is bool:
        text = str(value).strip().lower() if isinstance(value, (int, str)) else ""  # a bool is an int: "true"
        if text not in _TRUE + _FALSE:
            raise ValueError
        return text in _TRUE
    if tp in (int, float):
        if isinstance(value, float) and tp is int and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str) if tp is int else (int, float, str)):
            raise ValueError
        number = tp(value)  # YAML 1.1 reads "2e-5" (no dot) as a string, so numbers from files land here too
        if not math.isfinite(number):  # inf passes every range check (lr > 0, rho >= 0) yet wrecks the run
            raise ValueError
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        # a YAML or JSON number where text is wanted (labels: [1, 2]) becomes the text the command line
        # gives (--data.labels=1,2), so that both name the same classes; a float as Python writes it (1.5)
        if is_number(value) and math.isfinite(value):
            return str(value)
    raise ValueError


def _split_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, str):
        raise ValueError
    text = value.strip()
    if text.startswith("["):
        # JSON, or Python's str() of a list as the wandb agent writes it; a regex like "[Ll]ayer" falls through.
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    return [part.strip() for part in text.split(",")] if text else []


# ---------------------------------------------------------------------------------------------
# Sources: config file and command line


def _flatten(data: dict[str, Any], source: str) -> list[tuple[str, Any, str]]:
    """Nested file content -> [(user key, value, source)] with section keys joined by dots."""
    for key, value in data.items():
        if isinstance(value, dict) and str(key).replace("-", "_") not in SECTIONS:
            raise ConfigError(f"Config key '{key}' ({source}) holds a mapping, but only the sections "
                              f"{', '.join(SECTIONS)} may; did you mean a dotted key?")
    return [(key, value, source) for key, value in flatten_config(data).items()]


def _read_file(path: str) -> list[tuple[str, Any, str]]:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"Config file '{path}' given with --config does not exist.")
    suffix = file.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"Config file '{path}' must end in .yaml, .yml or .json.")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if suffix == ".json" else (yaml.safe_load(text) or {})
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"Config file '{path}' could not be parsed: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys to values, not {type(data).__name__}.")
    return _flatten(data, f"in {path}")


def _parse_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, Any, str]]]:
    """argv -> (config file, [(user key, raw value, source)])."""
    config_file: str | None = None
    overrides: list[tuple[str, Any, str]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"Unexpected argument '{token}': arguments must look like --key=value or "
                              f"--key value (e.g. --sam.rho=0.02).")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            takes_next = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if takes_next else "true"  # a bare flag switches a boolean on
            i += takes_next
        i += 1
        if key.replace("-", "_") == "local_rank":  # passed by the deepspeed launcher to every process
            continue
        if key == "config":
            if config_file is not None:
                raise ConfigError(f"--config was given twice ('{config_file}' and '{value}'); give one file "
                                  f"and override single keys with --key=value.")
            config_file = value
            continue
        overrides.append((key, value, f"from --{key}"))
    return config_file, overrides


# ---------------------------------------------------------------------------------------------
# Building, validating, serialising


def _build(items: list[tuple[str, Any, str]]) -> TrainConfig:
    values: dict[str, dict[str, Any]] = {section: {} for section in ("", *SECTIONS)}  # "": top-level fields
    for raw, value, source in items:
        key = _resolve_key(raw, source)
        section, _, name = key.rpartition(".")
        try:
            values[section][name] = _coerce(value, _all_keys()[key])
        except ValueError:
            wanted = _describe(_all_keys()[key])
            raise ConfigError(f"Invalid value for config key '{key}' ({source}): {value!r} is not {wanted}. "
                              f"Give {wanted} instead. The default is "
                              f"{json.dumps(_value(TrainConfig(), key))}.") from None
    # Sections are built whole (the SAM section is frozen and checks itself on construction).
    cfg = TrainConfig(**values[""], **{section: cls(**values[section]) for section, cls in SECTIONS.items()})
    if cfg.task.strip().lower() in OWN_DATA_TASKS and "source" not in values["data"]:
        cfg.data.source = "local"  # your own data is never on the hub: no need to say so
    if cfg.tokenizer is None and cfg.model:
        cfg.tokenizer = cfg.model
    cfg.output_dir = _PLACEHOLDER.sub(lambda match: _placeholder_value(cfg, match), cfg.output_dir)
    cfg.validate()
    return cfg


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


def _placeholder_value(cfg: TrainConfig, match: re.Match[str]) -> str:
    """`{key}` in output_dir -> that key's value (dotted or unique flat name); other braces stay."""
    if match.group(1) == "config_hash":
        return config_hash(config_to_dict(cfg))
    try:
        value = _value(cfg, _resolve_key(match.group(1), "output_dir placeholder"))
    except ConfigError:
        return match.group(0)
    return f"{value:g}" if isinstance(value, float) else str(value).replace("/", "_")


def package_version() -> str:
    """The version of the installed fsam-ds distribution, which `--version` prints."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fsam-ds")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed: pip install -e . to give it a version)"


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Build the run configuration from `--config FILE` and `--key=value` overrides (later wins).

    Keys may be dotted (`--sam.rho=0.02`) or, when unique across sections, flat (`--rho=0.02`).
    `--local_rank` from the deepspeed launcher is ignored. `--help` prints every key and exits;
    `--version` prints the package version and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        print(format_help())
        raise SystemExit(0)
    if "--version" in argv:
        print(f"fsam-train {package_version()}")
        raise SystemExit(0)
    config_file, overrides = _parse_argv(argv)
    return _build((_read_file(config_file) if config_file is not None else []) + overrides)


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from `config_to_dict` output (e.g. a run's config.json)."""
    return _build(_flatten(data, "in the given dict"))


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON-serialisable nested dict of every field (tuples become lists). The peft section only when a
    method is set: a full fine-tuning run keeps the folder hash and resume check it had before the section."""
    data = json.loads(json.dumps(dataclasses.asdict(cfg)))
    if cfg.peft.method == "none":
        del data["peft"]
    return data


def format_help() -> str:
    lines = ["Usage: fsam-train [--config FILE.yaml|.json] [--key=value ...]", "       fsam-train --help | --version",
             "", "Keys (flat names work where unique across sections, e.g. --rho for sam.rho):"]
    for key, tp in _all_keys().items():
        lines.append(f"  --{key:<28} {_describe(tp)}  [default: {json.dumps(_value(TrainConfig(), key))}]")
    return "\n".join(lines)
