"""The scripts in examples/ run end to end on a CPU, offline, in their own process (as a user starts them)."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], capture_output=True, text=True,
                          env=env, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stdout


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def write_csv(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "label"])
        for _ in range(rows):
            good, bad = rng.randint(0, 2), rng.randint(0, 2)
            words = ["a", "film", "plot", "cast"] * 2 + ["good"] * good + ["bad"] * bad
            rng.shuffle(words)
            writer.writerow([" ".join(words), "positive" if good > bad else "negative"])


def test_run_glue_sam_trains_on_a_csv_and_resumes_bit_for_bit(tmp_path):
    """A local CSV with named labels, the tiny default model, fisher-sam at ZeRO-2: 4 steps in one run, and
    a second run resumed from the first one's checkpoint-2, end with the same weights."""
    write_csv(tmp_path / "train.csv", 48, seed=1)
    write_csv(tmp_path / "dev.csv", 16, seed=2)
    common = ["--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"),
              "--max_steps", "4", "--save_steps", "2", "--per_device_train_batch_size", "8",
              "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", "--sam_type", "fisher-sam",
              "--mask_interval", "3", "--report_to", "none", "--disable_tqdm", "true"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    out = run_example("run_glue_sam.py", "--output_dir", str(full), *common)
    assert "eval_accuracy" in out
    assert (full / "checkpoint-2" / "fsam_state_rank0.pt").is_file()
    run_example("run_glue_sam.py", "--output_dir", str(resumed), "--resume_from_checkpoint",
                str(full / "checkpoint-2"), *common)
    ours, reference = weights(resumed), weights(full)
    assert ours.keys() == reference.keys()
    assert all(torch.equal(ours[name], reference[name]) for name in ours)


def test_accelerate_loop_sam_trains_and_saves_the_sam_state(tmp_path):
    out = run_example("accelerate_loop_sam.py", "--output_dir", str(tmp_path), "--epochs", "1")
    assert "epoch 0: train loss" in out and "dev accuracy" in out
    assert (tmp_path / "checkpoint" / "fsam_state_rank0.pt").is_file()
    assert (tmp_path / "checkpoint" / "latest").is_file()


@pytest.mark.slow
def test_trl_sft_sam_fine_tunes_smollm2_on_the_spelling_chats(tmp_path):
    """SmolLM2-135M-Instruct, fisher-sam at ZeRO-2, 3 steps, offline: the training logs TRL's metrics, the
    evaluation runs, and every saved weight moved from the pretrained one."""
    pytest.importorskip("trl")
    from fsam_ds.cli.generation_assets import smollm2_path

    out = run_example("trl_sft_sam.py", "--output_dir", str(tmp_path), "--max_steps", "3",
                      "--per_device_train_batch_size", "2", "--max_length", "64", "--disable_tqdm", "true")
    assert "eval_loss" in out and "mean_token_accuracy" in out, out[-3000:]
    start, trained = weights(smollm2_path()), weights(tmp_path)
    common = sorted(trained.keys() & start.keys())  # the tied LM head is saved on one side only
    assert "model.embed_tokens.weight" in common and len(common) >= len(trained) - 1, sorted(trained)[:5]
    still = [name for name in common if torch.equal(trained[name], start[name])]
    assert still == [], still[:5]
