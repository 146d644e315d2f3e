import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from fsam_ds.trainer.tasks import (GLUE_TASKS, SUPERGLUE_TASKS, TASKS, UnknownTaskError, compute_metrics,
                           get_task, predicted_ids)


def one_hot_logits(ids, num_labels):
    logits = np.full((len(ids), num_labels), -1.0)
    logits[np.arange(len(ids)), ids] = 2.0
    return logits


# ------------------------------------------------------------------------------------ registry

def test_registry_covers_glue_superglue_and_polarity():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(TASKS) == {*GLUE_TASKS, *SUPERGLUE_TASKS, "polarity"}
    for name in GLUE_TASKS:
        assert TASKS[name].hub_id == "nyu-mll/glue" and TASKS[name].hub_config == name
    for name in SUPERGLUE_TASKS:
        assert TASKS[name].hub_id == "aps/super_glue"


@pytest.mark.parametrize("name, text, label_names", [
    ("cola", ("sentence",), ("unacceptable", "acceptable")),
    ("sst2", ("sentence",), ("negative", "positive")),
    ("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent")),
    ("qqp", ("question1", "question2"), ("not_duplicate", "duplicate")),
    ("stsb", ("sentence1", "sentence2"), None),
    ("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction")),
    ("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    ("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment")),
    ("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment")),
    ("boolq", ("question", "passage"), ("False", "True")),
    ("cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral")),
    ("superglue-rte", ("premise", "hypothesis"), ("entailment", "not_entailment")),
    ("wic", ("sentence1", "sentence2"), ("False", "True")),
    ("polarity", ("text",), ("neg", "pos")),
])
def test_columns_and_labels(name, text, label_names):
    spec = get_task(name)
    assert spec.text_columns == text
    assert spec.label_column == "label"
    assert spec.label_names == label_names
    assert spec.num_labels == (1 if label_names is None else len(label_names))


def test_mnli_evaluates_matched_and_mismatched_and_selects_on_matched():
    spec = get_task("mnli")
    assert spec.dev_splits == ("validation_matched", "validation_mismatched")
    assert spec.select_split == "validation_matched"


def test_wic_puts_the_word_in_front_of_the_first_sentence():
    spec = get_task("wic")
    row = {"word": "bank", "sentence1": "He sat on the bank.", "sentence2": "The bank was closed.", "label": 0}
    assert spec.texts(row) == ("bank: He sat on the bank.", "The bank was closed.")
    assert spec.required_columns == ("word", "sentence1", "sentence2", "label")


def test_diagnostics_train_and_select_on_rte_and_share_its_labels():
    rte = get_task("superglue-rte")
    for name in ("axb", "axg"):
        spec = get_task(name)
        assert spec.task_for_split("train") is rte
        assert spec.task_for_split(spec.select_split) is rte
        assert spec.task_for_split("test") is spec
        assert spec.label_names == rte.label_names


def test_polarity_maps_raw_minus_one_and_one():
    assert dict(get_task("polarity").label_map) == {"-1": 0, "1": 1}


@pytest.mark.parametrize("alias, name", [("SST-2", "sst2"), ("sts_b", "stsb"), ("superglue_rte", "superglue-rte"),
                                          ("mnli-mm", "mnli"), (" CoLA ", "cola")])
def test_get_task_normalises_names(alias, name):
    assert get_task(alias).name == name


def test_get_task_unknown_lists_known_names_and_close_matches():
    with pytest.raises(UnknownTaskError) as err:
        get_task("sst")
    message = str(err.value)
    assert "'sst'" in message and "Did you mean 'sst2'" in message
    for name in TASKS:
        assert name in message
    with pytest.raises(UnknownTaskError, match="Did you mean 'superglue-rte'"):
        get_task("superglue-rtee")


def test_taskspec_rejects_a_selection_metric_it_does_not_compute():
    with pytest.raises(ValueError, match="select_metric = 'f1'"):
        dataclasses.replace(get_task("sst2"), select_metric="f1")
    with pytest.raises(ValueError, match="unknown metric"):
        dataclasses.replace(get_task("sst2"), metrics=("accuracy", "bleu"))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_reports_exactly_its_metrics(name):
    spec = get_task(name)
    rng = np.random.default_rng(0)
    if spec.is_regression:
        labels = rng.uniform(0, 5, 20)
        predictions = labels + rng.normal(0, 0.5, 20)
    else:
        labels = np.arange(20) % spec.num_labels
        predictions = rng.normal(size=(20, spec.num_labels))
    result = compute_metrics(spec, predictions, labels)
    assert list(result) == list(spec.metrics)
    assert spec.select_metric in result
    assert all(isinstance(v, float) and math.isfinite(v) for v in result.values())


# ------------------------------------------------------------------------------------ metrics

def test_cola_mcc_matches_hand_computed_2x2():
    # tp = 3, tn = 2, fp = 1, fn = 1: MCC = (3*2 - 1*1) / sqrt(4 * 4 * 3 * 3) = 5 / 12.
    labels = [1, 1, 1, 1, 0, 0, 0]
    predicted = [1, 1, 1, 0, 0, 0, 1]
    result = compute_metrics("cola", one_hot_logits(predicted, 2), labels)
    assert result["mcc"] == pytest.approx(5 / 12)
    assert result["accuracy"] == pytest.approx(5 / 7)


def test_mrpc_f1_is_of_the_positive_class():
    # Positive class 1: tp = 2, fp = 1, fn = 2 -> P = 2/3, R = 1/2, F1 = 4/7.
    labels = [1, 1, 1, 1, 0, 0]
    predicted = [1, 1, 0, 0, 1, 0]
    result = compute_metrics("mrpc", predicted, labels)
    assert result["f1"] == pytest.approx(4 / 7)
    assert result["accuracy"] == pytest.approx(3 / 6)
    assert result["combined"] == pytest.approx((4 / 7 + 1 / 2) / 2)
    # The F1 of class 0 would be 2/5 (tp = 1, fp = 2, fn = 1); the metric must not be that.
    assert result["f1"] != pytest.approx(2 / 5)


def test_qqp_scores_like_mrpc():
    result = compute_metrics("qqp", one_hot_logits([1, 0, 0, 1], 2), [1, 0, 1, 1])
    # tp = 2, fp = 0, fn = 1 -> F1 = 4/5.
    assert result["f1"] == pytest.approx(0.8)
    assert result["accuracy"] == pytest.approx(0.75)


def test_stsb_pearson_spearman_and_their_mean():
    predictions = [1.0, 2.0, 3.0, 4.0]
    labels = [1.0, 3.0, 2.0, 6.0]
    # Pearson: deviations (-1.5, -.5, .5, 1.5) and (-2, 0, -1, 3): 7 / sqrt(5 * 14).
    pearson = 7 / math.sqrt(70)
    # Spearman: label ranks (1, 3, 2, 4), sum of squared rank gaps 2: 1 - 6 * 2 / (4 * 15) = 0.8.
    result = compute_metrics("stsb", predictions, labels)
    assert result["pearson"] == pytest.approx(pearson)
    assert result["spearman"] == pytest.approx(0.8)
    assert result["combined"] == pytest.approx((pearson + 0.8) / 2)
    column = compute_metrics("stsb", np.array(predictions)[:, None], labels)
    assert column == pytest.approx(result)


def test_cb_macro_f1_matches_hand_computed():
    labels = [0, 0, 1, 1, 2, 2]
    predicted = [0, 1, 1, 1, 2, 0]
    # Class 0: P = 1/2, R = 1/2, F1 = 1/2. Class 1: P = 2/3, R = 1, F1 = 4/5. Class 2: P = 1, R = 1/2, F1 = 2/3.
    macro = (1 / 2 + 4 / 5 + 2 / 3) / 3
    result = compute_metrics("cb", one_hot_logits(predicted, 3), labels)
    assert result["macro_f1"] == pytest.approx(macro)
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["combined"] == pytest.approx((macro + 4 / 6) / 2)


def test_mnli_mismatched_accuracy_from_logits():
    # Three classes; argmax of each row is (2, 0, 1, 1, 2): 3 of 5 correct.
    logits = torch.tensor([[0.1, 0.2, 0.9], [0.7, 0.1, 0.2], [0.0, 0.5, 0.4], [0.3, 0.6, 0.1], [0.2, 0.1, 0.3]])
    labels = torch.tensor([2, 0, 2, 1, 0])
    assert compute_metrics("mnli", logits, labels) == {"accuracy": pytest.approx(0.6)}
    assert compute_metrics("mnli", logits.to(torch.bfloat16), labels)["accuracy"] == pytest.approx(0.6)


def test_ids_and_logits_give_the_same_metrics():
    ids = np.array([0, 1, 1, 0, 1])
    labels = [0, 1, 0, 0, 1]
    assert compute_metrics("sst2", ids, labels) == compute_metrics("sst2", one_hot_logits(ids, 2), labels)
    assert list(predicted_ids("sst2", one_hot_logits(ids, 2))) == list(ids)


def test_metric_input_errors_name_the_shape():
    with pytest.raises(ValueError, match=r"3 classes .* shape \(2, 2\)"):
        compute_metrics("mnli", np.zeros((2, 2)), [0, 1])
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        compute_metrics("sst2", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="not integers"):
        compute_metrics("sst2", [0.2, 0.9], [0, 1])
    with pytest.raises(ValueError, match="one score per example"):
        compute_metrics("stsb", np.zeros((2, 2)), [0.0, 1.0])


def test_get_task_unknown_lists_the_tasks_on_your_own_files_too():
    with pytest.raises(UnknownTaskError) as err:
        get_task("seq2sec")
    message = str(err.value)
    assert "Did you mean 'seq2seq'" in message
    for name in ("classification", "regression", "causal-lm", "seq2seq", *GLUE_TASKS, *SUPERGLUE_TASKS):
        assert re.search(rf"[ :]{re.escape(name)}[,;.]", message), name
    with pytest.raises(UnknownTaskError, match="Did you mean 'classification'"):
        get_task("clasification")
    # asked of the registry, a task on your own files says where it is built instead
    with pytest.raises(UnknownTaskError, match=r"'causal-lm' is a task on your own files.*--task=causal-lm"):
        get_task("causal_lm")
