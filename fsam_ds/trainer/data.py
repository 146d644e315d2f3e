"""A task's train and dev data: loading, checks, few-shot subsets, tokenization, batching.

Every loaded split is normalised to the columns `text_a`, `text_b` (pair tasks only) and
`label` (class ids under a `ClassLabel`, or float64 scores), whatever its source.

GLUE TSV folders (`source="glue-tsv"`) are read in the layouts of the GLUE distribution:
    cola  headerless: source, label, original label, sentence (a header row naming `sentence`
          and `label` is also accepted)
    mrpc  header `Quality #1 ID #2 ID #1 String #2 String` (Quality is the label)
    qqp   header `id qid1 qid2 question1 question2 is_duplicate`
    stsb  header `index genre filename year old_index source1 source2 sentence1 sentence2 score`
    mnli  header `index promptID pairID genre ... sentence1 sentence2 [label1..label5] gold_label`,
          dev files dev_matched.tsv and dev_mismatched.tsv
Any other task (sst2, qnli, rte, wnli among them) reads a headered TSV whose columns carry the
task's own names; other columns, such as `index`, are ignored. Files are train.tsv and dev.tsv (or
`<split>.tsv` for a split not called validation). Fields are split on tabs with no quote handling,
as the GLUE files require.

Files are read by datasets' csv, json and parquet builders, in the encoding given (utf-8 unless
told); our checks on top name the file and the fix: rows of the wrong width, missing columns,
labels outside the task's set, an empty split, undecodable text. The hub is probed once before a
hub dataset is loaded, so that an unreachable hub fails at once instead of after datasets' retries.
"""

from __future__ import annotations

import codecs
import csv
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fsam_ds.trainer.tasks import GLUE_TASKS, OWN_DATA_TASKS, TaskSpec, get_task

TEXT_A, TEXT_B, LABEL = "text_a", "text_b", "label"
SOURCES = ("hub", "glue-tsv", "files")
FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}

PathLike = str | os.PathLike


class DataError(ValueError):
    """Data that does not fit its task; the message names the file, the field and the fix."""


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

def _encoding_error(path: Path, encoding: str, err: UnicodeError) -> DataError:
    return DataError(
        f"{path} is not valid {encoding} text ({err}). Save the file as UTF-8, or give its encoding: "
        "--data.encoding=latin-1 (or cp1252, utf-16, ...) for fsam-train, encoding='latin-1' for "
        "load_task_splits.")


def _load_file(builder: str, path: Path, encoding: str, fix: str = "", **options: Any) -> dict[str, list]:
    """The columns of one file as read by datasets' `builder` ("csv", "json" or "parquet"); `fix` is
    what a read error tells the user to do."""
    import datasets

    if builder != "parquet":
        options["encoding"] = encoding
    # a private cache for each read: a changed file is never answered from an earlier read, a second
    # read warns about bad rows again, and nothing is left behind
    with tempfile.TemporaryDirectory(prefix="fsam-data-") as cache:
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                         keep_in_memory=True, **options).to_dict()
        except Exception as err:
            detail: BaseException = err  # datasets raises its own DatasetGenerationError around the reader's error
            while detail.__cause__ is not None:
                detail = detail.__cause__
            if isinstance(detail, UnicodeError):
                raise _encoding_error(path, encoding, detail) from None
            fix = fix or f"Repair the file, or save it in one of the formats {', '.join(FILE_FORMATS)}"
            raise DataError(f"{path} could not be read ({type(detail).__name__}: {str(detail).strip()}). "
                            f"{fix}.") from err


def _as_written(field: str | None) -> str | None:
    # a converter keeps every field the text it was in the file: pandas' python engine would otherwise
    # turn "1.0" into "1" and "5.000" into "5"
    return field


def _read_delimited(path: Path, *, tsv: bool, encoding: str, names: Sequence[str] = (),
                    required: Sequence[str] = (), bad_rows: str) -> dict[str, list]:
    """A CSV (quoted) or TSV (no quoting) file read by datasets' csv builder, every column as text.

    Rows with more fields than the header are pandas' bad lines; rows with fewer come back with
    missing (None) fields. Both are skipped with one warning, or raise (`bad_rows` "warn" or "error";
    "keep-all" raises too, for readers whose rows must stay aligned with the file's, and its message
    offers no skipping).

    A row whose one field is empty (`""`, as csv writers write it) is a row with an empty text. A blank
    line is no row, as for Python's csv.DictReader: blank lines at the end of the file are dropped, and
    those within the data are skipped ("warn", "error") or, with "keep-all", refused with their rows.
    """
    import pandas as pd

    # pandas' python engine, unlike its C engine, leaves the fields missing from a short row empty (None),
    # so that they can be told apart from fields that are there and blank; index_col=False stops it from
    # taking a row with one field too many as the sign of an unnamed index column. skip_blank_lines=False:
    # pandas would otherwise drop a row whose only field is empty (`""`) as if it were a blank line; blank
    # lines come back as rows with every field None and are told apart below
    options: dict[str, Any] = {"sep": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"sep": ","}
    options.update(engine="python", keep_default_na=False, index_col=False, skip_blank_lines=False)
    skip = (" (rows are never skipped here: the fix belongs in the file)" if bad_rows == "keep-all"
            else ", or pass bad_rows='warn' to skip rows of the wrong width with a warning")
    blank_first = DataError(f"{path}: line 1 is blank, but the first line must be the header row (or, in a "
                            "headerless GLUE file, the first example). Delete the blank line(s) above it.")
    try:
        try:
            first = pd.read_csv(path, header=None, nrows=2, dtype=str, encoding=encoding, **options)
        except pd.errors.ParserError as err:
            # line 2 has more fields than line 1: line 1 is blank, or line 2 is a row too long (which the
            # full read would cut to the header's width, as pandas does to the first row after the header)
            if pd.read_csv(path, header=None, nrows=1, dtype=str, encoding=encoding, **options).empty:
                raise blank_first from None
            raise DataError(f"{path} could not be read (ParserError: {err}). Repair the line"
                            f"{skip if bad_rows != 'warn' else ''}.") from None
    except UnicodeError as err:
        raise _encoding_error(path, encoding, err) from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty; give a file with a header row and at least one example.") from None
    if first.iloc[0].isna().all():
        raise blank_first
    header = [str(c).strip() for c in first.iloc[0]]
    # a headerless layout may still be given a header naming the task's columns
    headerless = bool(names) and not set(required) <= set(header)
    columns = list(names) if headerless else header
    if len(first) < 2 and not headerless:
        return {name: [] for name in columns}  # a header only: load_task_splits says what to add
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        data = _load_file("csv", path, encoding, header=None if headerless else 0, names=columns,
                          converters=dict.fromkeys(columns, _as_written),
                          on_bad_lines="warn" if bad_rows == "warn" else "error", fix=f"Repair the line{skip}",
                          **options)
    long_rows = [str(w.message).strip() for w in caught if issubclass(w.category, pd.errors.ParserWarning)]
    for w in caught:
        if not issubclass(w.category, pd.errors.ParserWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    blank = _blank_lines(path, data, columns, keep_all=bad_rows == "keep-all")
    short = [i for i in range(len(data[columns[0]]))
             if i not in blank and any(data[name][i] is None for name in columns)]
    if short and bad_rows != "warn":
        rows = ", ".join(str(i + 1) for i in short[:10]) + (", ..." if len(short) > 10 else "")
        raise DataError(f"{path}: row(s) {rows} (counted after the header) have fewer fields than the header's "
                        f"{len(columns)} ({', '.join(columns)}). Repair them{skip}.")
    skipped = [f"row {i + 1} after the header has fewer fields" for i in short] + long_rows
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} row(s) whose field count differs from the header's "
                      f"{len(columns)}: {'; '.join(skipped[:10])}{'; ...' if len(skipped) > 10 else ''}.",
                      stacklevel=3)
    dropped = blank | set(short)
    if dropped:
        data = {name: [v for i, v in enumerate(values) if i not in dropped] for name, values in data.items()}
    return data


def _blank_lines(path: Path, data: dict[str, list], columns: Sequence[str], *, keep_all: bool) -> set[int]:
    """The rows of `data` that are blank lines (every field None). With `keep_all` a blank line before the
    last row is an error: it is no row, and skipping it would leave the rows' places unaccounted for."""
    n = len(data[columns[0]])
    blank = {i for i in range(n) if all(data[name][i] is None for name in columns)}
    end = n  # blank lines at the end of the file are its end
    while end - 1 in blank:
        end -= 1
    inner = sorted(i for i in blank if i < end)
    if inner and keep_all:
        rows = ", ".join(str(i + 1) for i in inner[:10]) + (", ..." if len(inner) > 10 else "")
        raise DataError(f"{path}: row(s) {rows} (counted after the header) are blank lines. A blank line holds "
                        "no row, and rows are never skipped here, so that each row keeps its place (fsam-predict "
                        "writes one prediction per row, in file order). Delete the blank line(s); for a row whose "
                        'only text is empty, write "" on that line, as csv writers do.')
    return blank


def _read_json(path: Path, encoding: str) -> dict[str, list]:
    """A JSON lines file, a JSON list of objects, an object of column lists or {"data": [objects]}."""
    data = _load_file("json", path, encoding, fix="Each line of a JSON lines file must hold one complete object; a "
                      ".json file may instead hold one list of objects or one object of column lists")
    # datasets reads one top-level object as one example; these two forms hold the whole split
    if data and all(len(values) == 1 and isinstance(values[0], list) for values in data.values()):
        row = {name: values[0] for name, values in data.items()}
        if list(row) == ["data"] and all(isinstance(r, dict) for r in row["data"]):
            names = dict.fromkeys(name for record in row["data"] for name in record)
            return {name: [record.get(name) for record in row["data"]] for name in names}
        if len({len(values) for values in row.values()}) > 1:
            raise DataError(f"{path}: the column lists have different lengths "
                            f"({ {k: len(v) for k, v in row.items()} }); every column needs one value per example.")
        return row
    return data


def _read_file(path: Path, *, bad_rows: str, encoding: str) -> dict[str, list]:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                        f"{', '.join(FILE_FORMATS)} (the format is taken from the extension).")
    if not path.is_file():
        raise DataError(f"{path} not found; check the path given for this split.")
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, tsv=fmt == "tsv", encoding=encoding, bad_rows=bad_rows)
    if fmt == "parquet":
        return _load_file("parquet", path, encoding)
    return _read_json(path, encoding)


def read_table(path: PathLike, *, encoding: str = "utf-8") -> dict[str, list]:
    """The columns of one csv, tsv, json, jsonl or parquet file (the format from its extension) as read
    for a task; a row of the wrong width is an error that names it, never skipped, so that the rows
    stay aligned with anything computed from them."""
    return _read_file(Path(path), bad_rows="keep-all", encoding=encoding)


def read_split_file(path: PathLike, *, encoding: str = "utf-8",
                    bad_rows: Literal["warn", "error"] = "warn") -> dict[str, list]:
    """The columns of one split's file as `load_task_splits` reads it with source="files" (CSV/TSV rows
    of the wrong width skipped with a warning, or raising); pass them back in its `tables` so that the
    file is not read twice."""
    return _read_file(Path(path), bad_rows=bad_rows, encoding=encoding)


def table_rows(columns: Mapping[str, list]) -> list[dict[str, Any]]:
    """The rows of a table (`read_table`'s columns), in order, each a {column: value} dict."""
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _glue_tsv_path(data_dir: Path, spec: TaskSpec, split: str) -> Path:
    layout = GLUE_TSV_LAYOUTS.get(spec.name, TsvLayout())
    if split == spec.train_split:
        name = "train.tsv"
    else:
        name = layout.dev_files.get(split) or ("dev.tsv" if split == "validation" else f"{split}.tsv")
    return data_dir / name


def _read_glue_tsv(data_dir: Path, spec: TaskSpec, split: str, bad_rows: str, encoding: str) -> _Raw:
    path = _glue_tsv_path(data_dir, spec, split)
    if not path.is_file():
        raise DataError(f"{path} not found. A GLUE-style folder for task {spec.name!r} holds "
                        f"train.tsv and {', '.join(_glue_tsv_path(data_dir, spec, s).name for s in spec.dev_splits)}; "
                        "point data_dir at that folder, or use source='files' with data_files={split: path}.")
    layout = GLUE_TSV_LAYOUTS.get(spec.name, TsvLayout())
    columns = _read_delimited(path, tsv=True, encoding=encoding, names=layout.names,
                              required=spec.required_columns, bad_rows=bad_rows)
    columns = _renamed(columns, layout.rename)
    return _Raw(f"File {str(path)!r}", columns)


HUB_PROBE_TIMEOUT_S = 5.0
LOCAL_FILES_HINT = ("Or train on local files: data.source=local with data.train_file and data.dev_file (CSV, TSV, "
                    "JSON lines or Parquet with the task's columns), or data.data_dir for a GLUE-style folder "
                    "(load_task_splits: source='files' with data_files, or source='glue-tsv' with data_dir).")


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (one request, no retries), or None when it answers at all."""
    import datasets

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
    """Fails at once when the hub cannot be reached; datasets would retry for about half a minute."""
    import datasets

    why = None if datasets.config.HF_HUB_OFFLINE else _hub_unreachable()
    if why is not None:
        raise DataError(f"Cannot load the hub dataset {_hub_name(spec)} (task {spec.name!r}): the Hugging Face hub "
                        f"at {datasets.config.HF_ENDPOINT} does not answer ({why}). Check the network, or, if the "
                        "dataset is already in your datasets cache, set HF_HUB_OFFLINE=1 to load it from there. "
                        f"{LOCAL_FILES_HINT}")


def _read_hub(spec: TaskSpec, split: str, hub_kwargs: Mapping[str, Any], rename: Mapping[str, str]) -> _Raw:
    import datasets

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
    return _Raw(f"Hub dataset {_hub_name(spec)}, split {split!r},", ds.to_dict(), present=present)


# ---------------------------------------------------------------------------------------- checking

def _renamed(columns: dict[str, list], rename: Mapping[str, str]) -> dict[str, list]:
    out = dict(columns)
    for old, new in rename.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def _quoted(values: Sequence[Any]) -> str:
    return ", ".join(repr(v) for v in values)


OWN_COLUMNS_FLAGS = "--data.text_columns=<text column>[,<second text column>] --data.label_column=<label column>"


def _missing_columns(raw: _Raw, spec: TaskSpec, missing: list[str], rename: Mapping[str, str],
                     labelled: bool = True) -> DataError:
    texts = _quoted(spec.text_templates) if spec.text_templates else _quoted(spec.text_columns)
    also = f" (and {_quoted(missing[1:])})" if len(missing) > 1 else ""
    after = f" after renaming with columns={dict(rename)}" if rename else ""
    label = f", label from {spec.label_column!r}" if labelled else ""
    if not labelled:  # a file to predict on: the columns are those the model was trained on
        fix = f"Give a file with the column(s) {texts}, or rename its columns to those."
    elif spec.name in OWN_DATA_TASKS:
        fix = f"Name the file's columns: {OWN_COLUMNS_FLAGS}."
    else:
        fix = (f"Rename the column in the data, or pass columns={{'<column in the data>': {missing[0]!r}}} to "
               f"load_task_splits; or, from the command line, train on the file as your own data: "
               f"--task={'regression' if spec.is_regression else 'classification'} {OWN_COLUMNS_FLAGS}.")
    return DataError(
        f"{raw.origin} has no column {missing[0]!r}{also}{after}, which task {spec.name!r} needs "
        f"(texts from {texts}{label}). Columns present: "
        f"{_quoted(raw.present or list(raw.columns)) or 'none'}. {fix}{raw.hint}")


def _bad_listing(bad: Counter) -> str:
    shown = [f"{value} ({count} row{'s' if count > 1 else ''})" for value, count in bad.most_common(8)]
    return ", ".join(shown) + (", ..." if len(bad) > 8 else "")


def _label_key(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()  # bools become BoolQ/WiC's "True"/"False"
    try:
        number = float(text)
    except ValueError:
        return text
    # "1.0" as written by tools that store labels as floats is class 1.
    return str(int(number)) if number.is_integer() else text


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _class_ids(values: list, spec: TaskSpec, origin: str) -> list[int]:
    assert spec.label_names is not None
    # class ids stand for the classes too, unless a class is itself named by an integer (own data
    # labelled 1, 2, 5): then "1" must mean that class, and "0" no class at all
    ids_allowed = not any(_is_integer(name) for name in spec.label_names)
    lookup = {str(i): i for i in range(spec.num_labels)} if ids_allowed else {}
    lookup.update({name: i for i, name in enumerate(spec.label_names)})
    lookup.update(spec.label_map or {})
    keys = [_label_key(value) for value in values]
    bad = Counter(repr(value) for value, key in zip(values, keys) if key not in lookup)
    if bad:
        raw = f"; or the raw values {_quoted(list(spec.label_map))} (label_map)" if spec.label_map else ""
        ids = f"the ids 0..{spec.num_labels - 1}, or " if ids_allowed else ""
        unlabeled = (" -1 is how GLUE and SuperGLUE mark unlabelled test examples; load a labelled split."
                     if "-1" in bad or "'-1'" in bad else "")
        if spec.name in OWN_DATA_TASKS:
            fix = ("Fix or drop those rows, or give the whole label set with --data.labels=<class>,<class>,... "
                   "(without it the label set is the sorted labels of data.train_file).")
        else:
            own = (f" From the command line, train on the file as your own data instead, with the labels it has: "
                   f"--task=classification --data.text_columns={','.join(spec.text_columns)} "
                   f"--data.label_column={spec.label_column} (the label set is then read from data.train_file, "
                   "or given with --data.labels)." if spec.text_templates is None else "")
            fix = ("Fix or drop those rows, or, from Python, pass a task with a label_map "
                   f"(dataclasses.replace(task, label_map={{...}})) that maps them to class ids.{own}")
        raise DataError(
            f"{origin} column {spec.label_column!r} has {sum(bad.values())} label(s) outside the label set of "
            f"task {spec.name!r}: {_bad_listing(bad)}. Allowed: {ids}the names "
            f"{_quoted(spec.label_names)}{raw}.{unlabeled} {fix}")
    return [lookup[key] for key in keys]


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
                        f"{_quoted(list(columns)) or 'none'}. Name the label column with "
                        "--data.label_column=<column>.")
    values = columns[label_column]
    if not values:
        raise DataError(f"{origin} has no rows (a header row only, or every row was skipped; see any warning "
                        "above), so there are no labels to read the classes from and no examples to train on. Add "
                        "examples, one per row below the header, or give data.train_file a file that has them.")
    missing = [i for i, value in enumerate(values) if _label_key(value) in (None, "")]
    if missing:
        raise DataError(f"{origin} column {label_column!r} is empty in {len(missing)} row(s) (rows "
                        f"{_quoted(missing[:10])}{', ...' if len(missing) > 10 else ''}, counted from 0); every "
                        "training example needs a label. Fill or drop those rows.")
    keys = set(_label_key(value) for value in values)

    def number(key: str) -> float | None:
        try:
            return float(key)
        except ValueError:
            return None

    numeric = all(number(k) is not None for k in keys)
    names = tuple(sorted(keys, key=number if numeric else None))  # type: ignore[arg-type]
    _warn_case_variants(origin, label_column, names)
    if len(names) < 2:
        raise DataError(f"{origin} column {label_column!r} holds {len(names)} distinct label(s) "
                        f"({_quoted(names)}); a classifier needs at least two classes. Train on data with every "
                        "class, give the label set with --data.labels=<class>,<class>,..., or, for numeric "
                        "scores, use --task=regression.")
    return names  # type: ignore[return-value]


def _warn_case_variants(origin: str, label_column: str, names: Sequence[str]) -> None:
    """Warns about labels that differ only in case ('pos', 'Pos'): each is a class of its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.casefold(), []).append(name)
    alike = [sorted(group) for group in groups.values() if len(group) > 1]
    if alike:
        listed = "; ".join(" and ".join(repr(n) for n in group) for group in sorted(alike))
        warnings.warn(f"{origin} column {label_column!r} has labels that differ only in case: {listed}. Each is a "
                      f"class of its own ({len(names)} classes in all). If they are meant to be one class, write "
                      "them alike in the file (e.g. all lower case); if they are distinct classes, give the label "
                      "set with --data.labels=<class>,<class>,... to say so (which also silences this warning).",
                      stacklevel=3)


def warn_empty_texts(origin: str, where: str, values: Sequence[Any], what: str) -> None:
    """Warns with the count and rows (from 1) of the texts in `where` (e.g. "column 'text'") of the
    file or split `origin` that are empty or only whitespace; `what` says what such a row gives the model."""
    empty = [i for i, v in enumerate(values) if isinstance(v, str) and not v.strip()]
    if empty:
        shown = ", ".join(str(i + 1) for i in empty[:10]) + (", ..." if len(empty) > 10 else "")
        warnings.warn(f"{origin} {where} is empty (or only whitespace) in {len(empty)} of {len(values)} "
                      f"row(s) ({'row' if len(empty) == 1 else 'rows'} {shown}, counted from 1): {what}. "
                      "Fill or drop those rows if that is not meant.", stacklevel=3)


def _score(value: Any) -> float:
    try:
        return math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return math.nan


def _scores(values: list, spec: TaskSpec, origin: str) -> list[float]:
    scores = [_score(value) for value in values]
    bad = Counter(repr(value) for value, score in zip(values, scores) if not math.isfinite(score))
    if bad:
        raise DataError(
            f"{origin} column {spec.label_column!r} has {sum(bad.values())} label(s) that are not finite "
            f"numbers: {_bad_listing(bad)}. Task {spec.name!r} is a regression task, so every label must be a "
            "float (e.g. STS-B similarity in [0, 5]); fix or drop those rows.")
    return scores


def _normalize(raw: _Raw, spec: TaskSpec, rename: Mapping[str, str], labelled: bool = True) -> Dataset:
    """`text_a`, [`text_b`] and, when `labelled`, `label` of every row (see the module doc)."""
    columns = _renamed(raw.columns, rename)
    needed = [c for c in spec.required_columns if labelled or c != spec.label_column]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise _missing_columns(raw, spec, missing, rename, labelled)
    if not columns[needed[0]]:
        raise DataError(
            f"{raw.origin} has no examples (only a header row, or every row was skipped; see any warning above), "
            f"so task {spec.name!r} has nothing to train or evaluate on in this split. Add examples, one per row, "
            "below the header, or give this split a file that has them (data.train_file / data.dev_file; "
            "data_files in load_task_splits).")
    fields = [c for c in spec.required_columns if c != spec.label_column]
    for name in fields:
        empty = [i for i, v in enumerate(columns[name]) if v is None]
        if empty:
            raise DataError(f"{raw.origin} column {name!r} is null in {len(empty)} row(s) (rows "
                            f"{_quoted(empty[:10])}{', ...' if len(empty) > 10 else ''}); task {spec.name!r} reads "
                            "text from it. Fill or drop those rows.")
        warn_empty_texts(raw.origin, f"column {name!r}", columns[name], "the model reads no text from it there")
    rows = [dict(zip(fields, values)) for values in zip(*(columns[c] for c in fields))]
    texts = list(zip(*(spec.texts(row) for row in rows)))  # one tuple per text column
    data: dict[str, list] = {TEXT_A: list(texts[0])}
    features = {TEXT_A: Value("string")}
    if spec.is_pair:
        data[TEXT_B] = list(texts[1])
        features[TEXT_B] = Value("string")
    if not labelled:
        return Dataset.from_dict(data, features=Features(features))
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
    encoding: str = "utf-8",
    tables: Mapping[PathLike, Mapping[str, list]] | None = None,
) -> dict[str, Dataset]:
    """The task's train split and every dev split, keyed by split name, normalised and checked.

    source: "hub" (`datasets.load_dataset(task.hub_id, task.hub_config, split=...)`, extra
    arguments in `hub_kwargs`), "glue-tsv" (a GLUE-style folder `data_dir`, see the module doc)
    or "files" (`data_files` maps each split to a .csv/.tsv/.json/.jsonl/.parquet file with the
    task's column names). `columns` renames data columns to task columns. `train_per_class`
    keeps that many training examples per class, chosen by `seed` (see `sample_per_class`).
    `bad_rows`: CSV/TSV rows of the wrong width are skipped with a warning, or raise. `encoding`:
    the text encoding of CSV/TSV/JSON files. `tables` (source "files"): files already read with
    `read_split_file` (same `bad_rows` and `encoding`) -> their columns, used instead of reading them again.
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
            raise DataError(f"source='files' needs data_files, a mapping from split name ({_quoted(wanted)}) "
                            "to a file.")
        known = {spec.train_split, *spec.dev_splits, *wanted}
        unknown = [k for k in data_files if k not in known]
        absent = [s for s in wanted if s not in data_files]
        if unknown or absent:
            raise DataError(f"data_files has keys {_quoted(list(data_files))} but task {spec.name!r} loads the "
                            f"splits {_quoted(wanted)}; name each file by one of those split names"
                            f"{' (missing: ' + _quoted(absent) + ')' if absent else ''}.")
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
            table = already_read.get(path) or _read_file(path, bad_rows=bad_rows, encoding=encoding)
            raw = _Raw(f"File {str(path)!r}", dict(table))
            if path.suffix.lower() == ".tsv" and split_spec.name in GLUE_TASKS:
                raw.hint = " For the GLUE distribution's own TSV files use source='glue-tsv' with data_dir."
        out[split] = _normalize(raw, split_spec, rename)
    if train_per_class is not None and spec.train_split in out:
        out[spec.train_split] = sample_per_class(out[spec.train_split], train_per_class, seed=seed)
    return out


def prediction_split(task: str | TaskSpec, path: PathLike, columns: Mapping[str, list]) -> Dataset:
    """The texts (`text_a`, [`text_b`]) of every row of a file to predict on, in file order, from
    `columns`, the file as `read_table` read it (`path` names it in messages); the label column is not
    needed (and not read)."""
    return _normalize(_Raw(f"File {str(path)!r}", dict(columns)), get_task(task), {}, labelled=False)


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


# ------------------------------------------------------------------------------------ tokenization

def tokenize(dataset: Dataset, tokenizer: Any, *, max_length: int = 128) -> Dataset:
    """Token ids of each example (a pair when the split has `text_b`), truncated to `max_length`.

    Returns a torch-formatted Dataset with `input_ids`, `attention_mask`, `token_type_ids` when
    the tokenizer produces them, and `labels` (int64 classes or float32 scores) when the split has
    labels (`prediction_split`'s have none). Not padded.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length = {max_length!r} must be an integer >= 1.")
    if TEXT_A not in dataset.column_names:
        raise DataError(f"tokenize expects a split from load_task_splits or prediction_split (columns "
                        f"{TEXT_A!r}, [{TEXT_B!r}], [{LABEL!r}]); {TEXT_A!r} is missing from "
                        f"{_quoted(dataset.column_names)}.")
    pair = TEXT_B in dataset.column_names
    labelled = LABEL in dataset.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        # the tokenizer returns the inputs its model takes (its model_input_names), token types or not
        enc = tokenizer(batch[TEXT_A], batch[TEXT_B] if pair else None, truncation=True, max_length=max_length)
        return {**enc, "labels": batch[LABEL]} if labelled else dict(enc)

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    if labelled:
        regression = not isinstance(dataset.features[LABEL], ClassLabel)
        tokenized = tokenized.cast_column("labels", Value("float32" if regression else "int64"))
    return tokenized.with_format("torch")


def padding_collator(tokenizer: Any, *, pad_to_multiple_of: int | None = None) -> Callable[[list], dict]:
    """transformers' DataCollatorWithPadding: each batch padded to its own longest sequence (optionally
    rounded up to a multiple) with the tokenizer's pad token, token type and padding side; labels keep
    their dtype (int64 classes, float32 scores)."""
    from transformers import DataCollatorWithPadding

    if tokenizer.pad_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no pad token, so batches cannot be padded; set "
                        "tokenizer.pad_token (e.g. to its eos token) before building the collator.")
    return DataCollatorWithPadding(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                                   return_tensors="pt")


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
) -> DataLoader:
    """A loader over this rank's shard of `dataset` (`batch_size` is per rank).

    train=True: a seeded shuffle, the same permutation on every rank, cut into disjoint equal
    shards; call `set_epoch(loader, epoch)` before each epoch to reshuffle. When len(dataset) is
    not a multiple of world_size the last (< world_size) examples of each epoch's permutation are
    left out rather than repeated, so no example is seen twice in an epoch.
    train=False: the examples in order, in `ShardSampler` shards (see there for `num_real`).
    """
    _check_rank(rank, world_size)
    sampler: Sampler[int]
    if train:
        if len(dataset) < world_size:
            raise DataError(f"{len(dataset)} training example(s) cannot fill {world_size} ranks; use more data "
                            "or fewer processes.")
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseeds the training shuffle for `epoch` (a no-op for evaluation loaders)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
