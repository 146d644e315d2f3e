"""Causal-LM SFT and seq2seq objectives (`fsam_ds.trainer.generation`): the completion-only loss
against a hand computation, chat rendering, truncation, data errors, generation metrics, prediction,
and greedy generation at ZeRO-3 on 2 ranks against the single-process model. The models are tiny
config-built Llama and T5 models with a word-level tokenizer written by `generation_fixtures`."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import generation_fixtures as gf
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.data.checks import DataError
from fsam_ds.trainer.data.readers import read_table
from fsam_ds.trainer.generation import IGNORE, NO_TOKEN, CausalLM, generation_scores
from fsam_ds.trainer.objectives import objective_for


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generation")
    files = gf.write_generation_files(root / "data")
    return {"root": root, "files": files, "llama": gf.write_tiny_llama(root / "llama"),
            "t5": gf.write_tiny_t5(root / "t5"), "bert2bert": gf.write_tiny_bert2bert(root / "bert2bert")}


def causal(assets, kind: str = "pc", **eval_keys) -> tuple[CausalLM, object, dict]:
    objective = objective_for(gf.generation_config(assets["llama"], assets["files"], "causal-lm", kind, **eval_keys))
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    return objective, tok, objective.prepare_splits(tok)


def batch_of(objective, tok, split, n: int) -> dict:
    return objective.collator(tok)([split[i] for i in range(n)])


class FixedLogits(torch.nn.Module):
    """Returns the same logits whatever the input: the loss then depends on the input ids only as targets."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits)

    def forward(self, input_ids, attention_mask, **_):
        return type("Out", (), {"logits": self.logits[:, :input_ids.shape[1]]})()


def hand_loss(logits: torch.Tensor, ids: list[int], prompt_length: int) -> float:
    """Mean over the completion tokens t (prompt_length <= t < len) of -log p(ids[t] | logits[t - 1])."""
    terms = [-torch.log_softmax(logits[t - 1].double(), -1)[ids[t]] for t in range(prompt_length, len(ids))]
    return float(sum(terms) / len(terms))


def test_completion_only_loss_is_each_examples_mean_over_its_completion(assets):
    objective, tok, splits = causal(assets)
    rows = [splits["train"][i] for i in range(4)]
    torch.manual_seed(0)
    logits = torch.randn(4, 16, len(tok))
    model = FixedLogits(logits)
    losses = objective.per_example_loss(model, objective.collator(tok)(rows)).detach()
    expected = [hand_loss(logits[i], r["input_ids"], r["prompt_length"]) for i, r in enumerate(rows)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-5)
    # the wrong variant, a token-weighted mean over the batch, differs: completions differ in length
    lengths = [len(r["input_ids"]) - r["prompt_length"] for r in rows]
    assert len(set(lengths)) > 1
    weighted = sum(l * n for l, n in zip(expected, lengths)) / sum(lengths)
    assert abs(float(losses.detach().mean()) - weighted) > 1e-3

    def loss_after(position: int) -> float:
        changed = [dict(r) for r in rows]
        ids = list(changed[0]["input_ids"])
        ids[position] = (ids[position] + 1) % len(tok)
        changed[0]["input_ids"] = ids
        return float(objective.per_example_loss(model, objective.collator(tok)(changed))[0].detach())

    prompt_length = rows[0]["prompt_length"]
    for position in range(1, prompt_length):  # a prompt token is never a target
        assert loss_after(position) == pytest.approx(float(losses[0]), abs=0)
    for position in range(prompt_length, len(rows[0]["input_ids"])):  # every completion token (EOS too) is
        assert loss_after(position) != pytest.approx(float(losses[0]), rel=1e-6)


def test_padded_batch_loss_equals_each_example_alone(assets):
    """The real model on a right-padded batch gives every example the loss it has unpadded; labels come
    from the prompt and sequence lengths, so an EOS that is also the pad id still counts once at the end."""
    objective, tok, splits = causal(assets)
    model = AutoModelForCausalLM.from_pretrained(assets["llama"])
    rows = [splits["validation"][i] for i in range(5)]
    batch = objective.collator(tok)(rows)
    assert batch["input_ids"].shape[1] > min(len(r["input_ids"]) for r in rows)  # there is padding
    losses = objective.per_example_loss(model, batch).detach()
    for i, r in enumerate(rows):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
        assert float(losses[i]) == pytest.approx(hand_loss(alone, r["input_ids"], r["prompt_length"]), rel=1e-5)
        labels = batch["labels"][i]
        target = r["input_ids"][r["prompt_length"]:]
        assert labels[labels != IGNORE].tolist() == target and target[-1] == tok.eos_token_id


@pytest.mark.parametrize("name", ["t5", "bert2bert"])
def test_seq2seq_loss_is_each_examples_mean_over_its_target(assets, name):
    """Against the model's own (token-mean) loss on each example alone; the BERT2BERT tokenizer has no
    EOS, so its targets end with SEP."""
    objective = objective_for(gf.generation_config(assets[name], assets["files"], "seq2seq", "s2s"))
    tok = AutoTokenizer.from_pretrained(assets[name])
    split = objective.prepare_splits(tok)["validation"]
    model = AutoModelForSeq2SeqLM.from_pretrained(assets[name])
    rows = [split[i] for i in range(4)]
    assert len({len(r["labels"]) for r in rows}) > 1  # the batch pads targets
    losses = objective.per_example_loss(model, objective.collator(tok)(rows)).detach()
    for i, r in enumerate(rows):
        assert r["labels"][-1] == (tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id)
        with torch.no_grad():  # the model's own mean loss on the example alone
            own = model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss
        assert float(losses[i]) == pytest.approx(float(own), rel=1e-5)


def test_chat_rows_render_the_history_with_the_template_and_learn_the_last_answer(assets):
    objective, tok, splits = causal(assets, kind="chat")
    row = splits["train"][0]
    prompt, answer = gf.pairs(1, 0)[0]
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
    assert row["input_ids"][:row["prompt_length"]] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert row["input_ids"][row["prompt_length"]:] == tok(answer, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id]

    asked = [{"role": "user", "content": "copy : red"}]
    bad = gf.write_jsonl(assets["root"] / "bad_chat.jsonl", [
        {"messages": asked + [{"role": "assistant", "content": "red"}]}, {"messages": asked}])
    files = {**assets["files"], "train_chat": bad}
    unanswered = objective_for(gf.generation_config(assets["llama"], files, kind="chat"))
    with pytest.raises(DataError, match="row 2's last turn is from 'user'.*must be the assistant's"):
        unanswered.prepare_splits(tok)
    # to predict on, an unanswered conversation is all prompt
    row = unanswered.prediction_inputs(bad, read_table(bad), tok)[1]
    assert row["prompt_length"] == len(row["input_ids"])
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        objective.prepare_splits(tok)


def test_long_examples_lose_prompt_tokens_from_the_left_and_too_long_completions_are_counted(assets, tmp_path):
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    records = [{"prompt": "copy : red green blue cat dog", "completion": "red green"},
               {"prompt": "copy : red", "completion": "red green blue cat dog bird one two"}]
    train = gf.write_jsonl(tmp_path / "long.jsonl", records)
    cfg = gf.generation_config(assets["llama"], {**assets["files"], "train_pc": train, "dev_pc": train})
    cfg.data.max_length = 6
    with pytest.warns(UserWarning, match="left out 1 of 2 example.*longer than data.max_length = 6"):
        split = objective_for(cfg).prepare_splits(tok)["train"]
    assert len(split) == 1
    ids = tok(records[0]["prompt"])["input_ids"]
    completion = tok(records[0]["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert split[0]["input_ids"] == ids[-3:] + completion and split[0]["prompt_length"] == 3


def test_a_missing_column_names_the_file_and_the_key_to_set(assets, tmp_path):
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    train = gf.write_jsonl(tmp_path / "q.jsonl", [{"question": "copy : red", "completion": "red"}])
    cfg = gf.generation_config(assets["llama"], {**assets["files"], "train_pc": train, "dev_pc": train})
    with pytest.raises(DataError, match=r"q.jsonl has no column 'prompt'.*'question'.*--data.input_column=COLUMN"):
        objective_for(cfg).prepare_splits(tok)
    cfg.data.input_column = "question"
    assert len(objective_for(cfg).prepare_splits(tok)["train"]) == 1
    cfg.data.limit_per_class = 4
    with pytest.raises(ConfigError, match="data.limit_per_class"):
        objective_for(cfg)


def test_generation_scores_against_hand_values():
    scores = generation_scores(["red cat", "blue dog"], ["red dog", "blue dog"], rouge=True)
    assert scores["exact_match"] == 0.5
    assert scores["rouge1"] == pytest.approx((0.5 + 1.0) / 2)  # 1 of 2 unigrams shared, then all
    assert scores["rouge2"] == pytest.approx((0.0 + 1.0) / 2)
    import sacrebleu

    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(["red cat", "blue dog"],
                                                                  [["red dog", "blue dog"]]).score / 100)
    assert generation_scores(["blue dog"], ["blue dog"], rouge=False) == {"exact_match": 1.0, "chrf": 1.0}


def test_metrics_score_only_the_first_generate_examples_and_perplexity_weights_tokens(assets):
    objective, tok, _ = causal(assets)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("red", "cat", "dog")}
    row = lambda *words: [ids[w] for w in words] + [NO_TOKEN] * (6 - len(words))  # noqa: E731
    outputs = {"loss": torch.tensor([1.0, 3.0, 5.0]), "nll_sum": torch.tensor([1.0, 9.0, 5.0], dtype=torch.float64),
               "target_tokens": torch.tensor([1, 3, 1]), "scored": torch.tensor([True, True, False]),
               "generated": torch.tensor([row("red", "cat"), row("dog"), row("red")]),
               "reference": torch.tensor([row("red", "cat"), row("cat"), row("red")])}
    metrics = objective.metrics(outputs)
    assert metrics["loss"] == 3.0 and metrics["neg_loss"] == -3.0
    assert metrics["perplexity"] == pytest.approx(math.exp(15 / 5))  # not exp of the mean of means
    assert metrics["exact_match"] == 0.5 and metrics["generated_examples"] == 2
    assert objective.select_metric == "chrf"
    assert causal(assets, generate_examples=0)[0].select_metric == "neg_loss"


@pytest.mark.parametrize("task,name", [("causal-lm", "llama"), ("seq2seq", "t5"), ("seq2seq", "bert2bert")])
def test_predict_generates_what_the_model_generates_for_each_example_alone(assets, tmp_path, task, name):
    """prediction_inputs reads a file without targets, in file order; predict's left-padded (causal) or
    right-padded (seq2seq) batches generate what the model generates for each input unpadded."""
    folder = assets[name]
    column = "prompt" if task == "causal-lm" else "source"
    inputs = [p for p, _ in gf.pairs(5, 7)]
    path = gf.write_jsonl(tmp_path / "inputs.jsonl", [{column: p} for p in inputs])
    kind = "pc" if task == "causal-lm" else "s2s"
    objective = objective_for(gf.generation_config(folder, assets["files"], task, kind))
    tok = AutoTokenizer.from_pretrained(folder)
    model = (AutoModelForCausalLM if task == "causal-lm" else AutoModelForSeq2SeqLM).from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking model: random weights large enough to vary the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    dataset = objective.prediction_inputs(path, read_table(path), tok)
    assert [tok.decode(r["input_ids"], skip_special_tokens=True) for r in dataset] == inputs
    predictions = objective.predict(model, objective.collator(tok)([dataset[i] for i in range(len(dataset))]))
    expected = []
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    for text in inputs:
        ids = torch.tensor([tok(text)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)[0, ids.shape[1] if task == "causal-lm" else 1:].tolist()
        out = out[:out.index(eos)] if eos in out else out
        expected.append(tok.decode(out, skip_special_tokens=True).strip())
    assert [p["generated"] for p in predictions] == expected
    assert len(set(expected)) > 1  # the comparison is not between constant outputs


def test_fsam_predict_reads_its_input_once_and_writes_each_rows_generation(assets, tmp_path, monkeypatch):
    import train_fixtures as fx
    from fsam_ds.trainer.run_config import config_to_dict

    cfg = gf.generation_config(assets["llama"], assets["files"], "causal-lm", "pc")
    folder = fx.as_export(assets["llama"], tmp_path / "best", config_to_dict(cfg))
    rows = [{"id": i, "prompt": p} for i, (p, _) in enumerate(gf.pairs(5, 7))]
    source = gf.write_jsonl(tmp_path / "inputs.jsonl", rows)
    written = fx.predict_reading_once(folder, source, tmp_path / "out.jsonl", monkeypatch)
    assert [{k: v for k, v in r.items() if k != "prediction"} for r in written] == rows  # in file order
    # the reference: the objective's generation for all rows in one batch, from the file as read here
    objective, tok = objective_for(cfg), AutoTokenizer.from_pretrained(folder)
    dataset = objective.prediction_inputs(source, read_table(source), tok)
    model = AutoModelForCausalLM.from_pretrained(folder)
    expected = objective.predict(model, objective.collator(tok)([dataset[i] for i in range(len(dataset))]))
    assert [r["prediction"] for r in written] == expected


@pytest.mark.slow
@pytest.mark.parametrize("task", ["causal-lm", "seq2seq"])
def test_zero3_greedy_generation_on_2_ranks_equals_the_single_process_model(assets, tmp_path, task):
    from dist_harness import run_distributed

    folder = assets["llama" if task == "causal-lm" else "t5"]
    ranks = run_distributed(gf.run_zero3_generation, 2, tmp_path, task, str(folder), assets["files"],
                            use_deepspeed=True)
    assert sorted(ranks[0]) == [0, 2, 4, 6] and sorted(ranks[1]) == [1, 3, 5]
    objective = objective_for(gf.generation_config(folder, assets["files"], task,
                                                   "pc" if task == "causal-lm" else "s2s"))
    tok = AutoTokenizer.from_pretrained(folder)
    dev = objective.prepare_splits(tok)["validation"]
    model = (AutoModelForCausalLM if task == "causal-lm" else AutoModelForSeq2SeqLM).from_pretrained(folder)
    single = objective.generate(model, objective.collator(tok)([dev[i] for i in range(7)])).tolist()
    assert {**ranks[0], **ranks[1]} == dict(enumerate(single))


def test_empty_prompts_and_completions_are_counted_and_completions_all_empty_are_refused(assets, tmp_path):
    tok = AutoTokenizer.from_pretrained(assets["llama"])
    records = [{"prompt": "copy : red", "completion": "red"}, {"prompt": "", "completion": "blue"},
               {"prompt": "copy : cat", "completion": ""}]
    train = gf.write_jsonl(tmp_path / "some.jsonl", records)
    cfg = gf.generation_config(assets["llama"], {**assets["files"], "train_pc": train, "dev_pc": train})
    objective = objective_for(cfg)
    with pytest.warns(UserWarning) as caught:
        split = objective.prepare_splits(tok)["train"]
    messages = " ".join(str(w.message) for w in caught)
    assert f"{train}: column 'prompt' is empty (or only whitespace) in 1 of 3 row(s) (row 2, counted" in messages
    assert f"{train}: column 'completion' is empty (or only whitespace) in 1 of 3 row(s) (row 3, count" in messages
    # kept: the empty completion's target is EOS alone, which the model learns to answer with (a finite loss)
    assert len(split) == 3 and split[2]["input_ids"][split[2]["prompt_length"]:] == [tok.eos_token_id]
    model = AutoModelForCausalLM.from_pretrained(assets["llama"])
    assert torch.isfinite(objective.per_example_loss(model, batch_of(objective, tok, split, 3))).all()

    nothing = gf.write_jsonl(tmp_path / "nothing.jsonl", [{"prompt": "copy : red", "completion": " "}] * 2)
    cfg = gf.generation_config(assets["llama"], {**assets["files"], "train_pc": nothing, "dev_pc": nothing})
    with pytest.raises(DataError, match=r"nothing.jsonl: column 'completion' is empty in every row \(2\).*"
                                        r"--data.output_column"):
        objective_for(cfg).prepare_splits(tok)


def test_a_prompt_of_no_tokens_starts_from_the_tokenizers_start_token(assets, tmp_path):
    """A tokenizer that adds no special tokens encodes an empty prompt as nothing: the prompt is then
    its BOS token (EOS when it has none), so the completion's first token has a position to be
    predicted from, and an empty prompt to predict on has an input to generate from."""
    from tokenizers import processors

    tok = AutoTokenizer.from_pretrained(assets["llama"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert tok("")["input_ids"] == []
    path = gf.write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "completion": "red"}])
    objective = objective_for(gf.generation_config(assets["llama"], assets["files"]))
    with pytest.warns(UserWarning, match="column 'prompt' is empty"):
        row = objective.prediction_inputs(path, read_table(path), tok)[0]
    assert row["input_ids"] == [tok.bos_token_id] and row["prompt_length"] == 1


@pytest.mark.parametrize("task,name,model_type,can", [("seq2seq", "llama", "llama", "--task=causal-lm"),
                                                      ("causal-lm", "t5", "t5", "--task=seq2seq")])
def test_a_model_without_the_tasks_head_is_refused_from_its_config(assets, task, name, model_type, can):
    """Checked from config.json before anything is built: one paragraph naming the model's type and
    architecture, the task, and the tasks it can do, not transformers' list of every model class."""
    from fsam_ds.trainer.model_loading import load_pretrained, open_pretrained

    cfg = gf.generation_config(assets[name], assets["files"], task, "s2s" if task == "seq2seq" else "pc")
    with pytest.raises(ConfigError) as err:  # where fsam-train checks the model, before claiming its folder
        open_pretrained(cfg, objective_for(cfg).model_class())
    message = str(err.value)
    architecture = "LlamaForCausalLM" if name == "llama" else "T5ForConditionalGeneration"
    assert f"model_type {model_type!r}" in message and architecture in message and f"--task={task}" in message
    assert can in message and "classification" in message and "\n" not in message and len(message) < 800
    head = AutoModelForSeq2SeqLM if task == "seq2seq" else AutoModelForCausalLM
    with pytest.raises(ConfigError, match=f"model_type {model_type!r}"):  # and where the model is loaded
        load_pretrained(head, str(assets[name]), torch.float32)
