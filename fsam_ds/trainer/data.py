"""A task's train and dev data: loading, checks, few-shot subsets, tokenization, batching.

Every loaded split is normalised to the columns `text_a`, `text_b` (pair tasks only) and
`label` (class ids under a `ClassLabel`, or float64 scores), whatever its source.

GLUE TSV folders (`source="glue-tsv"`) are read in the layouts of the GLUE distribution:
    cola  headerless: source, label, original label, sentence (a header row naming `sentence`
          and `label` is also accepted)
    sst2  header `sentence label`
    mrpc  header `Quality #1 ID #2 ID #1 String #2 String` (Quality is the label)
    qqp   header `id qid1 qid2 question1 question2 is_duplicate`
    stsb  header `index genre filename year old_index source1 source2 sentence1 sentence2 score`
    mnli  header `index promptID pairID genre ... sentence1 sentence2 [label1..label5] gold_label`,
          dev files dev_matched.tsv and dev_mismatched.tsv
    qnli  header `index question sentence label`
    rte / wnli  header `index sentence1 sentence2 label`
Any other task reads a headered TSV whose columns carry the task's own names. Files are
train.tsv and dev.tsv (or `<split>.tsv` for a split not called validation). Fields are split on
tabs with no quote handling, as the GLUE files require.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Value
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fsam_ds.trainer.tasks import TaskSpec, get_task

TEXT_A, TEXT_B, LABEL = "text_a", "text_b", "label"
SOURCES = ("hub", "glue-tsv", "files")
FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

PathLike = str | os.PathLike


class DataError(ValueError):
    """Data that does not fit its task; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class TsvLayout:
    """How one GLUE task's TSV files are laid out."""

    header: bool = True
    names: tuple[str, ...] = ()
    """Column names of a headerless file."""
    rename: Mapping[str, str] = field(default_factory=dict, hash=False)
    """File column -> task column (applied only where the task column is absent)."""
    dev_files: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Dev split -> file name, where it is not dev.tsv."""


GLUE_TSV_LAYOUTS: Mapping[str, TsvLayout] = MappingProxyType({
    "cola": TsvLayout(header=False, names=("source", "label", "original_label", "sentence")),
    "sst2": TsvLayout(),
    "mrpc": TsvLayout(rename={"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"}),
    "qqp": TsvLayout(rename={"is_duplicate": "label"}),
    "stsb": TsvLayout(rename={"score": "label"}),
    "mnli": TsvLayout(rename={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
                      dev_files={"validation_matched": "dev_matched.tsv",
                                 "validation_mismatched": "dev_mismatched.tsv"}),
    "qnli": TsvLayout(),
    "rte": TsvLayout(),
    "wnli": TsvLayout(),
})


@dataclass
class _Raw:
    """One split as read, before it is checked against its task."""

    origin: str
    """Names the file or hub split in messages."""
    columns: dict[str, list]
    hint: str = ""
    present: list[str] | None = None
    """Every column of the source, where `columns` holds only those read."""


# ----------------------------------------------------------------------------------------- reading

def _read_delimited(path: Path, *, tsv: bool, names: Sequence[str] = (), required: Sequence[str] = (),
                    bad_rows: str) -> dict[str, list]:
    """Rows of a CSV (quoted) or TSV (no quoting); rows whose width differs from the header are bad."""
    options: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **options)
        rows: list[list[str]] = []
        header: list[str] | None = None
        bad: list[int] = []
        for row in reader:
            if not row:
                continue
            if header is None:
                # A headerless layout may still be given a header naming the task's columns.
                if not names or set(required) <= set(row):
                    header = [c.strip() for c in row]
                    continue
                header = list(names)
            if len(row) != len(header):
                if bad_rows == "error":
                    raise DataError(
                        f"{path}, line {reader.line_num}: {len(row)} field(s) where the header has "
                        f"{len(header)} ({', '.join(header)}). Repair the line, or pass bad_rows='warn' "
                        "to skip such rows with a warning.")
                bad.append(reader.line_num)
                continue
            rows.append(row)
    if header is None:
        raise DataError(f"{path} is empty; give a file with a header row and at least one example.")
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warnings.warn(f"{path}: skipped {len(bad)} row(s) whose field count differs from the header's "
                      f"{len(header)} (lines {shown}).", stacklevel=3)
    return {name: [r[i] for r in rows] for i, name in enumerate(header)}


def _records_to_columns(records: list, path: Path) -> dict[str, list]:
    names: dict[str, None] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is {type(rec).__name__}, not an object; each example must "
                            "be a JSON object mapping column names to values.")
        names.update(dict.fromkeys(rec))
    return {n: [rec.get(n) for rec in records] for n in names}


def _read_json(path: Path, *, lines: bool) -> dict[str, list]:
    text = path.read_text(encoding="utf-8-sig")
    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            lines = True  # JSON lines saved under a .json name
        else:
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if isinstance(data, list):
                return _records_to_columns(data, path)
            if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
                if len({len(v) for v in data.values()}) > 1:
                    raise DataError(f"{path}: the column lists have different lengths "
                                    f"({ {k: len(v) for k, v in data.items()} }); every column needs one "
                                    "value per example.")
                return dict(data)
            raise DataError(f"{path}: expected a list of objects, an object of column lists, or JSON lines.")
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}). Each line of a JSON "
                                "lines file must hold one complete object.") from err
    return _records_to_columns(records, path)


def _read_file(path: Path, *, required: Sequence[str], bad_rows: str) -> dict[str, list]:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                        f"{', '.join(FILE_FORMATS)} (the format is taken from the extension).")
    if not path.is_file():
        raise DataError(f"{path} not found; check the path given for this split.")
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, tsv=fmt == "tsv", required=required, bad_rows=bad_rows)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pydict()
    return _read_json(path, lines=fmt == "jsonl")


def _glue_tsv_path(data_dir: Path, spec: TaskSpec, split: str) -> Path:
    layout = GLUE_TSV_LAYOUTS.get(spec.name, TsvLayout())
    if split == spec.train_split:
        name = "train.tsv"
    else:
        name = layout.dev_files.get(split) or ("dev.tsv" if split == "validation" else f"{split}.tsv")
    return data_dir / name


def _read_glue_tsv(data_dir: Path, spec: TaskSpec, split: str, bad_rows: str) -> _Raw:
    path = _glue_tsv_path(data_dir, spec, split)
    if not path.is_file():
        raise DataError(f"{path} not found. A GLUE-style folder for task {spec.name!r} holds "
                        f"train.tsv and {', '.join(_glue_tsv_path(data_dir, spec, s).name for s in spec.dev_splits)}; "
                        "point data_dir at that folder, or use source='files' with data_files={split: path}.")
    layout = GLUE_TSV_LAYOUTS.get(spec.name, TsvLayout())
    columns = _read_delimited(path, tsv=True, names=() if layout.header else layout.names,
                              required=spec.required_columns, bad_rows=bad_rows)
    columns = _renamed(columns, layout.rename)
    return _Raw(f"File {str(path)!r}", columns)


def _read_hub(spec: TaskSpec, split: str, hub_kwargs: Mapping[str, Any], rename: Mapping[str, str]) -> _Raw:
    import datasets

    if spec.hub_id is None:
        raise DataError(f"Task {spec.name!r} has no hub dataset; load it with source='files' or 'glue-tsv'.")
    ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split, **dict(hub_kwargs))
    wanted = set(spec.required_columns) | set(rename)
    present = list(ds.column_names)
    ds = ds.select_columns([c for c in present if c in wanted])
    config = f", config {spec.hub_config!r}" if spec.hub_config else ""
    return _Raw(f"Hub dataset {spec.hub_id!r}{config}, split {split!r},", ds.to_dict(), present=present)


# ---------------------------------------------------------------------------------------- checking

def _renamed(columns: dict[str, list], rename: Mapping[str, str]) -> dict[str, list]:
    out = dict(columns)
    for old, new in rename.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def _quoted(values: Sequence[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def _missing_columns(raw: _Raw, spec: TaskSpec, missing: list[str], rename: Mapping[str, str]) -> DataError:
    texts = _quoted(spec.text_templates) if spec.text_templates else _quoted(spec.text_columns)
    also = f" (and {_quoted(missing[1:])})" if len(missing) > 1 else ""
    after = f" after renaming with columns={dict(rename)}" if rename else ""
    return DataError(
        f"{raw.origin} has no column {missing[0]!r}{also}{after}, which task {spec.name!r} needs "
        f"(texts from {texts}, label from {spec.label_column!r}). Columns present: "
        f"{_quoted(raw.present or list(raw.columns)) or 'none'}. Rename the column in the data, or pass "
        f"columns={{'<column in the data>': {missing[0]!r}}} to load_task_splits.{raw.hint}")


def _bad_listing(bad: Counter) -> str:
    shown = [f"{value} ({count} row{'s' if count > 1 else ''})" for value, count in bad.most_common(8)]
    return ", ".join(shown) + (", ..." if len(bad) > 8 else "")


def _label_key(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        try:
            number = float(value)
        except ValueError:
            return value
        # "1.0" as written by tools that store labels as floats is class 1.
        return str(int(number)) if number.is_integer() else value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)  # bools become BoolQ/WiC's "True"/"False"


def _class_ids(values: list, spec: TaskSpec, origin: str) -> list[int]:
    assert spec.label_names is not None
    lookup = {str(i): i for i in range(spec.num_labels)}
    lookup.update({name: i for i, name in enumerate(spec.label_names)})
    lookup.update(spec.label_map or {})
    ids: list[int] = []
    bad: Counter = Counter()
    for value in values:
        key = _label_key(value)
        if key in lookup:
            ids.append(lookup[key])
        else:
            bad[repr(value)] += 1
    if bad:
        raw = f"; or the raw values {_quoted(list(spec.label_map))} (label_map)" if spec.label_map else ""
        unlabeled = (" -1 is how GLUE and SuperGLUE mark unlabelled test examples; load a labelled split."
                     if "-1" in bad or "'-1'" in bad else "")
        raise DataError(
            f"{origin} column {spec.label_column!r} has {sum(bad.values())} label(s) outside the label set of "
            f"task {spec.name!r}: {_bad_listing(bad)}. Allowed: the ids 0..{spec.num_labels - 1}, or the names "
            f"{_quoted(spec.label_names)}{raw}.{unlabeled} Fix or drop those rows, or pass a task with a "
            "label_map (dataclasses.replace(task, label_map={...})) that maps them to class ids.")
    return ids


def _scores(values: list, spec: TaskSpec, origin: str) -> list[float]:
    out: list[float] = []
    bad: Counter = Counter()
    for value in values:
        try:
            score = math.nan if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            score = math.nan
        if math.isfinite(score):
            out.append(score)
        else:
            bad[repr(value)] += 1
    if bad:
        raise DataError(
            f"{origin} column {spec.label_column!r} has {sum(bad.values())} label(s) that are not finite "
            f"numbers: {_bad_listing(bad)}. Task {spec.name!r} is a regression task, so every label must be a "
            "float (e.g. STS-B similarity in [0, 5]); fix or drop those rows.")
    return out


def _normalize(raw: _Raw, spec: TaskSpec, rename: Mapping[str, str]) -> Dataset:
    columns = _renamed(raw.columns, rename)
    missing = [c for c in spec.required_columns if c not in columns]
    if missing:
        raise _missing_columns(raw, spec, missing, rename)
    for name in spec.required_columns:
        empty = [i for i, v in enumerate(columns[name]) if v is None]
        if empty and name != spec.label_column:
            raise DataError(f"{raw.origin} column {name!r} is null in {len(empty)} row(s) (rows "
                            f"{_quoted(empty[:10])}{', ...' if len(empty) > 10 else ''}); task {spec.name!r} reads "
                            "text from it. Fill or drop those rows.")
    fields = [c for c in spec.required_columns if c != spec.label_column]
    n = len(columns[spec.label_column])
    if spec.text_templates is None:
        texts = [[str(v) for v in columns[c]] for c in spec.text_columns]
    else:
        rows = [{c: columns[c][i] for c in fields} for i in range(n)]
        texts = [[t.format_map(r) for r in rows] for t in spec.text_templates]
    data: dict[str, list] = {TEXT_A: texts[0]}
    features = {TEXT_A: Value("string")}
    if spec.is_pair:
        data[TEXT_B] = texts[1]
        features[TEXT_B] = Value("string")
    labels = columns[spec.label_column]
    if spec.is_regression:
        data[LABEL] = _scores(labels, spec, raw.origin)
        features[LABEL] = Value("float64")
    else:
        data[LABEL] = _class_ids(labels, spec, raw.origin)
        features[LABEL] = ClassLabel(names=list(spec.label_names or ()))
    return Dataset.from_dict(data, features=Features(features))


# ----------------------------------------------------------------------------------------- loading

def load_task_splits(
    task: str | TaskSpec,
    source: Literal["hub", "glue-tsv", "files"],
    *,
    data_dir: PathLike | None = None,
    data_files: Mapping[str, PathLike] | None = None,
    columns: Mapping[str, str] | None = None,
    splits: Sequence[str] | None = None,
    train_per_class: int | None = None,
    seed: int = 0,
    bad_rows: Literal["warn", "error"] = "warn",
    hub_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Dataset]:
    """The task's train split and every dev split, keyed by split name, normalised and checked.

    source: "hub" (`datasets.load_dataset(task.hub_id, task.hub_config, split=...)`, extra
    arguments in `hub_kwargs`), "glue-tsv" (a GLUE-style folder `data_dir`, see the module doc)
    or "files" (`data_files` maps each split to a .csv/.tsv/.json/.jsonl/.parquet file with the
    task's column names). `columns` renames data columns to task columns. `train_per_class`
    keeps that many training examples per class, chosen by `seed` (see `sample_per_class`).
    `bad_rows`: CSV/TSV rows of the wrong width are skipped with a warning, or raise.
    """
    spec = get_task(task)
    rename = dict(columns or {})
    wanted = tuple(splits) if splits is not None else (spec.train_split, *spec.dev_splits)
    if source not in SOURCES:
        raise DataError(f"source = {source!r} is not one of {', '.join(SOURCES)}.")
    if bad_rows not in ("warn", "error"):
        raise DataError(f"bad_rows = {bad_rows!r} must be 'warn' or 'error'.")
    if source == "glue-tsv" and data_dir is None:
        raise DataError("source='glue-tsv' needs data_dir, the folder holding train.tsv and the dev file(s).")
    if source == "files":
        if not data_files:
            raise DataError(f"source='files' needs data_files, a mapping from split name ({_quoted(wanted)}) "
                            "to a file.")
        known = {spec.train_split, *spec.dev_splits, *wanted}
        unknown = [k for k in data_files if k not in known]
        absent = [s for s in wanted if s not in data_files]
        if unknown or absent:
            raise DataError(f"data_files has keys {_quoted(list(data_files))} but task {spec.name!r} loads the "
                            f"splits {_quoted(wanted)}; name each file by one of those split names"
                            f"{' (missing: ' + _quoted(absent) + ')' if absent else ''}.")
    if source != "files" and data_files:
        raise DataError(f"data_files is only read with source='files', not {source!r}.")

    out: dict[str, Dataset] = {}
    for split in wanted:
        split_spec = spec.task_for_split(split)
        if source == "hub":
            raw = _read_hub(split_spec, split, hub_kwargs or {}, rename)
        elif source == "glue-tsv":
            raw = _read_glue_tsv(Path(data_dir), split_spec, split, bad_rows)  # type: ignore[arg-type]
        else:
            path = Path(data_files[split])  # type: ignore[index]
            raw = _Raw(f"File {str(path)!r}", _read_file(path, required=split_spec.required_columns,
                                                        bad_rows=bad_rows))
            if path.suffix.lower() == ".tsv" and split_spec.name in GLUE_TSV_LAYOUTS:
                raw.hint = " For the GLUE distribution's own TSV files use source='glue-tsv' with data_dir."
        out[split] = _normalize(raw, split_spec, rename)
    if train_per_class is not None and spec.train_split in out:
        out[spec.train_split] = sample_per_class(out[spec.train_split], train_per_class, seed=seed)
    return out


def sample_per_class(dataset: Dataset, n: int, *, seed: int) -> Dataset:
    """`n` examples of every class, in their original order.

    Each class is drawn from its own generator seeded by (seed, class id), so the same seed gives
    the same subset, and a smaller n gives a subset of a larger n's draw.
    """
    feature = dataset.features.get(LABEL)
    if not isinstance(feature, ClassLabel):
        raise DataError("sample_per_class needs class labels, but this split's 'label' is "
                        f"{feature!r}; a regression task (STS-B) has no classes to balance. Subsample with "
                        "dataset.shuffle(seed).select(range(k)) instead.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DataError(f"Examples per class n = {n!r} must be an integer >= 1.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed = {seed!r} must be an integer >= 0.")
    labels = np.asarray(dataset[LABEL])
    counts = {name: int((labels == i).sum()) for i, name in enumerate(feature.names)}
    short = {name: c for name, c in counts.items() if c < n}
    if short:
        raise DataError(f"Cannot take n = {n} examples per class: " +
                        ", ".join(f"class {k!r} has only {v}" for k, v in short.items()) +
                        f" (counts per class: {counts}). Use n <= {min(counts.values())} or a larger split.")
    chosen = []
    for class_id in range(feature.num_classes):
        members = np.flatnonzero(labels == class_id)
        order = np.random.default_rng([seed, class_id]).permutation(len(members))
        chosen.append(members[order[:n]])
    return dataset.select(np.sort(np.concatenate(chosen)).tolist())


# ------------------------------------------------------------------------------------ tokenization

def tokenize(dataset: Dataset, tokenizer: Any, *, max_length: int = 128) -> Dataset:
    """Token ids of each example (a pair when the split has `text_b`), truncated to `max_length`.

    Returns a torch-formatted Dataset with `input_ids`, `attention_mask`, `token_type_ids` when
    the tokenizer produces them, and `labels` (int64 classes or float32 scores). Not padded.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length = {max_length!r} must be an integer >= 1.")
    missing = [c for c in (TEXT_A, LABEL) if c not in dataset.column_names]
    if missing:
        raise DataError(f"tokenize expects a split from load_task_splits (columns {TEXT_A!r}, [{TEXT_B!r}], "
                        f"{LABEL!r}); {_quoted(missing)} missing from {_quoted(dataset.column_names)}.")
    pair = TEXT_B in dataset.column_names
    regression = not isinstance(dataset.features[LABEL], ClassLabel)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch[TEXT_A], batch[TEXT_B] if pair else None, truncation=True, max_length=max_length)
        out = {k: enc[k] for k in MODEL_INPUTS if k in enc}
        out["labels"] = batch[LABEL]
        return out

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    tokenized = tokenized.cast_column("labels", Value("float32" if regression else "int64"))
    return tokenized.with_format("torch")


def tokenize_splits(splits: Mapping[str, Dataset], tokenizer: Any, *,
                    max_length: int = 128) -> dict[str, Dataset]:
    return {name: tokenize(ds, tokenizer, max_length=max_length) for name, ds in splits.items()}


@dataclass(frozen=True)
class PadCollator:
    """Pads each batch to its own longest sequence (optionally rounded up to a multiple)."""

    pad_token_id: int
    pad_token_type_id: int = 0
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, pad_to_multiple_of: int | None = None) -> PadCollator:
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token "
                             "(e.g. to its eos token) before building the collator.")
        return cls(int(tokenizer.pad_token_id), int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
                   tokenizer.padding_side, pad_to_multiple_of)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("PadCollator got an empty batch.")
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": self.pad_token_type_id}
        batch: dict[str, torch.Tensor] = {}
        for key, fill in fills.items():
            if key not in features[0]:
                continue
            out = torch.full((len(features), width), fill, dtype=torch.long)
            for row, f in enumerate(features):
                seq = torch.as_tensor(f[key], dtype=torch.long)
                if self.padding_side == "left":
                    out[row, width - len(seq):] = seq
                else:
                    out[row, :len(seq)] = seq
            batch[key] = out
        if "labels" in features[0]:
            batch["labels"] = torch.stack([torch.as_tensor(f["labels"]) for f in features])
        return batch


# ---------------------------------------------------------------------------------------- batching

class ShardSampler(Sampler[int]):
    """Rank r's evaluation shard: indices r, r + world_size, ... in order.

    The shards are disjoint and together hold every index once. With `even` (the default) each
    shard is padded, by repeating its first index, to ceil(n / world_size) so that every rank runs
    the same number of forward passes (ZeRO-3 gathers weights collectively inside each one); the
    trainer keeps only the first `num_real` predictions of its shard.
    """

    def __init__(self, length: int, *, rank: int, world_size: int, even: bool = True) -> None:
        _check_rank(rank, world_size)
        self.indices = list(range(rank, length, world_size))
        self.num_real = len(self.indices)
        if even and length:
            target = -(-length // world_size)
            self.indices += [self.indices[0] if self.indices else 0] * (target - self.num_real)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _check_rank(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size = {world_size!r} must be an integer >= 1.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank!r} must be an integer in [0, world_size) = [0, {world_size}).")


def build_dataloader(
    dataset: Any,
    collate_fn: Callable[[list], Any],
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    drop_last_batch: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over this rank's shard of `dataset` (`batch_size` is per rank).

    train=True: a seeded shuffle, the same permutation on every rank, cut into disjoint equal
    shards; call `set_epoch(loader, epoch)` before each epoch to reshuffle. When len(dataset) is
    not a multiple of world_size the last (< world_size) examples of each epoch's permutation are
    left out rather than repeated, so no example is seen twice in an epoch.
    train=False: the examples in order, in `ShardSampler` shards (see there for `num_real`).
    """
    _check_rank(rank, world_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size = {batch_size!r} must be an integer >= 1.")
    if len(dataset) == 0:
        raise DataError("The dataset is empty; there is nothing to batch.")
    sampler: Sampler[int]
    if train:
        if len(dataset) < world_size:
            raise DataError(f"{len(dataset)} training example(s) cannot fill {world_size} ranks; use more data "
                            "or fewer processes.")
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                      num_workers=num_workers, drop_last=drop_last_batch, pin_memory=pin_memory)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseeds the training shuffle for `epoch` (a no-op for evaluation loaders)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
