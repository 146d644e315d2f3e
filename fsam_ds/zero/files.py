"""Files that a crash never leaves half-written, and their digests: the one atomic write, the one
sha256 and the one JSON encoding (non-finite floats as strings) that the engine's, the trainer's and the
Hugging Face Trainer integration's checkpoints, manifests and logs share. A checkpoint file's digest is
taken by the process that wrote it, right after writing, while the file is still in that machine's page
cache (`WrittenFiles`).

Why not while writing: torch.save into a hashing file object must go through Python `write` calls, which
its zip format makes slower than writing the file and reading it back from memory to hash it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

TMP_SUFFIX = ".tmp"
"""What a file being written is called until it is complete (manifests skip such names)."""


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` writes a temporary file beside `path`, which is then moved over `path` (os.replace):
    a crash leaves the old file or the new one, never part of one. A failed write removes the temporary file.
    The temporary name is unique, so processes that write the same file at once (ranks preparing one
    cache file) never write into each other's."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; checkpoints, logs and caches are ordinary files
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_file(path: str | os.PathLike, content: str | bytes) -> None:
    """Writes `content` (text as UTF-8) to `path` atomically."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    replace_atomically(path, lambda tmp: tmp.write_bytes(data))


def save_atomically(obj: Any, path: str | os.PathLike, written: WrittenFiles | None = None) -> None:
    """`torch.save(obj, path)`, atomically; recorded with its digest in `written` when given."""
    (written if written is not None else WrittenFiles()).save(obj, path)


@dataclass(frozen=True)
class FileDigest:
    """A file's size and sha256, as a manifest records them."""

    bytes: int
    sha256: str


def file_digest(path: str | os.PathLike) -> FileDigest:
    """Reads `path` once (in 4 MiB chunks) for its size and sha256."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(size, digest.hexdigest())


@dataclass
class WrittenFiles:
    """The files one rank wrote, with their digests (taken right after each write, while the file is still
    in the page cache): what that rank contributes to a checkpoint's manifest."""

    files: dict[Path, FileDigest] = field(default_factory=dict)

    def save(self, obj: Any, path: str | os.PathLike) -> None:
        """`torch.save(obj, path)`, atomically (`replace_atomically`), recorded with its digest."""
        replace_atomically(path, lambda tmp: torch.save(obj, tmp))
        self.add(path)

    def add(self, path: str | os.PathLike) -> None:
        """Records a file another writer has just written (read back while it is in the page cache)."""
        self.files[Path(path)] = file_digest(path)


# ---------------------------------------------------------------------------------- JSON values

# str() of each non-finite float -> one shared float object: two reads of a file compare equal, though nan != nan
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def plain_values(value: Any, leaf: Callable[[Any], Any] = lambda v: v) -> Any:
    """Nested dicts and lists with `leaf` applied to each other value; tensors and numpy values become Python
    numbers and lists first."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.tolist()  # a 0-d tensor or a numpy scalar gives a number
    if isinstance(value, dict):
        return {str(k): plain_values(v, leaf) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_values(v, leaf) for v in value]
    return leaf(value)


def _encode_nonfinite(value: Any) -> Any:
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _decode_nonfinite(value: Any) -> Any:
    return _NONFINITE.get(value, value) if isinstance(value, str) else value


def encode_nonfinite(value: Any) -> Any:
    """`value` with every non-finite float as its string (\"nan\", \"inf\", \"-inf\"), as metrics.jsonl and the
    trainer's JSON files write them."""
    return plain_values(value, _encode_nonfinite)


def decode_nonfinite(value: Any) -> Any:
    """The inverse of `encode_nonfinite` on what json.loads returns."""
    return plain_values(value, _decode_nonfinite)


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON, non-finite floats encoded (`encode_nonfinite`), atomically."""
    replace_file(path, json.dumps(encode_nonfinite(data), indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> dict:
    return decode_nonfinite(json.loads(path.read_text(encoding="utf-8")))
