"""A split's columns checked against its task and normalised, each failed check a message naming the fix.

Whatever its source, a split becomes the columns `text_a`, `text_b` (pair tasks only) and `label` (class
ids under a `ClassLabel`, or float64 scores); a check that fails names the file or hub split, the column,
the bad values and what to do.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from datasets import ClassLabel, Dataset, Features, Value

from fsam_ds.trainer.tasks import OWN_DATA_TASKS, TaskSpec

TEXT_A, TEXT_B, LABEL = "text_a", "text_b", "label"
OWN_COLUMNS_FLAGS = "--data.text_columns=<text column>[,<second text column>] --data.label_column=<label column>"


class DataError(ValueError):
    """Data that does not fit its task; the message names the file, the field and the fix."""


@dataclass
class RawSplit:
    """One split as read, before it is checked against its task."""

    origin: str
    """Names the file or hub split in messages."""
    columns: dict[str, list]
    hint: str = ""
    """Ends a missing-column message."""
    present: list[str] | None = None
    """Every column of the source, where `columns` holds only those read."""


def quoted(values: Sequence[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def renamed(columns: dict[str, list], rename: Mapping[str, str]) -> dict[str, list]:
    """`columns` with each old name in `rename` given its new one, unless the new name is there already."""
    out = dict(columns)
    for old, new in rename.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def _missing_columns(raw: RawSplit, spec: TaskSpec, missing: list[str], rename: Mapping[str, str],
                     labelled: bool) -> DataError:
    texts = quoted(spec.text_templates) if spec.text_templates else quoted(spec.text_columns)
    also = f" (and {quoted(missing[1:])})" if len(missing) > 1 else ""
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
        f"{quoted(raw.present or list(raw.columns)) or 'none'}. {fix}{raw.hint}")


def _bad_listing(bad: Counter) -> str:
    shown = [f"{value} ({count} row{'s' if count > 1 else ''})" for value, count in bad.most_common(8)]
    return ", ".join(shown) + (", ..." if len(bad) > 8 else "")


def label_key(value: Any) -> str | None:
    """The text a raw label is looked up by: stripped, "1.0" read as "1", None kept."""
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
    keys = [label_key(value) for value in values]
    bad = Counter(repr(value) for value, key in zip(values, keys) if key not in lookup)
    if bad:
        raw = f"; or the raw values {quoted(list(spec.label_map))} (label_map)" if spec.label_map else ""
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
            f"{quoted(spec.label_names)}{raw}.{unlabeled} {fix}")
    return [lookup[key] for key in keys]


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


def warn_case_variants(origin: str, label_column: str, names: Sequence[str]) -> None:
    """Warns about labels that differ only in case ('pos', 'Pos'): each is a class of its own."""
    folded = Counter(name.casefold() for name in names)
    alike = [sorted(n for n in names if n.casefold() == key) for key, count in folded.items() if count > 1]
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


def normalized_split(raw: RawSplit, spec: TaskSpec, rename: Mapping[str, str], labelled: bool = True) -> Dataset:
    """`text_a`, [`text_b`] and, when `labelled`, `label` of every row (see the module doc)."""
    columns = renamed(raw.columns, rename)
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
                            f"{quoted(empty[:10])}{', ...' if len(empty) > 10 else ''}); task {spec.name!r} reads "
                            "text from it. Fill or drop those rows.")
        warn_empty_texts(raw.origin, f"column {name!r}", columns[name], "the model reads no text from it there")
    rows = [dict(zip(fields, values)) for values in zip(*(columns[c] for c in fields))]
    names = (TEXT_A, TEXT_B)[:len(spec.text_columns)]
    texts = zip(*(spec.texts(row) for row in rows))  # one tuple per text column
    data: dict[str, list] = {name: list(values) for name, values in zip(names, texts)}
    features = dict.fromkeys(names, Value("string"))
    if labelled:
        labels = columns[spec.label_column]
        if spec.is_regression:
            data[LABEL], features[LABEL] = _scores(labels, spec, raw.origin), Value("float64")
        else:
            data[LABEL] = _class_ids(labels, spec, raw.origin)
            features[LABEL] = ClassLabel(names=list(spec.label_names or ()))
    return Dataset.from_dict(data, features=Features(features))
