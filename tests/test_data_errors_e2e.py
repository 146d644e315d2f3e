"""fsam-train on data that users get wrong: each run ends in one `fsam-train: error:` paragraph that
names the file or the hub, what to fix and the local-files alternative, before any training starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import train_fixtures as fx
from dist_harness import free_port

TIMEOUT = 300  # kills a hung run; the errors come before the model is trained


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    train, dev = fx.write_sst2_files(root / "sst2", n_train=16, n_dev=8)
    return {"model": fx.write_tiny_model(root / "model"), "train": train, "dev": dev}


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-4000:]
    assert "Traceback" not in result.stdout, result.stdout[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("fsam-train: error:")]
    assert len(lines) == 1, result.stdout[-4000:]
    return lines[0]


def test_default_hub_source_without_a_reachable_hub(assets, tmp_path):
    args = [a for a in fx.base_args(assets["model"], assets["train"], assets["dev"], tmp_path / "run")
            if not a.startswith(("--data.source=", "--data.train_file=", "--data.dev_file="))]
    # nothing listens on a just-freed local port: refused at once, and no request leaves the machine
    result = fx.run(fx.train_cmd(args), TIMEOUT, HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                    HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0")
    message = error_line(result)
    assert "Cannot load the hub dataset 'nyu-mll/glue', config 'sst2'" in message and "does not answer" in message
    assert "data.source=local with data.train_file and data.dev_file" in message


def test_latin1_train_file_and_header_only_dev_file(assets, tmp_path):
    train = tmp_path / "train.csv"
    train.write_bytes((assets["train"].read_text(encoding="utf-8") + "un café crème,1\n").encode("latin-1"))
    result = fx.run(fx.train_cmd(fx.base_args(assets["model"], train, assets["dev"], tmp_path / "run")), TIMEOUT)
    message = error_line(result)
    assert f"{train} is not valid utf-8 text" in message and "--data.encoding=latin-1" in message

    dev = tmp_path / "dev.csv"
    dev.write_text(assets["dev"].read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    args = fx.base_args(assets["model"], train, dev, tmp_path / "run", **{"data.encoding": "latin-1"})
    message = error_line(fx.run(fx.train_cmd(args), TIMEOUT))
    assert f"File {str(dev)!r} has no examples (only a header row" in message and "data.dev_file" in message
