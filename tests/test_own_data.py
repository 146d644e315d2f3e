"""Own data, in-process: the label set read from a file, classes named by integers, the configuration
keys and their errors, the command-line route that the label errors of registered tasks offer, and
that a run and fsam-predict read each file once."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import train_fixtures as fx
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.data.checks import DataError
from fsam_ds.trainer.data.splits import infer_label_names, load_task_splits
from fsam_ds.trainer.objectives import objective_for
from fsam_ds.trainer.run_config import config_from_dict, config_to_dict, load_config
from fsam_ds.trainer.tasks import own_data_task


def table(path: Path, labels: list) -> Path:
    return fx.write_table(path, [{"text": f"the film {i}", "label": label} for i, label in enumerate(labels)])


def test_label_set_is_sorted_numerically_for_numbers_and_as_text_otherwise(tmp_path):
    assert infer_label_names(table(tmp_path / "a.csv", ["10", "2", "1.0", "2"]), "label") == ("1", "2", "10")
    assert infer_label_names(table(tmp_path / "b.jsonl", ["pos", "neg", "mixed", "neg"]), "label") == (
        "mixed", "neg", "pos")
    with pytest.raises(DataError, match=r"holds 1 distinct label\(s\) \('yes'\).*--task=regression"):
        infer_label_names(table(tmp_path / "c.csv", ["yes", "yes"]), "label")
    with pytest.raises(DataError, match=r"no column 'stars'.*Columns present: 'text', 'label'.*--data.label_column"):
        infer_label_names(tmp_path / "a.csv", "stars")


def test_classes_named_by_integers_are_names_not_ids(tmp_path):
    task = own_data_task("classification", ("text",), "label", ("1", "2", "5"))
    train, dev = table(tmp_path / "train.csv", ["1", "2", "5", "5"]), table(tmp_path / "dev.csv", ["5", "2"])
    splits = load_task_splits(task, "files", data_files={"train": train, "validation": dev})
    # the names win over the ids they look like, and the ids are not accepted at all: "0" (class "1" as an
    # id) is not in the label set
    assert splits["train"]["label"] == [0, 1, 2, 2] and splits["validation"]["label"] == [2, 1]
    bad = table(tmp_path / "bad.csv", ["0", "1"])
    with pytest.raises(DataError) as err:
        load_task_splits(task, "files", data_files={"train": train, "validation": bad})
    message = str(err.value)
    assert f"File {str(bad)!r} column 'label' has 1 label(s) outside the label set" in message
    assert "Allowed: the names '1', '2', '5'" in message and "--data.labels=" in message


def test_a_registered_task_label_error_offers_the_command_line_route(tmp_path):
    rows = [{"sentence": "a good film", "label": "pos"}, {"sentence": "a bad film", "label": "neg"}]
    train = fx.write_table(tmp_path / "train.csv", rows)
    with pytest.raises(DataError) as err:
        load_task_splits("sst2", "files", data_files={"train": train, "validation": train})
    message = str(err.value)
    assert "dataclasses.replace(task, label_map={...})" in message  # the Python route stays
    assert "--task=classification --data.text_columns=sentence --data.label_column=label" in message


def test_own_data_configuration(tmp_path):
    train = table(tmp_path / "train.csv", ["b", "a", "c"])
    base = ["--model=m", f"--data.train_file={train}", f"--data.dev_file={train}"]
    cfg = load_config(["--task=classification", *base])
    assert cfg.data.source == "local"  # implied for own data
    objective = objective_for(cfg)
    assert cfg.data.labels == ("a", "b", "c")  # recorded, so config.json and exports carry it
    assert objective.model_kwargs()["id2label"] == {0: "a", 1: "b", 2: "c"}
    assert objective.task.metrics == ("accuracy", "macro_f1") and objective.select_metric == "accuracy"
    again = config_from_dict(config_to_dict(cfg))
    assert again.data.labels == ("a", "b", "c") and objective_for(again).task.label_names == ("a", "b", "c")

    given = load_config(["--task=classification", *base, "--data.labels=c,b,a,d"])
    assert objective_for(given).task.label_names == ("c", "b", "a", "d")  # as given, not sorted
    assert load_config(["--task=sst2", *base]).data.source == "hub"  # a registered task keeps its default

    with pytest.raises(ConfigError, match=r"data.label_column name the columns.*task 'sst2' reads its own columns"):
        objective_for(load_config(["--task=sst2", *base, "--data.label_column=stars"]))
    with pytest.raises(ConfigError, match=r"--task=classification trains on your own files, but data.source = hub"):
        objective_for(load_config(["--task=classification", *base, "--data.source=hub"]))
    with pytest.raises(ConfigError, match=r"give both --data.train_file and --data.dev_file"):
        objective_for(load_config(["--task=regression", "--model=m", f"--data.train_file={train}"]))
    with pytest.raises(ConfigError, match=r"data.labels = \['a', 'b'\] lists classes, but --task=regression"):
        objective_for(load_config(["--task=regression", *base, "--data.labels=a,b"]))
    with pytest.raises(ConfigError, match=r"data.text_columns.*must name one column \(a single text\) or two"):
        load_config(["--task=classification", *base, "--data.text_columns=a,b,c"])
    with pytest.raises(ConfigError, match=r"data.labels.*names one class"):
        load_config(["--task=classification", *base, "--data.labels=a"])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return fx.write_tiny_model(tmp_path_factory.mktemp("model") / "bert", num_labels=3)


def label_ids(split) -> list[int]:
    return split[:]["labels"].tolist()


def test_a_classification_run_reads_its_training_file_once_for_the_label_set_and_the_split(
        tiny_model, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    train, dev = table(tmp_path / "train.csv", ["b", "a", "c", "a"]), table(tmp_path / "dev.csv", ["c", "b"])
    reads = fx.count_file_reads(monkeypatch)
    objective = objective_for(load_config(["--task=classification", "--model=m", f"--data.train_file={train}",
                                           f"--data.dev_file={dev}"]))
    splits = objective.prepare_splits(tok)
    assert sorted(reads) == sorted([train, dev])  # the label set and the train split from one read
    assert label_ids(splits["train"]) == [1, 0, 2, 0] and label_ids(splits["validation"]) == [2, 1]

    reads.clear()  # one file for both splits: read once
    objective = objective_for(load_config(["--task=classification", "--model=m", f"--data.train_file={train}",
                                           f"--data.dev_file={train}"]))
    splits = objective.prepare_splits(tok)
    assert reads == [train]
    assert label_ids(splits["train"]) == label_ids(splits["validation"]) == [1, 0, 2, 0]


def test_predict_reads_its_input_once_and_echoes_each_row_with_the_models_prediction(
        tiny_model, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    moods = sorted(fx.MOODS)
    cfg = load_config(["--task=classification", f"--model={tiny_model}", "--data.train_file=train.csv",
                       "--data.dev_file=dev.csv", "--data.text_columns=claim,reply", "--data.label_column=mood",
                       f"--data.labels={','.join(moods)}", "--data.max_length=32"])
    folder = fx.as_export(tiny_model, tmp_path / "best", config_to_dict(cfg))
    rows = fx.pair_rows(5, seed=2)
    source = fx.write_table(tmp_path / "in.csv", rows)
    written = fx.predict_reading_once(folder, source, tmp_path / "out.jsonl", monkeypatch)
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in written] == rows  # in file order

    # the reference: each row alone through the plain transformers model
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for row, out in zip(rows, written):
        with torch.no_grad():
            logits = model(**tok(row["claim"], row["reply"], return_tensors="pt")).logits[0]
        assert list(out["prediction"]["probabilities"].values()) == pytest.approx(logits.softmax(-1).tolist(),
                                                                                  abs=1e-5)
        assert out["prediction"]["label"] == moods[int(logits.argmax())]


def test_a_header_only_training_file_is_said_to_have_no_rows(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        objective_for(load_config(["--task=classification", "--model=m", f"--data.train_file={train}",
                                   f"--data.dev_file={train}"]))
    message = str(err.value)
    assert f"File {str(train)!r} has no rows" in message and "data.train_file" in message
    assert "--data.labels" not in message and "regression" not in message  # not a label problem


def test_labels_that_differ_only_in_case_are_named_in_a_warning(tmp_path):
    path = table(tmp_path / "train.csv", ["pos", "Pos", "neg", "pos", "NEG"])
    with pytest.warns(UserWarning) as caught:
        names = infer_label_names(path, "label")
    assert names == ("NEG", "Pos", "neg", "pos")  # still four classes, as the warning says
    message = " ".join(str(w.message) for w in caught)
    assert f"File {str(path)!r} column 'label'" in message and "differ only in case" in message
    assert "'NEG' and 'neg'" in message and "'Pos' and 'pos'" in message and "--data.labels" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labels that differ otherwise: no warning
        assert infer_label_names(table(tmp_path / "fine.csv", ["pos", "neg", "pos"]), "label") == ("neg", "pos")


def test_empty_texts_are_counted_in_a_warning_naming_the_file_and_column(tmp_path):
    rows = [{"claim": c, "reply": r, "label": lab} for c, r, lab in [
        ("a good film", "yes", "pos"), ("", "no", "neg"), ("  ", "", "pos"), ("a bad film", "fine", "neg")]]
    train = fx.write_table(tmp_path / "train.csv", rows)
    task = own_data_task("classification", ("claim", "reply"), "label", ("neg", "pos"))
    with pytest.warns(UserWarning) as caught:
        split = load_task_splits(task, "files", data_files={"train": train, "validation": train})["train"]
    assert len(split) == 4  # kept: an empty text is a text
    messages = " ".join(str(w.message) for w in caught)
    origin = f"File {str(train)!r}"
    assert f"{origin} column 'claim' is empty (or only whitespace) in 2 of 4 row(s) (rows 2, 3, counted" in messages
    assert f"{origin} column 'reply' is empty (or only whitespace) in 1 of 4 row(s) (row 3, counted" in messages
