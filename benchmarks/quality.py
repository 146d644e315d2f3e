"""`python -m benchmarks quality`: what the cheaper steps give in dev quality, and what each run costs.

    python -m benchmarks quality --output_dir runs/quality                 # every task, variant and seed
    python -m benchmarks quality --output_dir runs/quality --table-only    # the table from the finished runs
    python -m benchmarks quality --output_dir runs/quality --tasks polarity --seeds 42 1 2 3 4

The offline demos' runs (`fsam_ds.cli.demo`: MiniLM-L6 on sentence polarity, SmolLM2-135M on spelling
correction), at the demos' settings, with AdamW, fisher-sam and the cheaper variants of
`python -m benchmarks cheap` (`every:5`, `late:0.2`, LookSAM `every:5` + reuse, fisher-msam), all with the
demo's rho 0.02, keep_ratio 0.1 and mask_interval; only the seed and the variant differ between runs.
Each run is one `fsam-train` process in OUTPUT_DIR/<task>/<variant>/seed<N>/, with its console output in
seed<N>.log and its cost in seed<N>.json beside it: the CPU time (user + system) of the process and the
processes it waited for, as wait4 reports it for that process (`fsam_ds.cli.demo.run_measured`).
Every run uses one thread (`--threads`): with more, threads that wait at a barrier for a core another
process holds spin, and the CPU time would count the machine's load, not the run's work.

Resumable: a run whose folder holds a finished summary is not run again, so the table can be completed
over several sittings (an interrupted run starts again from scratch). Runs go seed by seed (every variant
of a seed before the next seed), polarity first, so that a table cut short holds whole seeds. After each
run the table so far is printed and written to OUTPUT_DIR/quality.md.

The table: per variant the mean ± sample standard deviation of the dev metric over the finished seeds
(polarity: the best of the two end-of-epoch accuracies, as the demo reports; spelling: exact match and
chrF after training), the share of sharpness-aware steps, the mean CPU time per run and its ratio to
AdamW's. A variant beats AdamW beyond the seed spread when its mean minus its standard deviation is above
AdamW's mean plus AdamW's; with fewer than two seeds on either side nothing is judged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from benchmarks.cheap import METHODS
from benchmarks.measure import fmt, ratio
from benchmarks.zero import schedule_of
from fsam_ds.cli.demo import before_and_after, best_accuracy, demo_args, run_measured
from fsam_ds.trainer.metrics_log import METRICS_FILE, read_summary
from fsam_ds.trainer.run_config import BASELINE_SAM_TYPE
from fsam_ds.zero.files import replace_file

TASKS = ("polarity", "spelling")
DEFAULT_SEEDS = {"polarity": [42, 1, 2], "spelling": [42]}  # 42 is the demos' seed; 1 and 2 the README's others
TASK_METRICS = {"polarity": ("accuracy",), "spelling": ("exact_match", "chrf")}
TASK_TITLES = {"polarity": "polarity: all-MiniLM-L6-v2, Pang & Lee, 800 dev sentences",
               "spelling": "spelling: SmolLM2-135M-Instruct, 48 dev sentences, greedy decoding after training"}
BASELINE = "adamw"
TABLE_FILE = "quality.md"
MODEL_FOLDERS = ("checkpoints", "best", "final")  # a finished run's weights; its metrics.jsonl is what is read


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", required=True, help="OUTPUT_DIR/<task>/<variant>/seed<N>/ per run")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--variants", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"seeds of every task (default: {DEFAULT_SEEDS})")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--keep_models", action="store_true",
                        help="keep each finished run's checkpoints and exported models (about 0.7 GB per "
                             "polarity run, 2 GB per spelling run); by default only its logs stay")
    parser.add_argument("--json", metavar="FILE", help="also write the summary as JSON")
    parser.add_argument("--table-only", "--table_only", dest="table_only", action="store_true",
                        help="run nothing: print the table of the runs finished so far")


# ====================================================================== one run


@dataclass(frozen=True)
class PlannedRun:
    task: str
    variant: str
    seed: int

    def folder(self, root: Path) -> Path:
        # "fisher-sam@every:5" -> "fisher-sam+every-5": no ':' in paths (PATH-like lists, other systems)
        return root / self.task / self.variant.replace("@", "+").replace(":", "-") / f"seed{self.seed}"

    def cost_file(self, root: Path) -> Path:
        return self.folder(root).with_suffix(".json")


def plan(tasks: Sequence[str], variants: Sequence[str], seeds: Sequence[int] | None) -> list[PlannedRun]:
    """Task by task in TASKS' order, seed by seed, every variant of a seed before the next seed."""
    return [PlannedRun(task, variant, seed) for task in TASKS if task in tasks
            for seed in (seeds or DEFAULT_SEEDS[task]) for variant in variants]


def train_arguments(run: PlannedRun, root: Path) -> list[str]:
    """fsam-train's arguments: the demo's, with the variant's SAM settings, the seed and the run's folder."""
    sam_type, _, variant = run.variant.partition("@")
    sam_type = BASELINE_SAM_TYPE if sam_type == BASELINE else sam_type
    extra = [f"--sam.{key}={value}" for key, value in schedule_of(variant).items()]
    # later arguments win, so these replace the demo's seed and folder
    extra += [f"--seed={run.seed}", f"--output_dir={run.folder(root)}"]
    return demo_args(root, sam_type, extra, run.task)


def dev_metrics(task: str, folder: Path) -> dict[str, float] | None:
    """The demo's dev numbers of a finished run, None if it has no summary (not finished, or failed)."""
    if task == "polarity":
        accuracy = best_accuracy(folder)
        return None if accuracy is None else {"accuracy": accuracy}
    result = before_and_after(folder)
    return None if result is None else {name: result[1][name] for name in TASK_METRICS[task]}


def execute(run: PlannedRun, root: Path, threads: int, keep_models: bool) -> dict[str, Any]:
    """Runs one fsam-train process to its end and writes its cost beside its folder."""
    folder, args = run.folder(root), train_arguments(run, root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "fsam_ds.train", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled")
    with open(folder.with_suffix(".log"), "w") as log:
        returncode, wall, usage = run_measured(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    cost = {"task": run.task, "variant": run.variant, "seed": run.seed, "returncode": returncode,
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux reports kilobytes
            "wall_s": round(wall, 2), "threads": threads, "command": command}
    replace_file(run.cost_file(root), json.dumps(cost, indent=1) + "\n")
    if not keep_models and finished(run, root):
        for name in MODEL_FOLDERS:
            shutil.rmtree(folder / name, ignore_errors=True)
    return cost


def finished(run: PlannedRun, root: Path) -> bool:
    return read_summary(run.folder(root) / METRICS_FILE) is not None


# ====================================================================== the table


def read_run(run: PlannedRun, root: Path) -> dict[str, Any] | None:
    """A finished run's dev metrics, CPU time and share of sharpness-aware steps; None if it is not finished.
    A run without its cost file (written after the process ends) still counts, with its CPU time unknown."""
    folder = run.folder(root)
    summary = read_summary(folder / METRICS_FILE)
    metrics = None if summary is None else dev_metrics(run.task, folder)
    if metrics is None:
        return None
    cost_file = run.cost_file(root)
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    steps, sam_steps = summary.get("steps"), summary.get("sam_steps")
    return {"metrics": metrics, "cpu_s": cost.get("cpu_s"),
            "sam_share": sam_steps / steps if steps and sam_steps is not None else None}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None below 1 and 2 values)."""
    return (statistics.fmean(values) if values else None,
            statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: Sequence[PlannedRun], root: Path) -> dict[str, Any]:
    """Per task and variant: seeds planned and finished, mean and std of each metric, mean CPU time."""
    out: dict[str, Any] = {}
    for run in runs:
        variants = out.setdefault(run.task, {})
        entry = variants.setdefault(run.variant, {"planned": 0, "done": 0, "seeds": [], "metrics": {}, "cpu_s": [],
                                                  "sam_share": []})
        entry["planned"] += 1
        entry["seeds"].append(run.seed)
        result = read_run(run, root)
        if result is None:
            continue
        entry["done"] += 1
        for name, value in result["metrics"].items():
            entry["metrics"].setdefault(name, []).append(value)
        for key in ("cpu_s", "sam_share"):
            if result[key] is not None:
                entry[key].append(result[key])
    for variants in out.values():
        for entry in variants.values():
            entry["metrics"] = {name: mean_std(values) for name, values in entry["metrics"].items()}
            entry["cpu_s"] = mean_std(entry["cpu_s"])[0]
            entry["sam_share"] = mean_std(entry["sam_share"])[0]
    return out


def beats_baseline(entry: dict, baseline: dict, metric: str) -> bool | None:
    """Whether a variant is above AdamW beyond the seed spread (mean - std > AdamW's mean + std);
    None when either side has fewer than two seeds."""
    mine, theirs = entry["metrics"].get(metric, (None, None)), baseline["metrics"].get(metric, (None, None))
    if None in (*mine, *theirs):
        return None
    return mine[0] - mine[1] > theirs[0] + theirs[1]


def _mean_pm_std(pair: tuple[float | None, float | None]) -> str:
    mean, std = pair
    return "n/a" if mean is None else f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")


def format_table(summary: dict[str, Any]) -> str:
    """Markdown: one table per task, a line saying whether it is partial, and the verdicts."""
    parts = []
    for task, variants in summary.items():
        metrics = TASK_METRICS[task]
        done, planned = (sum(e[k] for e in variants.values()) for k in ("done", "planned"))
        seeds = max((e["seeds"] for e in variants.values()), key=len)
        status = "complete" if done == planned else f"PARTIAL: {done} of {planned} runs done"
        baseline = variants.get(BASELINE)
        header = ["variant", "seeds done", "SAM share", *(f"{m} (mean ± std)" for m in metrics), "CPU s per run",
                  "CPU × AdamW"]
        rows = []
        for name, e in variants.items():
            cpu_ratio = ratio(e["cpu_s"], baseline["cpu_s"]) if baseline else None
            rows.append([name, f"{e['done']} of {e['planned']}", fmt(e["sam_share"]),
                         *(_mean_pm_std(e["metrics"].get(m, (None, None))) for m in metrics),
                         fmt(e["cpu_s"], ".0f"), fmt(cpu_ratio)])
        lines = [f"{TASK_TITLES[task]}; seeds {', '.join(map(str, seeds))}; {status}", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                 *("| " + " | ".join(row) + " |" for row in rows), ""]
        lines += verdicts(variants, metrics[0]) if baseline else [f"no {BASELINE} runs: nothing to compare with"]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def verdicts(variants: dict[str, Any], metric: str) -> list[str]:
    baseline = variants[BASELINE]
    judged = {name: beats_baseline(e, baseline, metric) for name, e in variants.items() if name != BASELINE}
    winners = [name for name, beats in judged.items() if beats]
    unjudged = [name for name, beats in judged.items() if beats is None]
    lines = []
    if winners:
        lines.append(f"above AdamW's {metric} beyond the seed spread: {', '.join(winners)}")
    elif len(unjudged) < len(judged):
        lines.append(f"no variant beats AdamW's {metric} beyond the seed spread"
                     + (" among those with two or more seeds" if unjudged else ""))
    if unjudged:
        lines.append(f"not judged (fewer than two seeds here or for AdamW): {', '.join(unjudged)}")
    return lines


# ====================================================================== the command


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    root, runs = Path(args.output_dir), plan(args.tasks, args.variants, args.seeds)
    if BASELINE not in args.variants:
        print(f"note: without {BASELINE} the CPU ratios and verdicts are left out", flush=True)
    if not args.table_only:
        for index, run in enumerate(runs, 1):
            where = f"[{index}/{len(runs)}] {run.task} {run.variant} seed {run.seed}"
            if finished(run, root):
                print(f"{where}: finished earlier, kept", flush=True)
                continue
            print(f"{where}: training in {run.folder(root)} ({time.strftime('%H:%M:%S')})", flush=True)
            cost = execute(run, root, args.threads, args.keep_models)
            state = "finished" if finished(run, root) else f"FAILED (exit {cost['returncode']}; see its .log)"
            print(f"{where}: {state}, {cost['cpu_s']:.0f} CPU s, {cost['wall_s']:.0f} s wall", flush=True)
            _write_table(root, runs)
    return {"output_dir": str(root), "summary": summarise(runs, root), "table": _write_table(root, runs)}


def _write_table(root: Path, runs: list[PlannedRun]) -> str:
    text = format_table(summarise(runs, root))
    root.mkdir(parents=True, exist_ok=True)
    replace_file(root / TABLE_FILE, text + "\n")
    return text


def format_quality_report(result: dict[str, Any]) -> str:
    return f"benchmarks quality: {result['output_dir']}\n\n{result['table']}"
