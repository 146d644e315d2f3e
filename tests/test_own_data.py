"""Own data, in-process: the label set read from a file, classes named by integers, the configuration
keys and their errors, and the command-line route that the label errors of registered tasks offer."""

from __future__ import annotations

from pathlib import Path

import pytest

import train_fixtures as fx
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.data import DataError, infer_label_names, load_task_splits
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
