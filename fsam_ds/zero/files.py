"""Files that a crash never leaves half-written: the one atomic write the engine's, the trainer's and the
Hugging Face Trainer integration's checkpoints and logs share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

TMP_SUFFIX = ".tmp"
"""What a file being written is called until it is complete (manifests skip such names)."""


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` writes a temporary file beside `path`, which is then moved over `path` (os.replace):
    a crash leaves the old file or the new one, never part of one. A failed write removes the temporary file."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_file(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_atomically(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save(obj, path)`, atomically."""
    replace_atomically(path, lambda tmp: torch.save(obj, tmp))
