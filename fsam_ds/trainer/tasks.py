"""The tasks a sequence(-pair) classifier is fine-tuned on, and their metrics.

Covered: every GLUE task; the SuperGLUE tasks that are honestly one sequence or a pair with one
label (BoolQ, CB, RTE, WiC, and the AX-b / AX-g diagnostics evaluated with an RTE-trained model);
and `polarity`, Pang & Lee's sentence polarity data. COPA (multiple choice), MultiRC (F1a/EM over
answer groups), ReCoRD (span ranking) and WSC (span coreference) need other heads and are left out.
The user's own files are the tasks `classification` and `regression`, built from the run's
configuration by `own_data_task` (columns and label set are the user's).
"""

from __future__ import annotations

import difflib
import string
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

GLUE_HUB_ID = "nyu-mll/glue"
SUPERGLUE_HUB_ID = "aps/super_glue"
POLARITY_HUB_ID = "cornell-movie-review-data/rotten_tomatoes"

COMBINED = "combined"
"""Mean of a task's other metrics (GLUE's per-task score for MRPC, QQP and STS-B; SuperGLUE's for CB)."""


class UnknownTaskError(ValueError):
    """A task name that is not in the registry."""


METRICS: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] = MappingProxyType({
    "accuracy": lambda y, p: float(accuracy_score(y, p)),
    # F1 of the positive class 1 (MRPC: equivalent, QQP: duplicate), as GLUE scores it.
    "f1": lambda y, p: float(f1_score(y, p, average="binary", pos_label=1, zero_division=0.0)),
    # Unweighted mean over the classes present in labels or predictions, as SuperGLUE scores CB.
    "macro_f1": lambda y, p: float(f1_score(y, p, average="macro", zero_division=0.0)),
    "mcc": lambda y, p: float(matthews_corrcoef(y, p)),
    "pearson": lambda y, p: float(stats.pearsonr(p, y).statistic),
    "spearman": lambda y, p: float(stats.spearmanr(p, y).statistic),
})
"""Metric functions, each called as fn(labels, predictions) -> float."""


@dataclass(frozen=True)
class TaskSpec:
    """One fine-tuning task: where its data lives, how an example becomes text, how it is scored."""

    name: str
    hub_id: str | None
    hub_config: str | None
    text_columns: tuple[str, ...]
    """One column (single sequence) or two (a pair), in the order the model reads them."""
    label_names: tuple[str, ...] | None
    """Class names in label-id order; None for regression (STS-B)."""
    metrics: tuple[str, ...]
    select_metric: str
    """The metric, on `dev_splits[0]`, that picks the best checkpoint."""
    label_column: str = "label"
    train_split: str = "train"
    dev_splits: tuple[str, ...] = ("validation",)
    text_templates: tuple[str, ...] | None = None
    """Optional str.format templates over the raw columns, one per text (WiC puts the target word
    in front of its first sentence); when None the text columns are used verbatim."""
    label_map: Mapping[str, int] | None = field(default=None, hash=False)
    """Raw label values (as strings) mapped to label ids before anything else, e.g. {'-1': 0}."""
    split_tasks: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Splits that come from another task's data: split name -> that task's name."""

    def __post_init__(self) -> None:
        for name in ("label_map", "split_tasks"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, MappingProxyType(dict(value)))
        where = f"TaskSpec {self.name!r}"
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"{where}: text_columns = {self.text_columns!r} must name one column or a pair.")
        if self.text_templates is not None and len(self.text_templates) != len(self.text_columns):
            raise ValueError(f"{where}: text_templates needs one template per text column "
                             f"({len(self.text_columns)}), got {len(self.text_templates)}.")
        if self.label_names is not None and len(self.label_names) < 2:
            raise ValueError(f"{where}: label_names = {self.label_names!r} needs at least two classes; "
                             "use None for a regression task.")
        unknown = [m for m in self.metrics if m not in METRICS and m != COMBINED]
        if unknown:
            raise ValueError(f"{where}: unknown metric(s) {unknown}; known: {sorted(METRICS)} and {COMBINED!r}.")
        if self.select_metric not in self.metrics:
            raise ValueError(f"{where}: select_metric = {self.select_metric!r} is not one of its metrics "
                             f"{list(self.metrics)}.")
        if not self.dev_splits:
            raise ValueError(f"{where}: dev_splits is empty; name at least the split that selects checkpoints.")
        if self.label_map:
            bad = {k: v for k, v in self.label_map.items() if not 0 <= v < self.num_labels}
            if bad or self.is_regression:
                raise ValueError(f"{where}: label_map {dict(self.label_map)} must map onto class ids "
                                 f"0..{self.num_labels - 1} of a classification task.")

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Output width of the classification head (1 for regression)."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def select_split(self) -> str:
        return self.dev_splits[0]

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Raw columns an example needs: those the texts are built from, then the label column."""
        if self.text_templates is None:
            names = list(self.text_columns)
        else:
            names = [f for t in self.text_templates for _, f, _, _ in string.Formatter().parse(t) if f]
        return tuple(dict.fromkeys([*names, self.label_column]))

    def texts(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        """The text (or pair) the model reads for one raw example."""
        if self.text_templates is None:
            return tuple(str(row[c]) for c in self.text_columns)
        return tuple(t.format_map(row) for t in self.text_templates)

    def task_for_split(self, split: str) -> TaskSpec:
        """The task whose data (hub config, columns) provides `split`."""
        other = self.split_tasks.get(split)
        return self if other is None else get_task(other)


def _glue(name: str, text: tuple[str, ...], labels: tuple[str, ...] | None, metrics: tuple[str, ...],
          select: str, **kw: Any) -> TaskSpec:
    return TaskSpec(name=name, hub_id=GLUE_HUB_ID, hub_config=name, text_columns=text, label_names=labels,
                    metrics=metrics, select_metric=select, **kw)


def _superglue(name: str, config: str, text: tuple[str, ...], labels: tuple[str, ...],
               metrics: tuple[str, ...], select: str, **kw: Any) -> TaskSpec:
    return TaskSpec(name=name, hub_id=SUPERGLUE_HUB_ID, hub_config=config, text_columns=text, label_names=labels,
                    metrics=metrics, select_metric=select, **kw)


_NLI2 = ("entailment", "not_entailment")
_BOOL = ("False", "True")
_PAIR_SCORE = ("accuracy", "f1", COMBINED)

_ALL = (
    _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("mcc", "accuracy"), "mcc"),
    _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy"),
    _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), _PAIR_SCORE, COMBINED),
    _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), _PAIR_SCORE, COMBINED),
    _glue("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman", COMBINED), COMBINED),
    _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
          "accuracy", dev_splits=("validation_matched", "validation_mismatched")),
    _glue("qnli", ("question", "sentence"), _NLI2, ("accuracy",), "accuracy"),
    _glue("rte", ("sentence1", "sentence2"), _NLI2, ("accuracy",), "accuracy"),
    # WNLI's label order is the reverse of RTE's
    _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",), "accuracy"),
    _superglue("boolq", "boolq", ("question", "passage"), _BOOL, ("accuracy",), "accuracy"),
    _superglue("cb", "cb", ("premise", "hypothesis"), ("entailment", "contradiction", "neutral"),
               ("accuracy", "macro_f1", COMBINED), COMBINED),
    _superglue("superglue-rte", "rte", ("premise", "hypothesis"), _NLI2, ("accuracy",), "accuracy"),
    _superglue("wic", "wic", ("sentence1", "sentence2"), _BOOL, ("accuracy",), "accuracy",
               text_templates=("{word}: {sentence1}", "{sentence2}")),
    # The diagnostics have only a labelled test split. They are scored the SuperGLUE way: a model
    # trained on RTE, checkpoints selected on RTE's validation split, the diagnostic only reported
    # (AX-b: MCC on 'test'; AX-g: accuracy, as Winogender's gender parity needs pair ids the hub copy lacks).
    _superglue("axb", "axb", ("sentence1", "sentence2"), _NLI2, ("accuracy", "mcc"), "accuracy",
               dev_splits=("validation", "test"),
               split_tasks={"train": "superglue-rte", "validation": "superglue-rte"}),
    _superglue("axg", "axg", ("premise", "hypothesis"), _NLI2, ("accuracy",), "accuracy",
               dev_splits=("validation", "test"),
               split_tasks={"train": "superglue-rte", "validation": "superglue-rte"}),
    TaskSpec(name="polarity", hub_id=POLARITY_HUB_ID, hub_config=None, text_columns=("text",),
             label_names=("neg", "pos"), metrics=("accuracy",), select_metric="accuracy",
             label_map={"-1": 0, "1": 1}),  # the raw files label 1 / -1
)

TASKS: Mapping[str, TaskSpec] = MappingProxyType({t.name: t for t in _ALL})
GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")
SUPERGLUE_TASKS = ("boolq", "cb", "superglue-rte", "wic", "axb", "axg")

_ALIASES = {
    "sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli-mm": "mnli", "sgrte": "superglue-rte",
    "superglue-boolq": "boolq", "superglue-cb": "cb", "superglue-wic": "wic",
    "superglue-axb": "axb", "superglue-axg": "axg", "ax-b": "axb", "ax-g": "axg",
}


CLASSIFICATION, REGRESSION = "classification", "regression"
OWN_DATA_TASKS = (CLASSIFICATION, REGRESSION)
"""Task names that train on the user's own files (data.train_file, data.dev_file) instead of a registered task."""
CAUSAL_LM, SEQ2SEQ = "causal-lm", "seq2seq"
GENERATION_TASKS = (CAUSAL_LM, SEQ2SEQ)
"""Task names that fine-tune a generator on the user's own files (`fsam_ds.trainer.generation`)."""


def known_tasks() -> str:
    """Every task name fsam-train takes, grouped, for messages."""
    others = sorted(set(TASKS) - set(GLUE_TASKS) - set(SUPERGLUE_TASKS))
    return (f"GLUE: {', '.join(GLUE_TASKS)}; SuperGLUE: {', '.join(SUPERGLUE_TASKS)}; also {', '.join(others)}; "
            f"on your own files (data.train_file, data.dev_file): {', '.join(OWN_DATA_TASKS + GENERATION_TASKS)}")


def get_task(name: str | TaskSpec) -> TaskSpec:
    """The registered task called `name` (case-insensitive; '_' and '-' are interchangeable)."""
    if isinstance(name, TaskSpec):
        return name
    key = str(name).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in TASKS:
        return TASKS[key]
    if key in OWN_DATA_TASKS + GENERATION_TASKS:
        python = (" From Python, build it with own_data_task(...)." if key in OWN_DATA_TASKS else "")
        raise UnknownTaskError(f"{key!r} is a task on your own files, not a registered one: fsam-train builds it "
                               f"from the run's configuration (--task={key} with data.train_file and "
                               f"data.dev_file).{python}")
    close = difflib.get_close_matches(key, [*TASKS, *_ALIASES, *OWN_DATA_TASKS, *GENERATION_TASKS], n=3, cutoff=0.6)
    close = list(dict.fromkeys(_ALIASES.get(c, c) for c in close))
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownTaskError(f"Unknown task {name!r}.{hint} Known tasks: {known_tasks()}.")


def own_data_task(name: str, text_columns: tuple[str, ...], label_column: str,
                  label_names: tuple[str, ...] | None) -> TaskSpec:
    """A classification (`label_names`: the classes in label-id order) or regression (None) task over
    the user's own columns. Scored with accuracy and macro-F1 (plus MCC for two classes; accuracy picks
    the best checkpoint) or Pearson and Spearman correlation (Pearson picks)."""
    if name == REGRESSION:
        return TaskSpec(name=name, hub_id=None, hub_config=None, text_columns=text_columns, label_names=None,
                        metrics=("pearson", "spearman"), select_metric="pearson", label_column=label_column)
    if name != CLASSIFICATION:
        raise UnknownTaskError(f"own_data_task: name = {name!r} must be one of {', '.join(OWN_DATA_TASKS)}.")
    if label_names is None:
        raise ValueError("own_data_task: a classification task needs its label_names (the classes in id order).")
    binary = len(label_names) == 2
    return TaskSpec(name=name, hub_id=None, hub_config=None, text_columns=text_columns, label_names=label_names,
                    metrics=("accuracy", "macro_f1", *(("mcc",) if binary else ())), select_metric="accuracy",
                    label_column=label_column)


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        return (values.float() if values.is_floating_point() else values).numpy()  # bf16 has no numpy dtype
    return np.asarray(values)


def predicted_ids(task: str | TaskSpec, predictions: Any) -> np.ndarray:
    """Class ids from logits / probabilities [n, num_labels] (argmax) or from ids [n] (unchanged)."""
    spec = get_task(task)
    pred = _to_numpy(predictions)
    if pred.ndim == 2:
        if pred.shape[1] != spec.num_labels:
            raise ValueError(f"Task {spec.name!r} has {spec.num_labels} classes but the predictions have "
                             f"shape {pred.shape}; pass logits of shape [n, {spec.num_labels}] or class ids [n].")
        return pred.argmax(axis=1)
    if pred.ndim != 1:
        raise ValueError(f"Predictions for task {spec.name!r} must be logits [n, {spec.num_labels}] or class "
                         f"ids [n]; got shape {pred.shape}.")
    if pred.size and not np.all(np.mod(pred, 1) == 0):
        raise ValueError(f"Task {spec.name!r}: 1-D predictions must be class ids, but some are not integers "
                         f"(e.g. {pred[np.mod(pred, 1) != 0][0]!r}); pass the 2-D logits instead.")
    return pred.astype(np.int64)


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """The task's metrics, keyed by the names in `TaskSpec.metrics`.

    Classification: `predictions` are logits or probabilities of shape [n, num_labels] (argmax is
    taken) or predicted class ids of shape [n]. Regression (STS-B): the raw scalar predictions,
    shape [n] or [n, 1]. Accepts numpy arrays, lists and torch tensors. A correlation of a
    constant prediction is undefined and comes back as nan.
    """
    spec = get_task(task)
    gold = _to_numpy(labels).reshape(-1)
    if spec.is_regression:
        pred = _to_numpy(predictions).astype(np.float64)
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        if pred.ndim != 1:
            raise ValueError(f"Regression task {spec.name!r} needs one score per example ([n] or [n, 1]); "
                             f"got shape {pred.shape}.")
        gold = gold.astype(np.float64)
    else:
        pred = predicted_ids(spec, predictions)
        gold = gold.astype(np.int64)
    if pred.shape[0] != gold.shape[0]:
        raise ValueError(f"Task {spec.name!r}: {pred.shape[0]} predictions but {gold.shape[0]} labels.")
    if gold.size == 0:
        raise ValueError(f"Task {spec.name!r}: no examples to score.")

    out: dict[str, float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for name in spec.metrics:
            if name != COMBINED:
                out[name] = METRICS[name](gold, pred)
    if COMBINED in spec.metrics:
        out[COMBINED] = float(np.mean(list(out.values())))
    return out

