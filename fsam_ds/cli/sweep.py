"""Run a wandb grid sweep locally, one training run after another, and tabulate the results.

    python -m fsam_ds.cli.sweep launch/sweeps/sam_type_rho_seed.yaml --run-root runs/sweep --dry-run
    python -m fsam_ds.cli.sweep launch/sweeps/sam_type_rho_seed.yaml --run-root runs/sweep --launcher torchrun --nproc 2

Each combination of the sweep's `parameters` becomes `--name=value` arguments, formatted as the
wandb agent formats `${args}`, so a run here and a run under `wandb agent` see the same flags. No
wandb server is involved. Each run writes to RUN_ROOT/<run name>; the table at the end reads the
summary line of each run's metrics.jsonl (`fsam_ds.trainer.metrics_log.read_summary`).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from fsam_ds.cli.launch import (DEFAULT_PORT, TRAIN_MODULE, LaunchCommand, deepspeed_command, launcher_exe,
                                omp_threads_per_rank, torchrun_command)
from fsam_ds.sam.config import ConfigError, is_number
from fsam_ds.trainer.metrics_log import METRICS_FILE, MetricsFileError, read_summary

Runner = Callable[[LaunchCommand, Path], int]
"""Runs one command with its output going to the given log file; returns the exit status."""


@dataclass(frozen=True)
class Run:
    index: int
    name: str
    params: dict[str, Any]
    """Every parameter of this run (grid values and constants), by dotted name."""
    varying: dict[str, Any]
    """The parameters that take more than one value in the sweep."""


@dataclass
class Result:
    run: Run
    status: str
    """ok, failed (no summary line), no metric (a summary without a finite best_metric),
    skipped (finished before, with --resume) or dry-run."""
    metric_name: str | None = None
    best_metric: float | None = None
    returncode: int | None = None
    seconds: float | None = None


def load_sweep(path: str | Path) -> dict[str, Any]:
    try:
        sweep = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"sweep file {str(path)!r} cannot be read: {err}") from err
    if not isinstance(sweep, dict):
        raise ConfigError(f"sweep file {str(path)!r} must hold a mapping with 'method' and 'parameters'.")
    return sweep


def grid_values(sweep: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{dotted name: list of values}, in file order; raises ConfigError for what a grid cannot hold."""
    method = sweep.get("method", "grid")
    if method != "grid":
        raise ConfigError(f"sweep method is {method!r}; the local runner only expands 'grid'. Use "
                          "'wandb agent' for random or bayes searches, or list the values and set method: grid.")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError("sweep has no 'parameters' mapping; add e.g. parameters: {sam.rho: {values: [0.05]}}.")
    grid: dict[str, list[Any]] = {}
    for name, spec in parameters.items():
        where = f"sweep parameter {name!r}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where} is {spec!r}; write {{values: [...]}} or {{value: x}}.")
        if "parameters" in spec:
            raise ConfigError(f"{where} nests 'parameters'; use dotted names instead (e.g. '{name}.rho'), "
                              "which the trainer reads as --section.key=value.")
        if "values" in spec:
            values = spec["values"]
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where} has values {values!r}; it must be a non-empty list.")
            grid[name] = list(values)
        elif "value" in spec:
            grid[name] = [spec["value"]]
        else:
            raise ConfigError(f"{where} has {sorted(spec)} but a grid needs 'values' or 'value' "
                              "(distributions need a random or bayes search under wandb agent).")
    return grid


def expand_grid(sweep: Mapping[str, Any]) -> list[Run]:
    """Every combination, the last parameter varying fastest."""
    # the runner sets output_dir itself (RUN_ROOT/<run name>), whatever the sweep says
    grid = {k: v for k, v in grid_values(sweep).items() if k != "output_dir"}
    varying = [name for name, values in grid.items() if len(values) > 1]
    runs = []
    for index, combo in enumerate(itertools.product(*grid.values())):
        params = dict(zip(grid, combo))
        chosen = {name: params[name] for name in varying}
        runs.append(Run(index, run_name(index, chosen), params, chosen))
    return runs


def run_name(index: int, varying: Mapping[str, Any]) -> str:
    """'007-sam_type=fisher-sam-rho=0.05-seed=2': short, unique by index, readable in `ls`."""
    # each parameter by the last component of its dotted name, unless two parameters share it
    tails = [name.rsplit(".", 1)[-1] for name in varying]
    parts = [f"{index:03d}"] + [f"{tail if tails.count(tail) == 1 else name}={value}"
                                for (name, value), tail in zip(varying.items(), tails)]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def format_arg(name: str, value: Any) -> str:
    """As the wandb agent writes ${args}: --name=value with Python's str() of the value."""
    return f"--{name}={value}"


def train_args(run: Run, output_dir: Path, base_config: str | None = None) -> list[str]:
    params = {name: value for name, value in run.params.items() if name != "config"}
    config = base_config if base_config is not None else run.params.get("config")
    args = [f"--config={config}"] if config is not None else []
    args += [format_arg(name, value) for name, value in params.items()]
    return args + [format_arg("output_dir", output_dir)]


def make_command(args: list[str], *, launcher: str = "python", nproc: int = 1, python: str = sys.executable,
                 module: str = TRAIN_MODULE, master_port: int | None = None) -> LaunchCommand:
    if launcher == "python":
        return LaunchCommand([python, "-m", module, *args])
    threads = omp_threads_per_rank(nproc)
    if launcher == "torchrun":
        return torchrun_command(nproc, args, master_port=master_port, omp_threads=threads, module=module,
                                exe=launcher_exe("torchrun"))
    if launcher == "deepspeed":
        return deepspeed_command(nproc, args, master_port=master_port or DEFAULT_PORT, omp_threads=threads,
                                 module=module, exe=launcher_exe("deepspeed"))
    raise ConfigError(f"launcher is {launcher!r}; it must be python, torchrun or deepspeed.")


def run_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary line of a run's metrics.jsonl; None without one, or (with a warning) if the file is damaged."""
    try:
        return read_summary(run_dir / METRICS_FILE)
    except MetricsFileError as err:  # one damaged run must not stop the sweep
        warnings.warn(str(err), stacklevel=2)
        return None


def collect(run: Run, run_dir: Path, status_if_ok: str = "ok", returncode: int | None = None,
            seconds: float | None = None) -> Result:
    summary = run_summary(run_dir)
    if summary is None:
        return Result(run, "failed", returncode=returncode, seconds=seconds)
    best = summary.get("best_metric")
    ok = is_number(best) and math.isfinite(best)
    # A run that finished without a usable dev score (no evaluation, or a NaN) is not a crash.
    return Result(run, status_if_ok if ok else "no metric", summary.get("metric_name"),
                  float(best) if ok else None, returncode, seconds)


def subprocess_runner(command: LaunchCommand, log_path: Path) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        try:
            return subprocess.run(command.argv, env=command.full_env(), stdout=log,
                                  stderr=subprocess.STDOUT).returncode
        except OSError as err:  # e.g. the launcher is not installed: record it and go on with the sweep
            log.write(f"cannot start {command.argv[0]!r}: {err}\n")
            return 127


def run_sweep(runs: Sequence[Run], run_root: Path, *, command_for: Callable[[list[str]], LaunchCommand],
              base_config: str | None = None, runner: Runner = subprocess_runner, dry_run: bool = False,
              resume: bool = False, out: Callable[[str], None] = print) -> list[Result]:
    """Run each combination in turn (a failed run does not stop the sweep)."""
    results = []
    for number, run in enumerate(runs, start=1):
        run_dir = run_root / run.name
        args = train_args(run, run_dir, base_config)
        # a run killed before its summary continues from its newest checkpoint (or starts afresh)
        command = command_for(args + ["--resume=true"] if resume else args)
        if dry_run:
            out(command.shell())
            results.append(Result(run, "dry-run"))
            continue
        if resume and run_summary(run_dir) is not None:
            results.append(collect(run, run_dir, "skipped"))
            out(f"[{number}/{len(runs)}] {run.name}: finished before, skipped")
            continue
        log_path = run_root / "logs" / f"{run.name}.log"
        out(f"[{number}/{len(runs)}] {run.name}: {command.shell()}")
        start = time.monotonic()
        returncode = runner(command, log_path)
        result = collect(run, run_dir, returncode=returncode, seconds=time.monotonic() - start)
        results.append(result)
        out(f"[{number}/{len(runs)}] {run.name}: {result.status} (exit {returncode}, "
            f"{result.seconds:.0f} s, log {log_path})")
    return results


def format_table(results: Sequence[Result]) -> str:
    """One row per run: its varying parameters, the metric name and best value, and the status."""
    if not results:
        return "(no runs)"
    keys = list(results[0].run.varying)
    head = ["run", *keys, "metric", "best", "status"]
    rows = [[f"{r.run.index:03d}", *(str(r.run.varying[k]) for k in keys), r.metric_name or "-",
             _number(r.best_metric), r.status] for r in results]
    return _align([head, *rows])


def format_seed_table(results: Sequence[Result], seed_key: str = "seed") -> str | None:
    """Mean and spread of the best metric over seeds, per setting of the other parameters."""
    keys = list(results[0].run.varying) if results else []
    if seed_key not in keys:
        return None
    others = [k for k in keys if k != seed_key]
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault(tuple(str(r.run.varying[k]) for k in others), []).append(r)
    rows = [[*others, "metric", "mean", "std", "runs ok"]]
    for setting, members in groups.items():
        values = [r.best_metric for r in members if r.best_metric is not None]
        name = next((r.metric_name for r in members if r.metric_name), "-")
        mean = _number(statistics.fmean(values)) if values else "-"
        std = _number(statistics.stdev(values)) if len(values) > 1 else "-"
        rows.append([*setting, name, mean, std, f"{len(values)}/{len(members)}"])
    return _align(rows)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _align(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def write_results(results: Sequence[Result], path: Path) -> None:
    with open(path, "w") as f:
        for r in results:
            f.write(json.dumps({"name": r.run.name, "params": r.run.params, "status": r.status,
                                "metric_name": r.metric_name, "best_metric": r.best_metric,
                                "returncode": r.returncode, "seconds": r.seconds}, default=str) + "\n")


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsam_ds.cli.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="wandb sweep YAML (method: grid)")
    parser.add_argument("--run-root", default="runs/sweep", help="each run writes to RUN_ROOT/<run name>")
    parser.add_argument("--config", default=None, help="base trainer config (overrides the sweep's 'config')")
    parser.add_argument("--launcher", choices=("python", "torchrun", "deepspeed"), default="python")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run with torchrun/deepspeed")
    parser.add_argument("--master_port", type=int, default=None)
    parser.add_argument("--python", default=sys.executable, help="interpreter for --launcher python")
    parser.add_argument("--module", default=TRAIN_MODULE)
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--resume", action="store_true",
                        help="skip runs whose metrics.jsonl has a summary; the others continue from their newest "
                             "checkpoint")
    args = parser.parse_args(argv)
    run_root = Path(args.run_root)
    try:
        runs = expand_grid(load_sweep(args.sweep))
        command_for = functools.partial(make_command, launcher=args.launcher, nproc=args.nproc, python=args.python,
                                        module=args.module, master_port=args.master_port)
        command_for([])  # reject a bad launcher before the first run
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(runs)} runs -> {run_root}")
    results = run_sweep(runs, run_root, command_for=command_for, base_config=args.config, runner=runner,
                        dry_run=args.dry_run, resume=args.resume)
    if args.dry_run:
        return 0
    print("\n" + format_table(results))
    seeds = format_seed_table(results)
    if seeds:
        print("\nover seeds:\n" + seeds)
    run_root.mkdir(parents=True, exist_ok=True)
    write_results(results, run_root / "results.jsonl")
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
