"""fsam-train end to end: one process, torchrun, the deepspeed launcher, two "nodes" on localhost,
kill-and-resume, and the one-paragraph errors.

Every run is a subprocess under a hard timeout (its whole process group is killed after it). A run
counts as good when its metrics.jsonl ends with a summary line, not by exit code alone, because gloo
may abort at exit after a good run. The model is a config-built 2-layer, hidden-32 BERT and the data
64 + 32 generated sentences, both written by the tests.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

import train_fixtures as fx
from dist_harness import free_port
from fsam_ds.zero.distributed import shm_buffer_names
from fsam_ds.trainer.evaluate import layer_of
from fsam_ds.trainer.run_config import config_from_dict

TIMEOUT = 300
GLOO_EXIT_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    model = fx.write_tiny_model(root / "model")
    train, dev = fx.write_sst2_files(root / "sst2")
    stsb_train, stsb_dev = fx.write_stsb_files(root / "stsb")
    own_train = fx.write_table(root / "own" / "train.csv", fx.review_rows(64, seed=0))
    own_dev = fx.write_table(root / "own" / "dev.csv", fx.review_rows(32, seed=1))
    return {"model": model, "train": train, "dev": dev, "stsb_train": stsb_train, "stsb_dev": stsb_dev,
            "own_train": own_train, "own_dev": own_dev}


def args_for(assets: dict[str, Path], out: Path, **extra) -> list[str]:
    return fx.base_args(assets["model"], assets["train"], assets["dev"], out, **extra)


def assert_finished(out: Path, result: subprocess.CompletedProcess, steps: int) -> dict:
    """The run wrote its summary; returns it."""
    summary = fx.summary(out)
    assert summary is not None, f"no summary in {out / 'metrics.jsonl'}; exit {result.returncode}:\n{result.stdout[-4000:]}"
    # os._exit after destroy_process_group avoids gloo's exit abort; tolerate it if it still happens
    assert result.returncode == 0 or GLOO_EXIT_ABORT in result.stdout, result.stdout[-4000:]
    assert summary["steps"] == steps
    assert summary["metric_name"] == "accuracy"
    assert 0.0 <= summary["best_metric"] <= 1.0
    evals = fx.events(out, "eval")
    assert evals and summary["best_metric"] == max(e["accuracy"] for e in evals)
    return summary


# ------------------------------------------------------------------------------ single process

def test_eval_at_start_scores_the_loaded_model_before_the_first_step(assets, tmp_path):
    """eval.at_start logs step 0 with the pretrained model's own dev loss, computed here in plain
    transformers; a step-0 eval taken after the first update would differ."""
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "run"
    result = fx.run(fx.train_cmd(args_for(assets, out, **{"eval.at_start": "true", "optim.max_steps": 2,
                                                          "optim.lr": 5e-2})), TIMEOUT)
    assert fx.summary(out) is not None, result.stdout[-4000:]
    evals = fx.events(out, "eval")
    assert [e["step"] for e in evals] == [0, 2]
    model = AutoModelForSequenceClassification.from_pretrained(assets["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    with open(assets["dev"], newline="") as f:
        rows = list(csv.DictReader(f))
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(
            model(**tokenizer(r["sentence"], truncation=True, max_length=32, return_tensors="pt")).logits,
            torch.tensor([int(r["label"])])) for r in rows]
    expected = float(torch.stack(losses).mean())
    assert evals[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert evals[1]["loss"] != pytest.approx(expected, rel=1e-3)  # lr 5e-2 moves the model



def test_single_process_run_logs_trains_and_saves(assets, tmp_path):
    out = tmp_path / "run"
    result = fx.run(fx.train_cmd(args_for(assets, out, **{"optim.lr": 5e-3, "optim.epochs": 6})), TIMEOUT)
    summary = assert_finished(out, result, steps=48)
    assert summary["best_metric"] > 0.6  # it learns the sentiment words (0.94 here)

    train = fx.events(out, "train")
    assert [e["step"] for e in train] == list(range(1, 49))
    for key in ("loss", "perturbed_loss", "perturbation_norm", "grad_norm", "rho", "mask_density", "mask_rebuilt",
                "lr", "skipped_steps", "loss_scale", "examples_per_s"):
        assert key in train[0], key
    assert train[0]["lr"] == pytest.approx(5e-3 / 4)  # warmup: int(0.1 * 48) = 4 steps
    masks = fx.events(out, "mask")
    assert [m["step"] for m in masks] == list(range(1, 49, 3))  # mask_interval 3
    assert {"layer.0", "layer.1", "classifier"} <= set(masks[0]["density"])
    config = json.loads((out / "config.json").read_text())  # the run's configuration as given, in the folder
    assert config["sam"]["sam_type"] == "fisher-sam" and config["optim"]["lr"] == 5e-3
    assert config_from_dict(config).output_dir == str(out)

    state = out / "checkpoints" / "step48" / "trainer_state.json"
    assert state.is_file()  # checkpoint_every 0: one at each evaluation, the 2 newest kept
    assert sorted(p.name for p in (out / "checkpoints").glob("step*")) == ["step40", "step48"]
    from transformers import AutoModelForSequenceClassification

    best = AutoModelForSequenceClassification.from_pretrained(out / "best")
    assert best.config.id2label == {0: "negative", 1: "positive"}
    final = fx.final_weights(out)
    assert torch.equal(dict(AutoModelForSequenceClassification.from_pretrained(out / "final").named_parameters())[
        "classifier.weight"].detach(), final["classifier.weight"])


def test_adamw_baseline_on_a_regression_pair_task(assets, tmp_path):
    """sam_type none runs DeepSpeed's own step; STS-B gets a 1-output regression head."""
    out = tmp_path / "run"
    cmd = fx.train_cmd(fx.base_args(assets["model"], assets["stsb_train"], assets["stsb_dev"], out, task="stsb",
                                    **{"sam.sam_type": "none"}))
    result = fx.run(cmd, TIMEOUT)
    summary = fx.summary(out)
    assert summary is not None, result.stdout[-4000:]
    assert summary["metric_name"] == "combined" and summary["steps"] == 12
    assert {"pearson", "spearman", "combined", "loss"} <= set(summary["best_metrics"])
    train = fx.events(out, "train")
    assert "perturbed_loss" not in train[0] and train[0]["grad_norm"] > 0
    assert fx.final_weights(out)["classifier.weight"].shape == (1, 32)


# ------------------------------------------------------------------------------ multi-process

def _torchrun(nproc: int, port: int, args: list[str], nnodes: int = 1, node_rank: int = 0) -> list[str]:
    return [str(fx.BIN / "torchrun"), "--nnodes", str(nnodes), "--node_rank", str(node_rank), "--nproc_per_node",
            str(nproc), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "fsam_ds.train", *args]


def test_torchrun_two_ranks_zero2_bf16_on_own_data(assets, tmp_path):
    """Own data (--task=classification on a CSV with its own column names and string labels) on 2 ranks:
    every rank reads the label set from the training file, and the run records the one it trained on."""
    out = tmp_path / "run"
    args = fx.base_args(assets["model"], assets["own_train"], assets["own_dev"], out, task="classification",
                        zero_stage=2, precision="bf16", ds_config="ds_configs/zero2_bf16.json",
                        **{"data.text_columns": "review", "data.label_column": "liked"})
    result = fx.run(_torchrun(2, free_port(), args), TIMEOUT)
    assert_finished(out, result, steps=8)  # 64 examples / (2 ranks x 8) x 2 epochs
    assert fx.events(out, "train")[0]["examples_per_s"] > 0
    assert fx.final_weights(out)["classifier.weight"].dtype == torch.float32  # exported from the fp32 master
    assert json.loads((out / "config.json").read_text())["data"]["labels"] == ["no", "yes"]
    assert json.loads((out / "final" / "config.json").read_text())["id2label"] == {"0": "no", "1": "yes"}


@pytest.mark.slow
def test_deepspeed_launcher_two_ranks_zero3_bf16_fisher_esam(assets, tmp_path):
    out = tmp_path / "run"
    args = args_for(assets, out, zero_stage=3, precision="bf16", **{"sam.sam_type": "fisher-esam"})
    port = free_port()
    cmd = [str(fx.BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module",
           "fsam_ds.train", *args]
    result = fx.run(cmd, TIMEOUT)
    assert_finished(out, result, steps=8)
    assert "perturbed_tensors" in fx.events(out, "train")[0]
    assert not shm_buffer_names(port)  # the launcher sets LOCAL_SIZE: DeepSpeed made one segment per rank


@pytest.mark.slow
def test_two_nodes_on_localhost_zero1_gsam_with_accumulation(assets, tmp_path):
    out = tmp_path / "run"
    args = args_for(assets, out, zero_stage=1, **{"sam.sam_type": "fisher-gsam", "data.micro_batch_size": 4,
                                                   "data.grad_accum": 2})
    port = free_port()
    procs = [subprocess.Popen(_torchrun(1, port, args, nnodes=2, node_rank=r), cwd=fx.REPO, env=fx.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for r in (0, 1)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            outputs.append("[timed out]")
    result = subprocess.CompletedProcess([], max(abs(p.returncode or 0) for p in procs), "\n".join(outputs))
    assert_finished(out, result, steps=8)


# ------------------------------------------------------------------------------ resume

RESUME = {"checkpoint_every": 2, "eval.every_steps": 3, "data.micro_batch_size": 4, "data.grad_accum": 2}


def _kill_and_resume(assets: dict[str, Path], tmp_path: Path, launch, kill_at: int, **extra) -> tuple[Path, Path]:
    """An uninterrupted run, and a run killed (SIGKILL) before step kill_at + 1 and resumed."""
    settings = {**RESUME, **extra}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = fx.run(launch(args_for(assets, straight, **settings)), TIMEOUT)
    assert fx.summary(straight) is not None, result.stdout[-4000:]

    killed = fx.run(launch(args_for(assets, resumed, **settings), killer=True), TIMEOUT,
                    FSAM_TEST_KILL_AT=str(kill_at))
    assert fx.summary(resumed) is None, killed.stdout[-4000:]
    steps = sorted(p.name for p in (resumed / "checkpoints").glob("step*/trainer_state.json"))
    assert steps, killed.stdout[-4000:]

    result = fx.run(launch(args_for(assets, resumed, **settings) + ["--resume=true"]), TIMEOUT)
    assert fx.summary(resumed) is not None, result.stdout[-4000:]
    assert "resumed from" in result.stdout
    return straight, resumed


def _single(args: list[str], killer: bool = False) -> list[str]:
    return fx.killed_train_cmd(args) if killer else fx.train_cmd(args)


def test_kill_and_resume_gives_the_uninterrupted_parameters(assets, tmp_path):
    """fp32, one process: bitwise equal final weights, and the same log. Killed before step 12 it
    resumes from step 10, mid-epoch (8 steps an epoch), after evaluations and a mask rebuild at step
    10 that steps 11-12 must reuse; dropout is on, so the RNG state matters too."""
    straight, resumed = _kill_and_resume(assets, tmp_path, _single, kill_at=11)
    a, b = fx.final_weights(straight), fx.final_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def log(out: Path, kind: str) -> list[tuple]:
        return [tuple(e.get(k) for k in ("step", "loss", "accuracy", "density")) for e in fx.events(out, kind)]

    for kind in ("train", "eval", "mask"):  # the killed run's steps 11 and 12 were dropped from the log
        assert log(straight, kind) == log(resumed, kind), kind
    assert fx.summary(straight)["best_metric"] == fx.summary(resumed)["best_metric"]


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [(2, "fp32"), (3, "bf16")])
def test_kill_and_resume_two_ranks(assets, tmp_path, stage, precision):
    def launch(args: list[str], killer: bool = False) -> list[str]:
        head = [str(fx.BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
        return head + (["--no-python", fx.PYTHON, "-c", fx.KILLER] if killer else ["-m", "fsam_ds.train"]) + args

    straight, resumed = _kill_and_resume(assets, tmp_path, launch, kill_at=3, zero_stage=stage, precision=precision)
    a, b = fx.final_weights(straight), fx.final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ errors

def _error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout[-4000:]
    assert "Traceback" not in result.stdout, result.stdout[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("fsam-train: error:")]
    assert len(lines) == 1, result.stdout[-4000:]
    return lines[0]


def test_ds_config_that_contradicts_the_arguments_is_one_paragraph(assets, tmp_path):
    args = args_for(assets, tmp_path / "run", zero_stage=2, precision="fp32", ds_config="ds_configs/zero2_bf16.json")
    message = _error(fx.run(fx.train_cmd(args), TIMEOUT))
    assert "bf16.enabled is true but precision is 'fp32'" in message
    assert "--precision=bf16" in message  # says how to fix it


def test_wrong_config_key_lists_close_matches(assets, tmp_path):
    message = _error(fx.run(fx.train_cmd(args_for(assets, tmp_path / "run") + ["--sam.rhoo=0.1"]), TIMEOUT))
    assert "Unknown config key 'sam.rhoo'" in message and "sam.rho" in message


def test_missing_model_folder_and_too_little_data(assets, tmp_path):
    args = args_for(assets, tmp_path / "run") + ["--model=./no/such/model"]  # the later value wins
    message = _error(fx.run(fx.train_cmd(args), TIMEOUT))
    assert "'./no/such/model' looks like a local folder but does not exist" in message
    message = _error(fx.run(fx.train_cmd(args_for(assets, tmp_path / "run", **{"data.grad_accum": 16})), TIMEOUT))
    assert "fewer than data.grad_accum = 16" in message


# ------------------------------------------------------------------------------ pieces

def test_layer_names_for_the_mask_log():
    assert layer_of("roberta.encoder.layer.11.attention.self.query.weight", "roberta") == "layer.11"
    assert layer_of("bert.embeddings.word_embeddings.weight", "bert") == "embeddings"
    assert layer_of("classifier.dense.weight", "roberta") == "classifier"
