"""Generation fine-tuning: causal-LM SFT (`CausalLM`, task causal-lm) and sequence-to-sequence
(`Seq2Seq`, task seq2seq), the two `Objective`s registered in `fsam_ds.trainer.objectives.OBJECTIVES`.

Data. data.train_file and data.dev_file (csv, tsv, json, jsonl or parquet). A causal-LM file has
`prompt` and `completion` columns, or a `messages` column of chat turns ({"role", "content"}) whose
last turn, the assistant's, is the completion and whose earlier turns, rendered with the tokenizer's
chat template and its generation prompt, are the prompt. A seq2seq file has `source` and `target`.
data.input_column / data.output_column rename prompt/source and completion/target. Prompt and
completion are tokenized separately (the prompt with the tokenizer's special tokens, a rendered chat
with none, the completion with none) and EOS is appended to the completion, so the boundary is exact
and the model learns to stop.

Truncation. A causal-LM example (prompt + completion + EOS) longer than data.max_length loses prompt
tokens from the left: the completion is what is learned, and the end of the prompt is what it follows.
An example whose completion + EOS alone is longer cannot be kept whole and is left out, with a
warning that counts them. Seq2seq cuts the source, and the target (keeping its EOS), to max_length.

Loss. Each example's loss is the mean negative log-likelihood of its target tokens (completion + EOS,
or the target), from fp32 logits; every other position has label -100. Labels come from an explicit
mask (prompt length, sequence length), never from the pad id: a tokenizer may pad with its EOS
(SmolLM2 does), and the EOS that ends a completion must be learned. Per example, so that both SAM
passes average examples and ESAM can rank them.

Dev metrics. `loss` is the mean of the per-example losses (what training minimises), `neg_loss` its
negative; `perplexity` is exp of the token-weighted mean NLL over every target token of the split.
With eval.generate_examples = N > 0 the first N dev examples are also generated greedily (at most
eval.max_new_tokens tokens, stopped at EOS) and scored against their references, both decoded
without special tokens and stripped: `exact_match`, `chrf` (sacrebleu's corpus chrF / 100) and, for
seq2seq, `rouge1`, `rouge2`, `rougeL` (rouge-score F-measures with Porter stemming, averaged over
examples). All higher is better; the best checkpoint is picked by chrf (causal-lm) or rougeL
(seq2seq), or by neg_loss when generation is off.

Empty texts. Empty (or whitespace-only) prompts, sources, completions and targets are kept and counted
in a warning naming the file, column and rows; a file whose every target is empty is an error (see
`_Generation._check_empty` for why). A prompt or source that encodes to no token at all is the
tokenizer's BOS (causal LM) or EOS, so that there is a position to predict from and an input to generate from.

Prediction. `prediction_inputs` takes a file's prompts (chats, sources) in file order from its columns,
read once by the caller, targets optional and unused; `predict` gives {"generated": text, "truncated":
bool} per example, generated as in evaluation (with eval.max_new_tokens, which fsam-predict's
--max_new_tokens sets), "truncated" true for a generation that reached that limit without EOS.

Collective generation. Under ZeRO-3 every forward gathers parameters with every rank, so every rank
must run as many forwards: a dev batch is generated on every rank when any rank needs it (one
all-reduce of a flag), and Hugging Face `generate(synced_gpus=True)` keeps a rank that is done
stepping until every rank is.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from datasets import Dataset
from torch import Tensor

from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.data.checks import DataError, warn_empty_texts
from fsam_ds.trainer.data.readers import read_table
from fsam_ds.trainer.objectives import Model, model_device
from fsam_ds.trainer.run_config import TrainConfig

IGNORE = -100
"""The label of a position that is not a target (torch's cross_entropy ignore_index)."""
NO_TOKEN = -1
"""Fills fixed-width rows of generated and reference token ids past their end."""
MESSAGES = "messages"


# ------------------------------------------------------------------------------------ metrics

def generation_scores(generated: list[str], references: list[str], *, rouge: bool) -> dict[str, float]:
    """exact_match, chrf (sacrebleu's corpus chrF / 100) and with `rouge` the mean ROUGE-1/2/L F-measures."""
    import sacrebleu

    scores = {"exact_match": sum(g == r for g, r in zip(generated, references)) / len(references),
              "chrf": sacrebleu.corpus_chrf(generated, [references]).score / 100}
    if rouge:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        per_example = [scorer.score(r, g) for g, r in zip(generated, references)]
        for name in ("rouge1", "rouge2", "rougeL"):
            scores[name] = sum(s[name].fmeasure for s in per_example) / len(per_example)
    return scores


def target_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per example: the summed NLL of the positions whose label is not IGNORE, and their count.
    `logits` [batch, positions, vocab] (fp32) predict `labels` [batch, positions]."""
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    targets = labels != IGNORE
    return (nll * targets).sum(1), targets.sum(1)


def _pad(rows: list[list[int]], value: int, *, left: bool = False, width: int | None = None) -> Tensor:
    width = max([len(r) for r in rows] + [width or 0, 1])
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r):] = torch.tensor(r)
            else:
                out[i, :len(r)] = torch.tensor(r)
    return out


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (collective when distributed)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _until_eos(tokens: Tensor, eos: int, width: int) -> Tensor:
    """Generated ids cut before the first EOS and padded (NO_TOKEN) or cut to `width`."""
    ended = (tokens == eos).long().cumsum(1) > 0
    tokens = tokens.masked_fill(ended, NO_TOKEN)[:, :width].int()  # int32: every rank's rows are gathered
    return F.pad(tokens, (0, width - tokens.shape[1]), value=NO_TOKEN)


def _compact(labels: Tensor, width: int) -> Tensor:
    """Each row's target tokens (label != IGNORE), left-aligned in a row of `width` filled with NO_TOKEN."""
    out = torch.full((labels.shape[0], width), NO_TOKEN, dtype=torch.int32)
    for i, row in enumerate(labels.cpu()):
        kept = row[row != IGNORE][:width]
        out[i, :len(kept)] = kept
    return out


# --------------------------------------------------------------------------------- the objectives

class _Generation:
    """What the causal-LM and seq2seq objectives share: files, dev metrics, greedy generation."""

    default_columns: tuple[str, str]
    rouge: bool
    best_generation_metric: str
    train_split, select_split = "train", "validation"

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.tokenizer: Any = None  # set by prepare_splits / prediction_inputs; metrics decode with it
        d, e = cfg.data, cfg.eval
        self.input_column = d.input_column or self.default_columns[0]
        self.output_column = d.output_column or self.default_columns[1]
        self.generate_examples, self.max_new_tokens = e.generate_examples, e.max_new_tokens
        self.select_metric = self.best_generation_metric if self.generate_examples else "neg_loss"
        if d.limit_per_class:
            raise ConfigError(f"data.limit_per_class = {d.limit_per_class} samples classes, which task {cfg.task} "
                              "does not have; drop it, or cut the training file to the examples to keep.")

    # ---------------------------------------------------------------------------------- data
    def prepare_splits(self, tokenizer: Any) -> dict[str, Dataset]:
        self._check_tokenizer(tokenizer)
        d = self.cfg.data
        if not (d.train_file and d.dev_file):
            raise ConfigError(f"task {self.cfg.task} reads its data from files: give data.train_file and "
                              f"data.dev_file (csv, tsv, json, jsonl or parquet with columns "
                              f"{self._column_names()}); data.data_dir, if set, is the folder they are relative to.")
        base = Path(d.data_dir or ".")
        return {split: self._dataset(base / name, tokenizer, targets=True)
                for split, name in ((self.train_split, d.train_file), (self.select_split, d.dev_file))}

    def prediction_inputs(self, path: Path, columns: Mapping[str, list], tokenizer: Any) -> Dataset:
        """Tokenized rows of a file to predict on, in file order, from its `columns` (`read_table`'s);
        target columns optional."""
        self._check_tokenizer(tokenizer)
        return self._dataset(Path(path), tokenizer, targets=False, columns=dict(columns))

    def _dataset(self, path: Path, tokenizer: Any, *, targets: bool,
                 columns: dict[str, list] | None = None) -> Dataset:
        """The file's examples; `columns`: the file as already read (else it is read here)."""
        self.tokenizer = tokenizer
        if columns is None:
            columns = read_table(path, encoding=self.cfg.data.encoding)
        n = len(next(iter(columns.values()), []))
        if n == 0:
            raise DataError(f"{path} holds no examples; give a file with columns {self._column_names()} and at "
                            "least one row.")
        rows = self._encode(path, columns, tokenizer, targets=targets)
        rows["example_index"] = list(range(len(rows["input_ids"])))
        return Dataset.from_dict(rows)

    def _text_column(self, path: Path, columns: dict[str, list], name: str, *, key: str,
                     required: bool = True) -> list[str] | None:
        """Column `name` of the file as strings; None when it is absent and not `required`."""
        if name not in columns:
            if not required:
                return None
            raise DataError(f"{path} has no column {name!r} (its columns: {', '.join(map(repr, columns))}). Task "
                            f"{self.cfg.task} reads columns {self._column_names()}; rename the file's columns, or "
                            f"name the one to use with --data.{key}=COLUMN.")
        values = columns[name]
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise DataError(f"{path}: column {name!r} must hold text, but row {bad[0] + 1} holds "
                            f"{values[bad[0]]!r} ({len(bad)} such row(s)). Fill in or remove those rows.")
        return values

    def _column_names(self) -> str:
        return f"{self.input_column!r} and {self.output_column!r}"

    def _check_empty(self, path: Path, where: str, texts: list[str], *, target: bool) -> None:
        """Counts the empty (or whitespace-only) inputs or targets in `where` (e.g. "column 'prompt'").

        An empty target is kept with a warning, not refused: its target is EOS alone, a finite loss
        that teaches the model to answer that input with nothing, which a data set may mean (a
        question with no answer); more often it is a missing value, hence the count. A file in which
        every target is empty is an error: the model would learn only to stop at once, and the
        likely cause is the wrong column.
        """
        if target and texts and all(not t.strip() for t in texts):
            raise DataError(f"{path}: {where} is empty in every row ({len(texts)}), so the model would learn only "
                            f"to stop at once. Fill in the {self.default_columns[1]}s, or name the column that "
                            "holds them with --data.output_column=COLUMN.")
        what = ("its target is EOS alone, so the model learns to answer that input with nothing" if target
                else "the model is given no text there (a causal LM then starts from its start token)")
        warn_empty_texts(f"{path}:", where, texts, what)

    @staticmethod
    def _eos(tokenizer: Any) -> int | None:
        """The token that ends a target, and a generation."""
        return tokenizer.eos_token_id

    def _check_tokenizer(self, tokenizer: Any) -> None:
        if self._eos(tokenizer) is None:
            raise DataError(f"the tokenizer of {self.cfg.tokenizer or self.cfg.model!r} has no EOS token, which task "
                            f"{self.cfg.task} appends to every target so that generation learns to stop; set its "
                            "eos_token (tokenizer.save_pretrained after tokenizer.eos_token = '...').")

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self._eos(self.tokenizer) if pad is None else pad  # labels never come from the pad id

    # --------------------------------------------------------------------------------- model
    def _targets(self, model: Model, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Per example: summed NLL of its target tokens and their count."""
        raise NotImplementedError

    def _generation_inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _new_tokens(self, generated: Tensor, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def per_example_loss(self, model: Model, batch: Mapping[str, Tensor]) -> Tensor:
        total, count = self._targets(model, batch)
        return total / count

    def _generate_new_tokens(self, model: Model, batch: Mapping[str, Tensor]) -> Tensor:
        """The new token ids of `batch`'s greedy continuations as `generate` gives them: at most
        eval.max_new_tokens per example, each ending at its first EOS or at that limit. Collective when
        distributed (every rank must call it as often)."""
        device = model_device(model)
        ids, mask = (t.to(device) for t in self._generation_inputs(batch))
        module = getattr(model, "module", model)  # a DeepSpeed engine's transformers model
        out = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                              do_sample=False, num_beams=1, eos_token_id=self._eos(self.tokenizer),
                              pad_token_id=self._pad_id(),
                              synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
        return self._new_tokens(out, ids).cpu()

    def generate(self, model: Model, batch: Mapping[str, Tensor]) -> Tensor:
        """Greedy continuations of `batch`: [examples, eval.max_new_tokens] token ids, NO_TOKEN from the
        first EOS on. Collective when distributed (every rank must call it as often)."""
        return _until_eos(self._generate_new_tokens(model, batch), self._eos(self.tokenizer), self.max_new_tokens)

    @torch.no_grad()
    def eval_outputs(self, model: Model, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        total, count = self._targets(model, batch)
        out = {"loss": total / count, "nll_sum": total.double(), "target_tokens": count}
        if self.generate_examples:
            # every batch has the same rows (concatenated across batches and ranks); only the first
            # generate_examples of the split are generated and scored
            scored = batch["example_index"] < self.generate_examples
            n = len(scored)
            generated = torch.full((n, self.max_new_tokens), NO_TOKEN, dtype=torch.int32)
            if _any_rank(bool(scored.any()), model_device(model)):
                generated = self.generate(model, batch)
            out.update(scored=scored, generated=generated,
                       reference=_compact(batch["labels"], self.cfg.data.max_length))
        return out

    def _decode(self, rows: Tensor) -> list[str]:
        return [self.tokenizer.decode([t for t in row.tolist() if t != NO_TOKEN], skip_special_tokens=True).strip()
                for row in rows]

    def metrics(self, outputs: Mapping[str, Tensor]) -> dict[str, float]:
        loss = float(outputs["loss"].double().mean())
        mean_nll = float(outputs["nll_sum"].sum() / outputs["target_tokens"].sum())
        metrics = {"loss": loss, "neg_loss": -loss, "perplexity": math.exp(mean_nll) if mean_nll < 700 else math.inf}
        if "scored" in outputs and bool(outputs["scored"].any()):
            keep = outputs["scored"].bool()
            generated, references = self._decode(outputs["generated"][keep]), self._decode(outputs["reference"][keep])
            metrics.update(generation_scores(generated, references, rouge=self.rouge))
            metrics["generated_examples"] = len(references)
        return metrics

    def predict(self, model: Model, batch: Mapping[str, Tensor]) -> list[dict[str, Any]]:
        """One {"generated": text, "truncated": bool} per example of `batch`; "truncated" marks a generation
        cut at eval.max_new_tokens, one that had not ended (no EOS) when it reached that many tokens."""
        eos = self._eos(self.tokenizer)
        with torch.no_grad():
            tokens = self._generate_new_tokens(model, batch)
        # generate fills a row that ended before the others with pad ids; a row with no EOS ran to the limit
        cut = ~(tokens == eos).any(1)
        texts = self._decode(_until_eos(tokens, eos, self.max_new_tokens))
        return [{"generated": text, "truncated": bool(c)} for text, c in zip(texts, cut.tolist())]

    def batch_size(self, batch: Mapping[str, Tensor]) -> int:
        return len(batch["input_ids"])

    def model_kwargs(self) -> dict[str, Any]:
        return {}


class CausalLM(_Generation):
    """Supervised fine-tuning of a decoder-only model on prompt -> completion (task causal-lm)."""

    default_columns = ("prompt", "completion")
    rouge = False
    best_generation_metric = "chrf"

    def _encode(self, path: Path, columns: dict[str, list], tokenizer: Any, *, targets: bool) -> dict[str, list]:
        prompts, chat, completions = self._texts(path, columns, tokenizer, targets=targets)
        limit, eos = self.cfg.data.max_length, self._eos(tokenizer)
        # a rendered chat holds its special tokens already
        prompt_ids = tokenizer(prompts, add_special_tokens=not chat)["input_ids"]
        # a prompt of no tokens (an empty text, and a tokenizer that adds no BOS) is the start token, so
        # that the completion's first token has a position to be predicted from, and generation an input
        start = eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id
        prompt_ids = [ids or [start] for ids in prompt_ids]
        # to predict on: the prompt alone, whatever the file holds after it
        targets_ids = (tokenizer(completions, add_special_tokens=False)["input_ids"] if targets
                       else [[] for _ in prompts])
        rows: dict[str, list] = {"input_ids": [], "prompt_length": []}
        too_long = 0
        for prompt, completion in zip(prompt_ids, targets_ids):
            target = completion + [eos] if targets else []
            if len(target) > limit:
                too_long += 1
                continue
            prompt = prompt[max(0, len(prompt) + len(target) - limit):]  # drop prompt tokens from the left
            rows["input_ids"].append(prompt + target)
            rows["prompt_length"].append(len(prompt))
        if too_long:
            warnings.warn(f"{path}: left out {too_long} of {len(prompt_ids)} example(s) whose completion plus EOS "
                          f"is longer than data.max_length = {limit} tokens; raise data.max_length to keep them.",
                          stacklevel=2)
        if not rows["input_ids"]:
            raise DataError(f"{path}: every completion is longer than data.max_length = {limit} tokens; raise "
                            "data.max_length.")
        return rows

    def _texts(self, path: Path, columns: dict[str, list], tokenizer: Any,
               *, targets: bool) -> tuple[list[str], bool, list[str] | None]:
        """Each row's prompt text, whether the prompts are rendered chats, and (with `targets`) each
        row's completion."""
        if self.input_column not in columns and MESSAGES in columns:
            prompts, completions = self._chat(path, columns[MESSAGES], tokenizer, targets=targets)
            if completions is not None:
                self._check_empty(path, f"the last (assistant) turn of {MESSAGES!r}", completions, target=True)
            return prompts, True, completions
        prompts = self._text_column(path, columns, self.input_column, key="input_column")
        self._check_empty(path, f"column {self.input_column!r}", prompts, target=False)
        if not targets:
            return prompts, False, None
        completions = self._text_column(path, columns, self.output_column, key="output_column")
        self._check_empty(path, f"column {self.output_column!r}", completions, target=True)
        return prompts, False, completions

    def _chat(self, path: Path, conversations: list, tokenizer: Any,
              *, targets: bool) -> tuple[list[str], list[str] | None]:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{path} holds chat {MESSAGES!r}, but the tokenizer of "
                            f"{self.cfg.tokenizer or self.cfg.model!r} has no chat template to render them with. "
                            "Use a tokenizer that has one (an instruction-tuned model's), or give the data as "
                            f"{self.input_column!r} and {self.output_column!r} columns.")
        prompts, completions = [], []
        for i, turns in enumerate(conversations):
            ok = isinstance(turns, list) and turns and all(
                isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str)
                for t in turns)
            if not ok:
                raise DataError(f"{path}: row {i + 1}'s {MESSAGES!r} must be a non-empty list of "
                                "{\"role\": ..., \"content\": ...} turns; repair that row.")
            answered = turns[-1]["role"] == "assistant"
            if targets and not answered:
                raise DataError(f"{path}: row {i + 1}'s last turn is from {turns[-1]['role']!r}; the last turn "
                                "must be the assistant's, which is the completion learned. Repair that row.")
            history = turns[:-1] if answered else turns  # predicting: an answer there is the reference
            prompts.append(tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False))
            completions.append(turns[-1]["content"])
        return prompts, completions if targets else None

    def collator(self, tokenizer: Any) -> Callable[[list], Mapping[str, Tensor]]:
        self.tokenizer = tokenizer

        def collate(rows: list[Mapping[str, Any]]) -> dict[str, Tensor]:
            pad = self._pad_id()
            sequences = [list(r["input_ids"]) for r in rows]
            prompt_lengths = [int(r["prompt_length"]) for r in rows]
            input_ids = _pad(sequences, pad)
            positions = torch.arange(input_ids.shape[1])
            lengths = torch.tensor([len(s) for s in sequences])[:, None]
            attention_mask = (positions < lengths).long()
            is_target = attention_mask.bool() & (positions >= torch.tensor(prompt_lengths)[:, None])
            prompts = [s[:n] for s, n in zip(sequences, prompt_lengths)]
            return {"input_ids": input_ids, "attention_mask": attention_mask,
                    "labels": input_ids.masked_fill(~is_target, IGNORE),
                    # generation batches are padded on the left, so that every continuation starts at the end
                    "prompt_ids": _pad(prompts, pad, left=True),
                    "prompt_mask": _pad([[1] * len(p) for p in prompts], 0, left=True),
                    "example_index": torch.tensor([int(r["example_index"]) for r in rows])}

        return collate

    def _targets(self, model: Model, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        device = model_device(model)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        # position t predicts token t + 1
        return target_nll(logits[:, :-1].float(), batch["labels"][:, 1:].to(device))

    def _generation_inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["prompt_ids"], batch["prompt_mask"]

    def _new_tokens(self, generated: Tensor, inputs: Tensor) -> Tensor:
        return generated[:, inputs.shape[1]:]  # generate returns the prompt, then the continuation

    def model_class(self) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM


class Seq2Seq(_Generation):
    """Fine-tuning of an encoder-decoder model (T5, BART, EncoderDecoderModel) on source -> target
    (task seq2seq)."""

    default_columns = ("source", "target")
    rouge = True
    best_generation_metric = "rougeL"

    def _encode(self, path: Path, columns: dict[str, list], tokenizer: Any, *, targets: bool) -> dict[str, list]:
        limit, eos = self.cfg.data.max_length, self._eos(tokenizer)
        sources = self._text_column(path, columns, self.input_column, key="input_column")
        self._check_empty(path, f"column {self.input_column!r}", sources, target=False)
        target_texts = self._text_column(path, columns, self.output_column, key="output_column", required=targets)
        if targets:
            self._check_empty(path, f"column {self.output_column!r}", target_texts, target=True)
        # a source of no tokens (a tokenizer that adds none to an empty text) is EOS: the encoder needs an input
        rows = {"input_ids": [ids or [eos] for ids in
                              tokenizer(sources, truncation=True, max_length=limit)["input_ids"]]}
        labels = [[] for _ in sources]
        if target_texts is not None:
            # the tokenizer adds what its model's targets end with (T5 and BART: EOS); EOS is made sure of
            labels = [t if t and t[-1] == eos else t[:limit - 1] + [eos]
                      for t in tokenizer(text_target=target_texts, truncation=True, max_length=limit)["input_ids"]]
        rows["labels"] = labels
        return rows

    @staticmethod
    def _eos(tokenizer: Any) -> int | None:
        # a BERT-style tokenizer (a warm-started BERT2BERT EncoderDecoderModel) ends every text with SEP
        return tokenizer.sep_token_id if tokenizer.eos_token_id is None else tokenizer.eos_token_id

    def _check_tokenizer(self, tokenizer: Any) -> None:
        super()._check_tokenizer(tokenizer)
        if tokenizer.pad_token_id is None:
            raise DataError(f"the tokenizer of {self.cfg.tokenizer or self.cfg.model!r} has no pad token, which "
                            "task seq2seq pads sources with (and the decoder starts from, for T5); set its pad_token.")

    def collator(self, tokenizer: Any) -> Callable[[list], Mapping[str, Tensor]]:
        self.tokenizer = tokenizer

        def collate(rows: list[Mapping[str, Any]]) -> dict[str, Tensor]:
            sources = [list(r["input_ids"]) for r in rows]
            return {"input_ids": _pad(sources, self._pad_id()),
                    "attention_mask": _pad([[1] * len(s) for s in sources], 0),
                    "labels": _pad([list(r["labels"]) for r in rows], IGNORE),
                    "example_index": torch.tensor([int(r["example_index"]) for r in rows])}

        return collate

    def _targets(self, model: Model, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        device = model_device(model)
        labels = batch["labels"].to(device)
        module = getattr(model, "module", model)
        # the model's own shift (decoder start token, IGNORE -> pad); passing labels would also make it
        # compute its mean loss, which is not the per-example one
        decoder_input_ids = module.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       decoder_input_ids=decoder_input_ids).logits
        return target_nll(logits.float(), labels)

    def _generation_inputs(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        return batch["input_ids"], batch["attention_mask"]

    def _new_tokens(self, generated: Tensor, inputs: Tensor) -> Tensor:
        return generated[:, 1:]  # the decoder start token, then the generation

    def model_class(self) -> Any:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM
