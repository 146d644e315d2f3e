"""Your own data through fsam-train and fsam-predict: --task=classification|regression on csv, json and
parquet files with your own column names, the label set read from the training file, dev metrics
checked against scikit-learn and scipy on the predictions fsam-predict writes from the exported model,
and the one-paragraph errors for a wrong column or an unknown dev label.

The model is the config-built 2-layer BERT of `train_fixtures`; every run is a subprocess under a
hard timeout. fsam-predict runs in-process (`main(argv)`): it starts no process group.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

import train_fixtures as fx
from fsam_ds.cli.predict import main as predict_main

TIMEOUT = 600


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return fx.write_tiny_model(tmp_path_factory.mktemp("model") / "bert")


def own_args(model: Path, train: Path, dev: Path, out: Path, **extra) -> list[str]:
    # no data.source: --task=classification|regression with files implies local
    args = {"task": "classification", "model": model, "data.train_file": train, "data.dev_file": dev,
            "output_dir": out, "data.micro_batch_size": 8, "data.eval_batch_size": 16, "data.max_length": 32,
            "optim.lr": 1e-2, "optim.schedule": "constant", "optim.warmup_ratio": 0.0, "log.wandb": "disabled",
            "log.progress": False, "log.log_every": 100, "seed": 3}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def train(args: list[str], out: Path) -> dict:
    """Runs fsam-train to its summary; returns the summary."""
    result = fx.run(fx.train_cmd(args), TIMEOUT)
    summary = fx.summary(out)
    assert summary is not None, result.stdout[-4000:]
    return summary


def eval_at(out: Path, step: int) -> dict:
    return next(e for e in fx.events(out, "eval") if e["step"] == step)


def predict(model_dir: Path, source: Path, output: Path, *extra: str) -> list[dict]:
    assert predict_main([str(model_dir), str(source), "--output", str(output), *extra]) == 0
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def error_line(result: subprocess.CompletedProcess, prog: str = "fsam-train") -> str:
    assert result.returncode == 2, result.stdout[-4000:]
    assert "Traceback" not in result.stdout, result.stdout[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, result.stdout[-4000:]
    return lines[0]


# --------------------------------------------------------------------------- classification

@pytest.fixture(scope="module")
def pair_run(model, tmp_path_factory) -> dict[str, Path]:
    """Three string classes on a sentence pair from CSV, trained long enough (the tiny model needs ~30
    steps; the AdamW baseline gets there first) that its predictions vary from example to example, as
    the metric checks need."""
    root = tmp_path_factory.mktemp("pair")
    train_file = fx.write_table(root / "data" / "train.csv", fx.pair_rows(48, seed=0))
    dev_file = fx.write_table(root / "data" / "dev.csv", fx.pair_rows(24, seed=1))
    out = root / "run"
    train(own_args(model, train_file, dev_file, out, **{
        "data.text_columns": "claim,reply", "data.label_column": "mood", "sam.sam_type": "none",
        "optim.epochs": 7, "eval.every_epoch": False, "eval.every_steps": 7}), out)
    return {"out": out, "dev": dev_file}


@pytest.mark.slow
def test_three_string_classes_on_a_pair_round_trip_through_predict(pair_run, tmp_path, capsys):
    out, dev_file = pair_run["out"], pair_run["dev"]
    sorted_moods = sorted(fx.MOODS)  # ['grim', 'torn', 'upbeat']: not the order the file first shows them
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["labels"] == sorted_moods and config["data"]["source"] == "local"
    exported = json.loads((out / "best" / "config.json").read_text())
    assert exported["id2label"] == {str(i): name for i, name in enumerate(sorted_moods)}
    assert exported["label2id"] == {name: i for i, name in enumerate(sorted_moods)}

    rows = predict(out / "best", dev_file, tmp_path / "dev.predictions.jsonl", "--batch_size", "5")
    assert "predicting" in capsys.readouterr().err  # the progress bar, on stderr
    dev_rows = fx.pair_rows(24, seed=1)
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in rows] == dev_rows  # in file order
    for r in rows:
        probabilities = r["prediction"]["probabilities"]
        assert list(probabilities) == sorted_moods and sum(probabilities.values()) == pytest.approx(1.0)
        assert r["prediction"]["label"] == max(probabilities, key=probabilities.get)

    gold = [r["mood"] for r in dev_rows]
    predicted = [r["prediction"]["label"] for r in rows]
    assert len(set(predicted)) > 1, "a one-class model checks little; train longer"
    best = json.loads((out / "best" / "best.json").read_text())
    logged = eval_at(out, best["step"])
    assert "mcc" not in logged  # three classes: accuracy and macro-F1
    assert logged["accuracy"] == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
    assert logged["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"), abs=1e-12)
    # the wrong variant: classes numbered in the order the training file first shows them
    first_seen = dict(zip(sorted_moods, dict.fromkeys(r["mood"] for r in fx.pair_rows(48, seed=0))))
    assert accuracy_score(gold, [first_seen[p] for p in predicted]) != pytest.approx(logged["accuracy"], abs=1e-6)


@pytest.mark.slow
def test_binary_labels_from_json_with_limit_per_class(model, tmp_path):
    train_file = fx.write_table(tmp_path / "train.json", fx.review_rows(64, seed=0))
    dev_file = fx.write_table(tmp_path / "dev.jsonl", fx.review_rows(24, seed=1))
    out = tmp_path / "run"
    summary = train(own_args(model, train_file, dev_file, out, **{
        "data.text_columns": "review", "data.label_column": "liked", "data.limit_per_class": 16,
        "sam.sam_type": "fisher-sam", "sam.keep_ratio": 0.2, "optim.epochs": 8, "eval.every_epoch": False,
        "eval.save_best": False}), out)
    assert summary["steps"] == 32  # 2 x 16 examples in batches of 8, 8 epochs (all 64 would give 64)
    rows = predict(out / "final", dev_file, tmp_path / "p.jsonl", "--no-progress")
    gold = [r["liked"] for r in fx.review_rows(24, seed=1)]
    predicted = [r["prediction"]["label"] for r in rows]
    logged = eval_at(out, summary["steps"])  # final/ holds the weights of the last evaluation
    assert logged["accuracy"] == pytest.approx(accuracy_score(gold, predicted), abs=1e-12)
    assert logged["macro_f1"] == pytest.approx(f1_score(gold, predicted, average="macro"), abs=1e-12)
    assert logged["mcc"] == pytest.approx(matthews_corrcoef(gold, predicted), abs=1e-12)  # binary: MCC too


# ------------------------------------------------------------------------------- regression

@pytest.mark.slow
def test_regression_on_a_pair_from_parquet(model, tmp_path):
    train_file = fx.write_table(tmp_path / "train.parquet", fx.score_rows(48, seed=0))
    dev_file = fx.write_table(tmp_path / "dev.parquet", fx.score_rows(24, seed=1))
    out = tmp_path / "run"
    summary = train(own_args(model, train_file, dev_file, out, task="regression", **{
        "data.text_columns": "left,right", "data.label_column": "similarity", "sam.sam_type": "esam",
        "optim.epochs": 3}), out)
    assert summary["metric_name"] == "pearson"
    assert json.loads((out / "config.json").read_text())["data"]["labels"] == []
    rows = predict(out / "best", dev_file, tmp_path / "p.jsonl", "--no-progress")
    # the trainer holds scores as float32, and its batches are padded otherwise: equal to float32 rounding
    gold = np.array([r["similarity"] for r in fx.score_rows(24, seed=1)], dtype=np.float32).astype(np.float64)
    scores = np.array([r["prediction"]["score"] for r in rows])
    logged = eval_at(out, summary["best_step"])
    assert logged["pearson"] == pytest.approx(stats.pearsonr(scores, gold).statistic, abs=1e-6)
    assert logged["spearman"] == pytest.approx(stats.spearmanr(scores, gold).statistic, abs=1e-6)
    assert logged["pearson"] != pytest.approx(stats.pearsonr(scores, gold[::-1]).statistic, abs=1e-6)


# ----------------------------------------------------------------------------------- errors

@pytest.mark.slow
def test_wrong_column_wrong_label_column_and_unknown_dev_label(model, tmp_path):
    train_file = fx.write_table(tmp_path / "train.csv", fx.review_rows(16, seed=0))
    dev_rows = fx.review_rows(8, seed=1)
    dev_rows[3]["liked"] = "maybe"
    dev_file = fx.write_table(tmp_path / "dev.csv", dev_rows)
    common = {"data.label_column": "liked", "optim.epochs": 1}

    message = error_line(fx.run(fx.train_cmd(own_args(model, train_file, dev_file, tmp_path / "a", **common)),
                                TIMEOUT))  # data.text_columns defaults to 'text'
    assert f"File {str(train_file)!r} has no column 'text'" in message
    assert "Columns present: 'review', 'liked'" in message and "--data.text_columns=" in message

    message = error_line(fx.run(fx.train_cmd(own_args(model, train_file, dev_file, tmp_path / "b", **{
        "data.text_columns": "review", "data.label_column": "stars"})), TIMEOUT))
    assert f"File {str(train_file)!r} has no column 'stars'" in message and "--data.label_column=" in message

    message = error_line(fx.run(fx.train_cmd(own_args(model, train_file, dev_file, tmp_path / "c", **{
        **common, "data.text_columns": "review"})), TIMEOUT))
    assert f"File {str(dev_file)!r} column 'liked' has 1 label(s) outside the label set" in message
    assert "'maybe' (1 row)" in message and "'no', 'yes'" in message and "--data.labels=" in message


@pytest.mark.slow
def test_predict_refuses_what_is_not_an_export(pair_run, tmp_path, capsys):
    out, dev_file = pair_run["out"], pair_run["dev"]
    assert predict_main([str(out), str(dev_file)]) == 2  # the run folder, not its best/ or final/
    message = capsys.readouterr().err
    assert message.startswith("fsam-predict: error:") and "pass one of those" in message and "best" in message

    assert predict_main([str(tmp_path / "nowhere"), str(dev_file)]) == 2
    assert "is not a folder" in capsys.readouterr().err

    reviews = fx.write_table(tmp_path / "reviews.csv", fx.review_rows(4, seed=2))
    assert predict_main([str(out / "best"), str(reviews)]) == 2
    message = capsys.readouterr().err
    assert f"File {str(reviews)!r} has no column 'claim'" in message and "'claim', 'reply'" in message
    assert not (tmp_path / "reviews.predictions.jsonl").exists()
