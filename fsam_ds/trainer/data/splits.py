"""A task's splits from where they are kept, each checked into one normalised `Dataset`; label sets, few-shot.

One route for every source: the hub, a GLUE-style folder or the user's files (`readers`) give a split's
columns, and `checks` makes them the split that is trained, evaluated or predicted on.

A GLUE-style folder (`source="glue-tsv"`) holds train.tsv and dev.tsv (or `<split>.tsv` for a split not
called validation), laid out as in the GLUE distribution:
    cola  headerless: source, label, original label, sentence (a header row naming `sentence`
          and `label` is also accepted)
    mrpc  header `Quality #1 ID #2 ID #1 String #2 String` (Quality is the label)
    qqp   header `id qid1 qid2 question1 question2 is_duplicate`
    stsb  header `index genre filename year old_index source1 source2 sentence1 sentence2 score`
    mnli  header `index promptID pairID genre ... sentence1 sentence2 [label1..label5] gold_label`,
          dev files dev_matched.tsv and dev_mismatched.tsv
Any other task (sst2, qnli, rte, wnli among them) reads a headered TSV whose columns carry the
task's own names; other columns, such as `index`, are ignored.
"""

from __future__ import annotations

import codecs
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping, Sequence

import datasets
import numpy as np
from datasets import ClassLabel, Dataset

from fsam_ds.trainer.data.checks import (LABEL, DataError, RawSplit, label_key, normalized_split, quoted, renamed,
                                         warn_case_variants)
from fsam_ds.trainer.data.readers import PathLike, read_delimited, read_split_file
from fsam_ds.trainer.tasks import GLUE_TASKS, TaskSpec, get_task

SOURCES = ("hub", "glue-tsv", "files")
HUB_PROBE_TIMEOUT_S = 5.0
LOCAL_FILES_HINT = ("Or train on local files: data.source=local with data.train_file and data.dev_file (CSV, TSV, "
                    "JSON lines or Parquet with the task's columns), or data.data_dir for a GLUE-style folder "
                    "(load_task_splits: source='files' with data_files, or source='glue-tsv' with data_dir).")


@dataclass(frozen=True)
class TsvLayout:
    """How one GLUE task's TSV files are laid out."""

    names: tuple[str, ...] = ()
    """Column names of a headerless file; empty when the file has a header row."""
    rename: Mapping[str, str] = field(default_factory=dict, hash=False)
    """File column -> task column (applied only where the task column is absent)."""
    dev_files: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Dev split -> file name, where it is not dev.tsv."""


GLUE_TSV_LAYOUTS: Mapping[str, TsvLayout] = MappingProxyType({
    "cola": TsvLayout(names=("source", "label", "original_label", "sentence")),
    "mrpc": TsvLayout(rename={"Quality": "label", "#1 String": "sentence1", "#2 String": "sentence2"}),
    "qqp": TsvLayout(rename={"is_duplicate": "label"}),
    "stsb": TsvLayout(rename={"score": "label"}),
    "mnli": TsvLayout(rename={"sentence1": "premise", "sentence2": "hypothesis", "gold_label": "label"},
                      dev_files={"validation_matched": "dev_matched.tsv",
                                 "validation_mismatched": "dev_mismatched.tsv"}),
})
"""The GLUE tasks whose files are not a headered TSV with the task's own column names."""


def _glue_tsv_path(data_dir: Path, spec: TaskSpec, split: str) -> Path:
    files = {"validation": "dev.tsv", **GLUE_TSV_LAYOUTS.get(spec.name, TsvLayout()).dev_files,
             spec.train_split: "train.tsv"}
    return data_dir / files.get(split, f"{split}.tsv")


def _read_glue_tsv(data_dir: Path, spec: TaskSpec, split: str, bad_rows: str, encoding: str) -> RawSplit:
    """Task `spec`'s `split` from the GLUE-style folder `data_dir`, its columns renamed to the task's."""
    path = _glue_tsv_path(data_dir, spec, split)
    if not path.is_file():
        raise DataError(f"{path} not found. A GLUE-style folder for task {spec.name!r} holds "
                        f"train.tsv and {', '.join(_glue_tsv_path(data_dir, spec, s).name for s in spec.dev_splits)}; "
                        "point data_dir at that folder, or use source='files' with data_files={split: path}.")
    layout = GLUE_TSV_LAYOUTS.get(spec.name, TsvLayout())
    columns = read_delimited(path, tsv=True, encoding=encoding, names=layout.names,
                             required=spec.required_columns, bad_rows=bad_rows)
    return RawSplit(f"File {str(path)!r}", renamed(columns, layout.rename))


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one request, no retries), or None when it answers at all."""
    try:
        urllib.request.urlopen(urllib.request.Request(datasets.config.HF_ENDPOINT, method="HEAD"),
                               timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # an error status is still an answer
    except OSError as err:  # URLError (refused, no route, no name) and timeouts
        return f"{type(err).__name__}: {getattr(err, 'reason', err)}"
    return None


def _hub_name(spec: TaskSpec) -> str:
    return repr(spec.hub_id) + (f", config {spec.hub_config!r}" if spec.hub_config else "")


def _check_hub(spec: TaskSpec) -> None:
    """Fails at once when the hub cannot be reached, where datasets would retry for about half a minute."""
    why = None if datasets.config.HF_HUB_OFFLINE else _hub_unreachable()
    if why is not None:
        raise DataError(f"Cannot load the hub dataset {_hub_name(spec)} (task {spec.name!r}): the Hugging Face hub "
                        f"at {datasets.config.HF_ENDPOINT} does not answer ({why}). Check the network, or, if the "
                        "dataset is already in your datasets cache, set HF_HUB_OFFLINE=1 to load it from there. "
                        f"{LOCAL_FILES_HINT}")


def _read_hub(spec: TaskSpec, split: str, hub_kwargs: Mapping[str, Any], rename: Mapping[str, str]) -> RawSplit:
    """The columns of the task's `split` that it reads (and those `rename` names) from its hub dataset."""
    if spec.hub_id is None:
        raise DataError(f"Task {spec.name!r} has no hub dataset; load it with source='files' or 'glue-tsv'.")
    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=split, **dict(hub_kwargs))
    except ConnectionError as err:
        if not datasets.config.HF_HUB_OFFLINE:
            raise
        raise DataError(f"Cannot load the hub dataset {_hub_name(spec)} (task {spec.name!r}): the hub is switched "
                        f"off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and the dataset is not in the datasets cache "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Unset the variable "
                        f"to download it once. {LOCAL_FILES_HINT}") from None
    wanted = set(spec.required_columns) | set(rename)
    present = list(ds.column_names)
    ds = ds.select_columns([c for c in present if c in wanted])
    return RawSplit(f"Hub dataset {_hub_name(spec)}, split {split!r},", ds.to_dict(), present=present)


def load_task_splits(task: str | TaskSpec, source: Literal["hub", "glue-tsv", "files"], *,
                     data_dir: PathLike | None = None, data_files: Mapping[str, PathLike] | None = None,
                     columns: Mapping[str, str] | None = None, splits: Sequence[str] | None = None,
                     train_per_class: int | None = None, seed: int = 0, bad_rows: Literal["warn", "error"] = "warn",
                     hub_kwargs: Mapping[str, Any] | None = None, encoding: str = "utf-8",
                     tables: Mapping[PathLike, Mapping[str, list]] | None = None) -> dict[str, Dataset]:
    """The task's train split and every dev split, keyed by split name, normalised and checked.

    source: "hub" (`datasets.load_dataset(task.hub_id, task.hub_config, split=...)`, extra arguments in
    `hub_kwargs`), "glue-tsv" (a GLUE-style folder `data_dir`, see the module doc) or "files" (`data_files`
    maps each split to a .csv/.tsv/.json/.jsonl/.parquet file with the task's column names). `columns`
    renames data columns to task columns. `train_per_class` keeps that many training examples per class,
    chosen by `seed` (see `sample_per_class`). `bad_rows`: CSV/TSV rows of the wrong width are skipped with a
    warning, or raise. `encoding`: the text encoding of CSV/TSV/JSON files. `tables` (source "files"):
    files already read with `read_split_file` (same `bad_rows` and `encoding`) -> their columns, used
    instead of reading them again.
    """
    spec = get_task(task)
    rename = dict(columns or {})
    wanted = tuple(splits) if splits is not None else (spec.train_split, *spec.dev_splits)
    if source not in SOURCES:
        raise DataError(f"source = {source!r} is not one of {', '.join(SOURCES)}.")
    if bad_rows not in ("warn", "error"):
        raise DataError(f"bad_rows = {bad_rows!r} must be 'warn' or 'error'.")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"data.encoding = {encoding!r} is not a text encoding Python knows; use e.g. utf-8, "
                        "latin-1 or cp1252 (the names of Python's codecs module).") from None
    if source == "glue-tsv" and data_dir is None:
        raise DataError("source='glue-tsv' needs data_dir, the folder holding train.tsv and the dev file(s).")
    if source == "files":
        if not data_files:
            raise DataError(f"source='files' needs data_files, a mapping from split name ({quoted(wanted)}) "
                            "to a file.")
        known = {spec.train_split, *spec.dev_splits, *wanted}
        unknown = [k for k in data_files if k not in known]
        absent = [s for s in wanted if s not in data_files]
        if unknown or absent:
            raise DataError(f"data_files has keys {quoted(list(data_files))} but task {spec.name!r} loads the "
                            f"splits {quoted(wanted)}; name each file by one of those split names"
                            f"{' (missing: ' + quoted(absent) + ')' if absent else ''}.")
    if source != "files" and (data_files or tables):
        raise DataError(f"data_files and tables are only read with source='files', not {source!r}.")
    already_read = {Path(file): table for file, table in (tables or {}).items()}

    if source == "hub" and spec.hub_id is not None:
        _check_hub(spec)
    out: dict[str, Dataset] = {}
    for split in wanted:
        split_spec = spec.task_for_split(split)
        if source == "hub":
            raw = _read_hub(split_spec, split, hub_kwargs or {}, rename)
        elif source == "glue-tsv":
            raw = _read_glue_tsv(Path(data_dir), split_spec, split, bad_rows, encoding)  # type: ignore[arg-type]
        else:
            path = Path(data_files[split])  # type: ignore[index]
            table = already_read.get(path) or read_split_file(path, bad_rows=bad_rows, encoding=encoding)
            raw = RawSplit(f"File {str(path)!r}", dict(table))
            if path.suffix.lower() == ".tsv" and split_spec.name in GLUE_TASKS:
                raw.hint = " For the GLUE distribution's own TSV files use source='glue-tsv' with data_dir."
        out[split] = normalized_split(raw, split_spec, rename)
    if train_per_class is not None and spec.train_split in out:
        out[spec.train_split] = sample_per_class(out[spec.train_split], train_per_class, seed=seed)
    return out


def prediction_split(task: str | TaskSpec, path: PathLike, columns: Mapping[str, list]) -> Dataset:
    """The texts (`text_a`, [`text_b`]) of every row of a file to predict on, in file order, from
    `columns`, the file as `read_table` read it (`path` names it in messages); the label column is not
    needed (and not read)."""
    return normalized_split(RawSplit(f"File {str(path)!r}", dict(columns)), get_task(task), {}, labelled=False)


def infer_label_names(path: PathLike, label_column: str, *, encoding: str = "utf-8",
                      columns: Mapping[str, list] | None = None) -> tuple[str, ...]:
    """The distinct labels of a file's `label_column`, sorted (numerically when every label is a
    number, else as text): the label set of a classification task on the user's own data. `columns`:
    the file as `read_split_file` read it already (`path` then only names it in messages)."""
    path = Path(path)
    if columns is None:
        columns = read_split_file(path, encoding=encoding)
    origin = f"File {str(path)!r}"
    if label_column not in columns:
        raise DataError(f"{origin} has no column {label_column!r} to read the labels from. Columns present: "
                        f"{quoted(list(columns)) or 'none'}. Name the label column with "
                        "--data.label_column=<column>.")
    values = columns[label_column]
    if not values:
        raise DataError(f"{origin} has no rows (a header row only, or every row was skipped; see any warning "
                        "above), so there are no labels to read the classes from and no examples to train on. Add "
                        "examples, one per row below the header, or give data.train_file a file that has them.")
    missing = [i for i, value in enumerate(values) if label_key(value) in (None, "")]
    if missing:
        raise DataError(f"{origin} column {label_column!r} is empty in {len(missing)} row(s) (rows "
                        f"{quoted(missing[:10])}{', ...' if len(missing) > 10 else ''}, counted from 0); every "
                        "training example needs a label. Fill or drop those rows.")
    keys = {key for key in map(label_key, values) if key is not None}
    try:
        names = tuple(sorted(keys, key=float))
    except ValueError:  # not every label is a number
        names = tuple(sorted(keys))
    warn_case_variants(origin, label_column, names)
    if len(names) < 2:
        raise DataError(f"{origin} column {label_column!r} holds {len(names)} distinct label(s) "
                        f"({quoted(names)}); a classifier needs at least two classes. Train on data with every "
                        "class, give the label set with --data.labels=<class>,<class>,..., or, for numeric "
                        "scores, use --task=regression.")
    return names


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
        chosen.append(np.random.default_rng([seed, class_id]).permutation(members)[:n])
    return dataset.select(np.sort(np.concatenate(chosen)).tolist())
