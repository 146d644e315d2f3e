"""fsam-train on causal-lm and seq2seq end to end: one process for sam and fisher-sam (prompt/completion,
chat and source/target files), every SAM type in one process, and a 2-rank ZeRO-3 torchrun for each
task; metrics are read back from metrics.jsonl. The models are config-built 2-layer Llama and T5
models with a word-level tokenizer (`generation_fixtures`); every run is a subprocess under a hard timeout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import generation_fixtures as gf
import train_fixtures as fx
from dist_harness import free_port
from test_train_e2e import GLOO_EXIT_ABORT, _torchrun

TIMEOUT = 300
GENERATED = 7  # dev examples generated and scored: odd, so that 2 ranks hold different numbers


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("generation-e2e")
    return {"files": gf.write_generation_files(root / "data"), "causal-lm": gf.write_tiny_llama(root / "llama"),
            "seq2seq": gf.write_tiny_t5(root / "t5")}


def args_for(assets: dict, task: str, kind: str, out: Path, **extra) -> list[str]:
    files = assets["files"]
    args = {"task": task, "model": str(assets[task]), "data.train_file": str(files[f"train_{kind}"]),
            "data.dev_file": str(files[f"dev_{kind}"]), "output_dir": str(out), "data.micro_batch_size": 8,
            "data.eval_batch_size": 4, "data.max_length": 32, "optim.lr": 3e-3, "optim.epochs": 3,
            "optim.warmup_ratio": 0.1, "sam.sam_type": "fisher-sam", "sam.mask_interval": 3, "sam.keep_ratio": 0.2,
            "eval.generate_examples": GENERATED, "eval.max_new_tokens": 8, "log.wandb": "disabled",
            "log.progress": False, "log.log_every": 1, "seed": 3}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def assert_trained(out: Path, result, task: str, steps: int) -> list[dict]:
    """The run finished, its dev loss fell, and every evaluation scored GENERATED examples; returns them."""
    summary = fx.summary(out)
    assert summary is not None, f"no summary; exit {result.returncode}:\n{result.stdout[-4000:]}"
    assert result.returncode == 0 or GLOO_EXIT_ABORT in result.stdout, result.stdout[-4000:]
    metric = "chrf" if task == "causal-lm" else "rougeL"
    assert summary["steps"] == steps and summary["metric_name"] == metric
    evals = fx.events(out, "eval")
    assert summary["best_metric"] == max(e[metric] for e in evals)
    for e in evals:
        assert e["generated_examples"] == GENERATED
        assert 0 <= e["exact_match"] <= 1 and 0 <= e["chrf"] <= 1
        assert e["perplexity"] > 1 and e["neg_loss"] == -e["loss"]
    assert evals[-1]["loss"] < evals[0]["loss"]  # it learns
    return evals


@pytest.mark.slow
@pytest.mark.parametrize("task,kind,sam_type", [("causal-lm", "pc", "sam"), ("causal-lm", "chat", "fisher-sam"),
                                                ("seq2seq", "s2s", "sam"), ("seq2seq", "s2s", "fisher-sam")])
def test_single_process_run_trains_generates_and_exports(assets, tmp_path, task, kind, sam_type):
    out = tmp_path / "run"
    result = fx.run(fx.train_cmd(args_for(assets, task, kind, out, **{"sam.sam_type": sam_type})), TIMEOUT)
    evals = assert_trained(out, result, task, steps=18)  # 48 examples / 8 x 3 epochs
    if task == "seq2seq":
        assert {"rouge1", "rouge2", "rougeL"} <= set(evals[0])
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    model_class = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSeq2SeqLM
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["value"] == max(e[best["metric_name"]] for e in evals)
    assert AutoTokenizer.from_pretrained(out / "final").chat_template == gf.CHAT_TEMPLATE
    # the exported model's predictions on the dev file score what the last evaluation scored
    from fsam_ds.trainer.data.readers import read_table
    from fsam_ds.trainer.generation import generation_scores
    from fsam_ds.trainer.objectives import objective_for
    from fsam_ds.trainer.run_config import config_from_dict

    objective = objective_for(config_from_dict(json.loads((out / "config.json").read_text())))
    tok = AutoTokenizer.from_pretrained(out / "final")
    dev_file = assets["files"][f"dev_{kind}"]
    inputs = objective.prediction_inputs(dev_file, read_table(dev_file), tok)
    predictions = objective.predict(model_class.from_pretrained(out / "final"),
                                    objective.collator(tok)([inputs[i] for i in range(GENERATED)]))
    records = [json.loads(line) for line in dev_file.read_text().splitlines()][:GENERATED]
    answer = "completion" if task == "causal-lm" else "target"
    references = [r["messages"][-1]["content"] if kind == "chat" else r[answer] for r in records]
    scores = generation_scores([p["generated"] for p in predictions], references, rouge=task == "seq2seq")
    assert scores == pytest.approx({k: evals[-1][k] for k in scores}, abs=1e-9)


@pytest.mark.slow
def test_every_sam_type_and_the_baseline_train_a_causal_lm(assets, tmp_path):
    """Two steps of each type, one after the other in one process (one process group, as the ranks of
    the 2-rank ZeRO tests build several engines)."""
    from fsam_ds.sam.config import MSAM_TYPES
    from fsam_ds.trainer.run_config import TRAINER_SAM_TYPES

    runs = {t: tmp_path / t for t in TRAINER_SAM_TYPES}
    script = ("import sys, json\n"
              "from fsam_ds.trainer.loop import train\n"
              "from fsam_ds.trainer.run_config import load_config\n"
              "from fsam_ds.zero.distributed import init_distributed\n"
              "rank, world = init_distributed()\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    train(load_config(args), rank, world)\n")
    argvs = [args_for(assets, "causal-lm", "pc", out, **{"sam.sam_type": t, "optim.max_steps": 2,
                                                          "eval.generate_examples": 2, "sam.mask_interval": 1})
             for t, out in runs.items()]
    result = fx.run([fx.PYTHON, "-c", script, json.dumps(argvs)], TIMEOUT)
    assert result.returncode == 0, result.stdout[-4000:]
    for sam_type, out in runs.items():
        summary, train = fx.summary(out), fx.events(out, "train")
        assert summary["steps"] == 2 and summary["sam_type"] == sam_type, sam_type
        assert all(e["skipped_steps"] == 0 and e["loss"] > 0 for e in train), sam_type
        assert fx.events(out, "eval")[-1]["generated_examples"] == 2
        if sam_type != "none":  # msam perturbs from the second step on, once AdamW has a first moment
            perturbed = train[1] if sam_type in MSAM_TYPES else train[0]
            assert perturbed["perturbed_loss"] > 0 and perturbed["perturbation_norm"] > 0, sam_type


@pytest.mark.slow
@pytest.mark.parametrize("task,kind", [("causal-lm", "chat"), ("seq2seq", "s2s")])
def test_torchrun_two_ranks_zero3(assets, tmp_path, task, kind):
    out = tmp_path / "run"
    args = args_for(assets, task, kind, out, zero_stage=3, **{"data.micro_batch_size": 4, "optim.epochs": 2})
    result = fx.run(_torchrun(2, free_port(), args), TIMEOUT)
    assert_trained(out, result, task, steps=12)  # 48 examples / (2 ranks x 4) x 2 epochs
