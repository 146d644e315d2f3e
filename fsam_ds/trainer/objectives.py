"""What the model learns: the seam between the training loop and the task.

An objective reads and tokenizes its data, turns a batch into per-example losses (both SAM passes
use their mean, and ESAM ranks the examples by them, so the loss must be per example) and a dev
split's per-example outputs into metrics. The loop, the evaluation and the engines know nothing else
about the task, so a new kind of fine-tuning (seq2seq, causal-LM) is a new `Objective` registered in
`OBJECTIVES`, not a change to the loop.

Evaluation is collective: `eval_outputs` gives rows (dim 0 = examples) that are cut to the real
examples, gathered from every rank and concatenated before `metrics` sees them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import Tensor

from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.data.batches import padding_collator, tokenize
from fsam_ds.trainer.data.readers import read_split_file
from fsam_ds.trainer.data.splits import infer_label_names, load_task_splits, prediction_split
from fsam_ds.trainer.run_config import DataSection, TrainConfig
from fsam_ds.trainer.tasks import (CAUSAL_LM, CLASSIFICATION, OWN_DATA_TASKS, REGRESSION, SEQ2SEQ, TaskSpec,
                                   compute_metrics, get_task, own_data_task, predicted_ids)

Model = Callable[..., Any]
"""The module or DeepSpeed engine: called with the batch's model inputs as keyword arguments."""


class Objective(Protocol):
    """How one kind of task trains and is scored."""

    select_metric: str
    """The metric (higher is better) that picks the best checkpoint."""
    train_split: str
    select_split: str
    """The dev split whose `select_metric` picks the best checkpoint."""

    def prepare_splits(self, tokenizer: Any) -> dict[str, Dataset]:
        """The train split and every dev split, read, checked and tokenized into model-ready columns."""
        ...

    def collator(self, tokenizer: Any) -> Callable[[list], Mapping[str, Tensor]]:
        """Pads a list of tokenized examples into a batch."""
        ...

    def per_example_loss(self, model: Model, batch: Mapping[str, Tensor]) -> Tensor:
        """A 1-D tensor with one loss per example of `batch`."""
        ...

    def eval_outputs(self, model: Model, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Per-example rows `metrics` needs, including "loss"; computed without gradients."""
        ...

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        """A dev split's metrics from its concatenated `eval_outputs`."""
        ...

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        """Examples in `batch` (throughput logging)."""
        ...

    def model_class(self) -> Any:
        """The transformers Auto class whose `from_pretrained` builds the model with this task's head."""
        ...

    def model_kwargs(self) -> dict[str, Any]:
        """`from_pretrained` keyword arguments that shape the head (labels, problem type)."""
        ...

    def prediction_inputs(self, path: Path, columns: Mapping[str, list], tokenizer: Any) -> Dataset:
        """Tokenized rows of a file to predict on, in file order, from `columns`, the file as `read_table`
        read it (the caller reads it once, and echoes the same rows); `path` names it in messages.
        Label/target columns optional."""
        ...

    def predict(self, model: Model, batch: Mapping[str, Tensor]) -> list[dict[str, Any]]:
        """One JSON-serialisable prediction per example of `batch` (e.g. {"label": .., "probabilities": {..}}
        or {"generated": .., "truncated": ..})."""
        ...


def model_device(model: Model) -> torch.device:
    """The device that `model`'s inputs go to."""
    device = getattr(model, "device", None)  # a DeepSpeed engine or a transformers model
    return device if isinstance(device, torch.device) else next(model.parameters()).device


class SequenceClassification:
    """Classification (cross-entropy) or regression (mean squared error, one output) of a sequence
    or a sequence pair, scored with the task's metrics (`fsam_ds.trainer.tasks`). A prediction is
    {"label": class name, "probabilities": {class name: softmax probability}} or {"score": value}."""

    def __init__(self, task: TaskSpec | str, cfg: TrainConfig | None = None,
                 tables: Mapping[Path, dict[str, list]] | None = None) -> None:
        """`task`: a task of the user's own data, or a registered task's name (`fsam_ds.trainer.tasks`), which
        reads its own columns, so the settings that name the columns and labels of one's own data are refused.
        `tables`: data files already read (to infer the label set) -> their columns, which `prepare_splits`
        uses rather than reading those files again."""
        if isinstance(task, str):
            task = get_task(task)
            given = [f"data.{key}" for key in _OWN_DATA_KEYS
                     if cfg is not None and getattr(cfg.data, key) != getattr(DataSection(), key)]
            if given:
                raise ConfigError(f"{', '.join(given)} name the columns and labels of your own data, read only with "
                                  f"--task=classification or --task=regression; task {task.name!r} reads its own "
                                  f"columns ({', '.join(task.required_columns)}). Use --task=classification (or "
                                  f"regression) to train on your file's columns, or drop "
                                  f"{', '.join('--' + g for g in given)}.")
        self.task, self.cfg = task, cfg
        self._tables = dict(tables or {})
        self.select_metric = task.select_metric
        self.train_split, self.select_split = task.train_split, task.select_split

    def prepare_splits(self, tokenizer: Any) -> dict[str, Dataset]:
        assert self.cfg is not None, "prepare_splits needs the run's configuration"
        d, seed = self.cfg.data, self.cfg.seed
        splits = load_task_splits(self.task, train_per_class=d.limit_per_class or None, seed=seed,
                                  encoding=d.encoding, tables=self._tables, **_data_sources(self.cfg, self.task))
        self._tables = {}  # not held for the rest of the run
        return {name: tokenize(split, tokenizer, max_length=d.max_length) for name, split in splits.items()}

    def collator(self, tokenizer: Any) -> Callable[[list], Mapping[str, Tensor]]:
        return padding_collator(tokenizer)

    def _logits(self, model: Model, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Logits in fp32 (whatever the model's dtype) and the labels, on the model's device."""
        device = model_device(model)
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = inputs.pop("labels")
        return model(**inputs).logits.float(), labels

    def _losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.task.is_regression:  # one output, mean squared error, as the Hugging Face head computes it
            return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="none")
        return F.cross_entropy(logits, labels, reduction="none")

    def per_example_loss(self, model: Model, batch: Mapping[str, Tensor]) -> Tensor:
        return self._losses(*self._logits(model, batch))

    @torch.no_grad()
    def eval_outputs(self, model: Model, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logits, labels = self._logits(model, batch)
        return {"logits": logits, "labels": labels, "loss": self._losses(logits, labels)}

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        metrics = compute_metrics(self.task, outputs["logits"], outputs["labels"])
        metrics["loss"] = float(outputs["loss"].double().mean())
        return metrics

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return len(batch["labels"])

    def model_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def model_kwargs(self) -> dict[str, Any]:
        task = self.task
        # a checkpoint with another head size (e.g. fine-tuned on MNLI) gets a new head
        kwargs: dict[str, Any] = {"num_labels": task.num_labels, "ignore_mismatched_sizes": True}
        if task.is_regression:
            kwargs["problem_type"] = "regression"
        else:
            kwargs["id2label"] = dict(enumerate(task.label_names))
            kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
        return kwargs

    def prediction_inputs(self, path: Path, columns: Mapping[str, list], tokenizer: Any) -> Dataset:
        assert self.cfg is not None, "prediction_inputs needs the run's configuration"
        return tokenize(prediction_split(self.task, path, columns), tokenizer, max_length=self.cfg.data.max_length)

    @torch.no_grad()
    def predict(self, model: Model, batch: Mapping[str, Tensor]) -> list[dict[str, Any]]:
        device = model_device(model)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float().cpu()
        if self.task.is_regression:
            return [{"score": score} for score in logits[:, 0].tolist()]
        names = self.task.label_names or ()
        # the class is the logits' argmax, as the dev metrics take it, not that of the rounded probabilities
        chosen = predicted_ids(self.task, logits).tolist()
        return [{"label": names[i], "probabilities": dict(zip(names, row))}
                for i, row in zip(chosen, logits.softmax(-1).tolist())]


def _data_sources(cfg: TrainConfig, task: TaskSpec) -> dict[str, Any]:
    """data.source/data_dir/train_file/dev_file -> load_task_splits arguments."""
    d = cfg.data
    if d.source == "hub":
        if d.train_file or d.dev_file or d.data_dir:
            raise ConfigError("data.train_file, data.dev_file and data.data_dir are read only with "
                              "data.source=local; set data.source=local to train on local files, or drop them "
                              "to load the task from the Hugging Face hub.")
        return {"source": "hub"}
    if d.train_file or d.dev_file:
        if not (d.train_file and d.dev_file):
            raise ConfigError("data.source=local with files needs both data.train_file and data.dev_file "
                              "(.csv/.tsv/.json/.jsonl/.parquet with the task's column names); data.data_dir, "
                              "if set, is the folder they are relative to.")
        base = Path(d.data_dir or ".")
        files = {task.train_split: base / d.train_file, task.select_split: base / d.dev_file}
        return {"source": "files", "data_files": files, "splits": tuple(files)}
    if d.data_dir:
        return {"source": "glue-tsv", "data_dir": d.data_dir}
    raise ConfigError("data.source=local needs data.data_dir (a GLUE-style folder with train.tsv and dev.tsv) "
                      "or data.train_file and data.dev_file.")


def own_data_objective(cfg: TrainConfig) -> SequenceClassification:
    """--task=classification|regression: the user's files, columns and labels (data.text_columns,
    data.label_column, data.labels). Without data.labels a classification run reads its label set from
    data.train_file and records it in cfg.data.labels, so that the run's config.json, its checkpoints and
    its exported models carry it and resume and fsam-predict rebuild the same class ids."""
    name, d = cfg.task.strip().lower(), cfg.data
    flag = f"--task={name}"
    if d.source == "hub":
        raise ConfigError(f"{flag} trains on your own files, but data.source = hub. Drop --data.source (local is "
                          "implied) and give data.train_file and data.dev_file.")
    if not (d.train_file and d.dev_file):
        raise ConfigError(f"{flag} trains on your own files: give both --data.train_file and --data.dev_file "
                          "(.csv/.tsv/.json/.jsonl/.parquet; data.data_dir, if set, is the folder they are relative "
                          f"to), with the text in data.text_columns ({','.join(d.text_columns)}) and the "
                          f"{'score' if name == REGRESSION else 'class'} in data.label_column ({d.label_column}).")
    if name == REGRESSION and d.labels:
        raise ConfigError(f"data.labels = {list(d.labels)} lists classes, but {flag} predicts a number. Use "
                          "--task=classification for classes, or drop --data.labels.")
    train_table = None
    if name == CLASSIFICATION and not d.labels:
        # read once: the label set now, the train split from the same columns in prepare_splits
        train_file = Path(d.data_dir or ".") / d.train_file
        train_table = read_split_file(train_file, encoding=d.encoding)
        d.labels = infer_label_names(train_file, d.label_column, columns=train_table)
    task = own_data_task(name, tuple(d.text_columns), d.label_column,
                         tuple(d.labels) if name == CLASSIFICATION else None)
    return SequenceClassification(task, cfg, None if train_table is None else {train_file: train_table})


def _causal_lm(cfg: TrainConfig) -> Objective:
    from fsam_ds.trainer.generation import CausalLM  # generation builds on this module

    return CausalLM(cfg)


def _seq2seq(cfg: TrainConfig) -> Objective:
    from fsam_ds.trainer.generation import Seq2Seq

    return Seq2Seq(cfg)


OBJECTIVES: dict[str, Callable[[TrainConfig], Objective]] = {
    **dict.fromkeys(OWN_DATA_TASKS, own_data_objective), CAUSAL_LM: _causal_lm, SEQ2SEQ: _seq2seq}
"""Objectives by `task` name for the kinds of fine-tuning that are not a registered task
(`fsam_ds.trainer.tasks`); any other name is a registered classification or regression task."""

_OWN_DATA_KEYS = ("text_columns", "label_column", "labels")


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective that trains and scores the run's `task` (whether the model has a head for it is
    checked with the model, `fsam_ds.trainer.model_loading.open_pretrained`)."""
    make = OBJECTIVES.get(cfg.task.strip().lower().replace("_", "-"))  # as get_task reads names
    return make(cfg) if make is not None else SequenceClassification(cfg.task, cfg)
