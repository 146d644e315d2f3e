"""A data file's columns as read, {column: values} in file order, each format problem a message naming the fix.

The format is taken from the extension. CSV (quoted) and TSV (split on tabs with no quote handling, as the
GLUE files require) are read with Python's csv module, every field the text it is in the file; JSON lines
with pyarrow, a .json document with Python's json, Parquet with pyarrow; text in the encoding given.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import pyarrow as pa
import pyarrow.json as paj
import pyarrow.parquet as pq

from fsam_ds.trainer.data.checks import DataError, quoted

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
JSON_FORMS = ("Each line of a JSON lines file must hold one complete object; a .json file may instead hold one "
              "list of objects or one object of column lists")

PathLike = str | os.PathLike


def _encoding_error(path: Path, encoding: str, err: UnicodeError) -> DataError:
    return DataError(f"{path} is not valid {encoding} text ({err}). Save the file as UTF-8, or give its encoding: "
                     "--data.encoding=latin-1 (or cp1252, utf-16, ...) for fsam-train, encoding='latin-1' for "
                     "load_task_splits.")


def _unreadable(path: Path, kind: str, detail: Any, fix: str = "") -> DataError:
    fix = fix or f"Repair the file, or save it in one of the formats {', '.join(FILE_FORMATS)}"
    return DataError(f"{path} could not be read ({kind}: {str(detail).strip()}). {fix}.")


def _rows_listed(rows: Sequence[int]) -> str:
    return ", ".join(str(i + 1) for i in rows[:10]) + (", ..." if len(rows) > 10 else "")


def read_delimited(path: Path, *, tsv: bool, encoding: str, names: Sequence[str] = (),
                   required: Sequence[str] = (), bad_rows: str) -> dict[str, list]:
    """The columns of a CSV or TSV file, named by its header row (or by `names`, for a headerless GLUE file
    whose first row does not name the `required` columns).

    Rows with more or fewer fields than the header are skipped with one warning, or raise (`bad_rows` "warn"
    or "error"; "keep-all" raises too, for readers whose rows must stay aligned with the file's, and offers
    no skipping). A row whose one field is empty (`""`, as csv writers write it) is a row with an empty text.
    A blank line is no row, as for Python's csv.DictReader: blank lines at the end of the file are dropped,
    and those within the data skipped ("warn", "error") or, with "keep-all", refused with their rows.
    """
    skip = (" (rows are never skipped here: the fix belongs in the file)" if bad_rows == "keep-all"
            else ", or pass bad_rows='warn' to skip rows of the wrong width with a warning")
    # strict: a stray quote is an error naming its line, not a field that runs on to the end of the file
    dialect: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"strict": True}
    rows: list[list[str]] = []  # a blank line is a row with no fields
    long: list[tuple[int, int]] = []  # (file line, fields) of each row with more fields than the header
    try:
        with open(path, encoding=encoding, newline="") as file:
            reader = csv.reader(file, **dialect)
            try:
                first = next(reader, None)
                columns, headerless = _header(path, first, names, required)
                for fields in itertools.chain([first] if headerless else [], reader):
                    if len(fields) > len(columns):
                        long.append((reader.line_num, len(fields)))
                    rows.append(fields)
            except csv.Error as err:  # a stray quote, a field over csv's size limit
                raise _unreadable(path, "ParserError", f"{err} in line {reader.line_num}",
                                  f"Repair the line{skip if bad_rows != 'warn' else ''}") from None
    except UnicodeError as err:
        raise _encoding_error(path, encoding, err) from None
    while rows and not rows[-1]:  # blank lines at the end of the file are its end
        rows.pop()
    if long and bad_rows != "warn":
        line, saw = long[0]
        raise _unreadable(path, "ParserError", f"Expected {len(columns)} fields in line {line}, saw {saw}",
                          f"Repair the line{skip}")
    blank = [i for i, fields in enumerate(rows) if not fields]
    if blank and bad_rows == "keep-all":
        raise DataError(f"{path}: row(s) {_rows_listed(blank)} (counted after the header) are blank lines. A blank "
                        "line holds no row, and rows are never skipped here, so that each row keeps its place "
                        "(fsam-predict writes one prediction per row, in file order). Delete the blank line(s); for "
                        'a row whose only text is empty, write "" on that line, as csv writers do.')
    short = [i for i, fields in enumerate(rows) if 0 < len(fields) < len(columns)]
    if short and bad_rows != "warn":
        raise DataError(f"{path}: row(s) {_rows_listed(short)} (counted after the header) have fewer fields than the "
                        f"header's {len(columns)} ({', '.join(columns)}). Repair them{skip}.")
    skipped = ([f"row {i + 1} after the header has fewer fields" for i in short] +
               [f"Skipping line {line}: Expected {len(columns)} fields in line {line}, saw {n}" for line, n in long])
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} row(s) whose field count differs from the header's "
                      f"{len(columns)}: {'; '.join(skipped[:10])}{'; ...' if len(skipped) > 10 else ''}.",
                      stacklevel=3)
    kept = [fields for fields in rows if len(fields) == len(columns)]
    return {name: [fields[j] for fields in kept] for j, name in enumerate(columns)}


def _header(path: Path, first: list[str] | None, names: Sequence[str],
            required: Sequence[str]) -> tuple[list[str], bool]:
    """The column names, and whether they are `names` because the first row is not a header."""
    if first is None:
        raise DataError(f"{path} is empty; give a file with a header row and at least one example.")
    if not first:
        raise DataError(f"{path}: line 1 is blank, but the first line must be the header row (or, in a "
                        "headerless GLUE file, the first example). Delete the blank line(s) above it.")
    first[0] = first[0].removeprefix("\ufeff")  # the byte order mark that spreadsheet programs write
    header = [name.strip() for name in first]
    if names and not set(required) <= set(header):
        return list(names), True
    twice = sorted({name for name in header if header.count(name) > 1})
    if twice:
        raise DataError(f"{path}: the header row names the column(s) {quoted(twice)} more than once; give each "
                        "column a name of its own.")
    return header, False


def _records_as_columns(path: Path, records: list) -> dict[str, list]:
    if not records or not all(isinstance(record, dict) for record in records):
        raise DataError(f"{path} holds no examples as JSON objects. {JSON_FORMS}.")
    names = dict.fromkeys(name for record in records for name in record)
    return {name: [record.get(name) for record in records] for name in names}


def _read_json(path: Path, encoding: str, *, lines: bool) -> dict[str, list]:
    """JSON lines, or a .json document: a list of objects (or of texts), an object of column lists,
    {"data": [objects]} or one object, one example (as is a JSON lines file of one line)."""
    try:
        text = path.read_bytes().decode(encoding).removeprefix("\ufeff")
    except UnicodeError as err:
        raise _encoding_error(path, encoding, err) from None
    try:
        document = json.loads(text if text.strip() else "[]")
    except json.JSONDecodeError:  # not one document: JSON lines
        del text  # not held while pyarrow reads the file and its columns become Python objects
        return _read_json_lines(path, encoding)
    if isinstance(document, dict) and not lines:
        if list(document) == ["data"] and isinstance(document["data"], list):
            document = document["data"]
        elif all(isinstance(values, list) for values in document.values()):
            if len({len(values) for values in document.values()}) > 1:
                raise DataError(f"{path}: the column lists have different lengths "
                                f"({ {k: len(v) for k, v in document.items()} }); every column needs one value per "
                                "example.")
            return document
    if isinstance(document, list):  # of objects, or of texts, which datasets reads as the column "text"
        document = [record if isinstance(record, dict) else {"text": record} for record in document]
    return _records_as_columns(path, document if isinstance(document, list) else [document])


def _read_json_lines(path: Path, encoding: str) -> dict[str, list]:
    data = path.read_bytes().decode(encoding).removeprefix("\ufeff").encode()  # pyarrow reads UTF-8
    try:
        table = paj.read_json(io.BytesIO(data))
    except pa.ArrowInvalid as err:
        try:  # pyarrow wants one type per column; Python's json reads a column that mixes them (1 and "neg")
            return _records_as_columns(path, [json.loads(line) for line in data.split(b"\n") if line.strip()])
        except (json.JSONDecodeError, DataError):
            raise _unreadable(path, "ArrowInvalid", err, JSON_FORMS) from None
    del data
    return table.to_pydict()


def _read_file(path: Path, *, bad_rows: str, encoding: str) -> dict[str, list]:
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                        f"{', '.join(FILE_FORMATS)} (the format is taken from the extension).")
    if not path.is_file():
        raise DataError(f"{path} not found; check the path given for this split.")
    if fmt in ("csv", "tsv"):
        return read_delimited(path, tsv=fmt == "tsv", encoding=encoding, bad_rows=bad_rows)
    if fmt == "parquet":
        try:
            with pq.ParquetFile(path) as file:
                return file.read().to_pydict()
        except (pa.ArrowException, OSError) as err:
            raise _unreadable(path, type(err).__name__, err) from None
    return _read_json(path, encoding, lines=fmt == "jsonl")


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
