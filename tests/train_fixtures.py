"""Tiny model, tokenizer and data files for the trainer's end-to-end tests, plus subprocess helpers."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(sys.executable).parent

POSITIVE = ["good", "great", "fine", "nice", "happy", "lovely", "superb", "fun"]
NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "boring", "dull", "weak"]
FILLER = ["the", "a", "movie", "film", "was", "is", "very", "quite", "plot", "acting", "and", "but"]


def write_tiny_model(folder: Path, num_labels: int = 2, dropout: float = 0.1, initializer_range: float = 0.02) -> Path:
    """A 2-layer, hidden-32 BERT classifier and its WordPiece tokenizer, saved with save_pretrained.
    BERT's initializer_range 0.02 makes its outputs nearly the same for every input; a wider one does not."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + POSITIVE + NEGATIVE + FILLER)}
    tokenizer = BertTokenizer(vocab=vocab)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        initializer_range=initializer_range)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _filler(rng: random.Random) -> str:
    return " ".join(rng.choice(FILLER) for _ in range(rng.randint(3, 7)))


def _sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
    for _ in range(rng.randint(1, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def write_sst2_files(folder: Path, n_train: int = 64, n_dev: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """SST-2-style CSV files (`sentence,label`) whose label is the sentiment word's class."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.csv", n_train), ("dev.csv", n_dev)):
        path = folder / name
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for i in range(n):
                writer.writerow([_sentence(rng, i % 2), i % 2])
        paths.append(path)
    return paths[0], paths[1]


def write_stsb_files(folder: Path, n_train: int = 48, n_dev: int = 24, seed: int = 0) -> tuple[Path, Path]:
    """STS-B-style JSON lines (`sentence1`, `sentence2`, float `label` in [0, 5])."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.jsonl", n_train), ("dev.jsonl", n_dev)):
        path = folder / name
        with open(path, "w") as f:
            for i in range(n):
                a, b = _sentence(rng, i % 2), _sentence(rng, (i // 2) % 2)
                score = 4.0 + rng.random() if i % 2 == (i // 2) % 2 else rng.random()
                f.write(json.dumps({"sentence1": a, "sentence2": b, "label": round(score, 2)}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def write_table(path: Path, rows: list[dict[str, Any]]) -> Path:
    """`rows` as a .csv, .json (one list of objects), .jsonl or .parquet file, by the path's extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        raise ValueError(f"write_table: no writer for {path.suffix!r}")
    return path


MOODS = ("upbeat", "grim", "torn")  # string labels that sort in another order than they are drawn


def pair_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Own-data pairs: a `claim` with positive words (upbeat), negative words (grim) or none (torn), and
    a `reply` of filler words; label column `mood`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        mood = MOODS[i % 3]
        claim = _sentence(rng, int(mood == MOODS[0])) if mood != MOODS[2] else _filler(rng)
        rows.append({"id": f"ex{i}", "claim": claim, "reply": _filler(rng), "mood": mood})
    return rows


def review_rows(n: int, seed: int, labels: tuple[str, str] = ("no", "yes")) -> list[dict[str, Any]]:
    """Own-data single texts: `review`, labelled `labels[1]` when its sentiment words are positive."""
    rng = random.Random(seed)
    return [{"review": _sentence(rng, i % 2), "liked": labels[i % 2]} for i in range(n)]


def score_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Own-data regression pairs: `left`, `right` and a float `similarity` (high when the sentiments agree)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = i % 2, (i // 2) % 2
        score = 4.0 + rng.random() if a == b else rng.random()
        rows.append({"left": _sentence(rng, a), "right": _sentence(rng, b), "similarity": round(score, 2)})
    return rows


def base_args(model: Path, train: Path, dev: Path, out: Path, **extra: Any) -> list[str]:
    args = {"task": "sst2", "model": str(model), "data.source": "local", "data.train_file": str(train),
            "data.dev_file": str(dev), "output_dir": str(out), "data.micro_batch_size": 8,
            "data.eval_batch_size": 16, "data.max_length": 32, "optim.lr": 1e-3, "optim.epochs": 2,
            "optim.warmup_ratio": 0.1, "sam.sam_type": "fisher-sam", "sam.mask_interval": 3,
            "sam.keep_ratio": 0.2, "log.wandb": "disabled", "log.progress": False, "log.log_every": 1,
            "seed": 3}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    out["PATH"] = f"{BIN}{os.pathsep}{out.get('PATH', '')}"  # torchrun/deepspeed of this environment
    out.update(extra)
    return out


def run(cmd: list[str], timeout: float, cwd: Path = REPO, **env_extra: str) -> subprocess.CompletedProcess:
    """Runs `cmd` in its own process group; on timeout the whole group is killed."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += f"\n[killed after {timeout} s]"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def train_cmd(args: list[str]) -> list[str]:
    return [PYTHON, "-m", "fsam_ds.train", *args]


def train_sst2_epoch(folder: Path, **extra: Any) -> Path:
    """fsam-train for one epoch (8 steps) on a tiny model and SST-2 files written under `folder`, with
    `base_args`' settings and `extra`; asserts it succeeded and returns its output directory."""
    model = write_tiny_model(folder / "model")
    train, dev = write_sst2_files(folder / "data")
    out = folder / "run"
    result = run(train_cmd(base_args(model, train, dev, out, **{"optim.epochs": 1, **extra})), 300, cwd=folder,
                 PYTHONPATH=str(REPO))
    assert result.returncode == 0, result.stdout[-3000:]
    return out


def events(out: Path, kind: str | None = None) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("event") == kind]


def summary(out: Path) -> dict | None:
    found = events(out, "summary")
    return found[-1] if found else None


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


# The trainer, SIGKILLed from inside the step that would follow FSAM_TEST_KILL_AT steps: an abrupt
# stop, as a preempted job sees it (no cleanup, no final save).
KILLER = """
import os, signal, sys
import fsam_ds.zero.engine, fsam_ds.cli.train
stop, done = int(os.environ["FSAM_TEST_KILL_AT"]), [0]

def killing(real):
    def train_step(self, *args, **kwargs):
        if done[0] >= stop:
            os.kill(os.getpid(), signal.SIGKILL)
        done[0] += 1
        return real(self, *args, **kwargs)
    return train_step

for cls in (fsam_ds.zero.engine.SAMEngine, fsam_ds.zero.engine.PlainEngine):
    cls.train_step = killing(cls.train_step)
sys.argv[0] = "fsam-train"
fsam_ds.cli.train.main()
"""


def killed_train_cmd(args: list[str]) -> list[str]:
    return [PYTHON, "-c", KILLER, *args]


def as_export(model: Path, folder: Path, run_config: dict[str, Any]) -> Path:
    """A copy of the saved `model` laid out as fsam-train exports one: with the run's configuration
    (run_config.json) and the manifest, so that fsam-predict takes it without a training run."""
    import shutil

    from fsam_ds.trainer.run_dir import RUN_CONFIG_FILE, write_manifest

    shutil.copytree(model, folder)
    (folder / RUN_CONFIG_FILE).write_text(json.dumps(run_config))
    write_manifest(folder)
    return folder


def count_file_reads(monkeypatch: Any) -> list[Path]:
    """From now on, the path of every data file read, in order: every reader of the user's files
    (read_table, read_split_file, infer_label_names, load_task_splits' files) goes through `_read_file`."""
    from fsam_ds.trainer.data import readers

    reads: list[Path] = []
    read_file = readers._read_file

    def counted(path: Path, **options: Any) -> dict[str, list]:
        reads.append(Path(path))
        return read_file(path, **options)

    monkeypatch.setattr(readers, "_read_file", counted)
    return reads


def predict_reading_once(folder: Path, source: Path, out: Path, monkeypatch: Any) -> list[dict]:
    """fsam-predict's output rows for `source`, checking that it read the file once and echoed every row
    in file order (the rows as `read_table` gives them, without "prediction")."""
    import json

    from fsam_ds.cli.predict import predict_file
    from fsam_ds.trainer.data.readers import read_table, table_rows

    expected_rows = table_rows(read_table(source))
    reads = count_file_reads(monkeypatch)
    assert predict_file(folder, source, out, batch_size=2, progress=False) == len(expected_rows)
    assert reads == [source]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in written] == expected_rows
    return written
