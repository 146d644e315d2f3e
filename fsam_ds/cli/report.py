"""fsam-report: plots and a comparison table from the metrics.jsonl of one or more runs.

    fsam-report runs/sst2-sam-s42 runs/sst2-fisher-sam-s42 --out report/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from fsam_ds.sam.config import is_number  # noqa: E402
from fsam_ds.trainer.metrics_log import METRICS_FILE, MetricsFileError, read_events  # noqa: E402

__all__ = ["ReportError", "RunData", "Report", "load_run", "make_report", "format_table", "main"]

Series = tuple[list[int], list[float]]


class ReportError(ValueError):
    """A run directory cannot be reported on; the message names it and says why."""


@dataclass
class RunData:
    path: Path
    sam_type: str
    train: Series
    eval: Series
    metric_name: str | None
    mask: dict[str, float] | None
    best: float | None
    best_step: int | None

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.sam_type})"


@dataclass
class Report:
    runs: list[RunData]
    files: dict[str, Path]
    # plot name -> run label -> what was drawn (steps/values, or layer names/densities)
    series: dict[str, dict[str, Any]]
    table: str


def _number(value: Any) -> float | None:
    """A finite number, else None (metrics_log reads non-finite values back as float nan/inf)."""
    if not is_number(value):
        return None
    return float(value) if math.isfinite(value) else None


def _by_step(events: list[dict[str, Any]], key: str) -> Series:
    """Sorted (steps, values); on a resumed run the later line for a step wins."""
    points: dict[int, float] = {}
    for event in events:
        value = _number(event.get(key))
        if value is not None and isinstance(event.get("step"), int):
            points[event["step"]] = value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def load_run(run_dir: str | Path) -> RunData:
    """Parse one run directory written by the trainer's RunLogger."""
    path = Path(run_dir)
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise ReportError(f"{path} has no {METRICS_FILE}; give the output_dir of a training run "
                          f"(the folder that holds {METRICS_FILE} and config.json).")
    try:
        events = read_events(metrics)
    except MetricsFileError as err:
        raise ReportError(str(err)) from None
    config_file = path / "config.json"
    if not config_file.is_file():
        warnings.warn(f"{path} has no config.json; its SAM type is shown as '?'.", stacklevel=2)
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    sam_type = str(config.get("sam", {}).get("sam_type", "?"))

    kinds = {kind: [e for e in events if e.get("event") == kind] for kind in ("train", "eval", "mask", "summary")}
    # The model-selection metric the trainer named on its eval and summary lines (the newest wins).
    metric_name = next((e["metric_name"] for e in reversed(events)
                        if e.get("event") in ("eval", "summary") and isinstance(e.get("metric_name"), str)), None)
    dev = _by_step(kinds["eval"], metric_name) if metric_name else ([], [])

    best, best_step = None, None
    if kinds["summary"]:  # the trainer's own choice
        best, best_step = _number(kinds["summary"][-1].get("best_metric")), kinds["summary"][-1].get("best_step")
    elif dev[1]:  # a run that never finished: the best of its dev curve so far (the earliest on ties)
        best, best_step = max(zip(dev[1], dev[0]), key=lambda point: point[0])

    masks = [e for e in kinds["mask"] if isinstance(e.get("density"), dict)]
    mask = {str(k): float(v) for k, v in masks[-1]["density"].items()} if masks else None
    return RunData(path=path, sam_type=sam_type, train=_by_step(kinds["train"], "loss"), eval=dev,
                   metric_name=metric_name, mask=mask, best=best, best_step=best_step)


def _line_plot(runs: list[RunData], attr: str, ylabel: str, title: str, out: Path) -> dict[str, Series]:
    drawn: dict[str, Series] = {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps, values = getattr(run, attr)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=run.label)
            drawn[run.label] = (steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return drawn


def _mask_plot(runs: list[RunData], out: Path) -> dict[str, tuple[list[str], list[float]]]:
    drawn = {run.label: (list(run.mask), list(run.mask.values())) for run in runs if run.mask}
    if not drawn:
        return drawn
    rows = max(len(names) for names, _ in drawn.values())
    # Densities sit near keep_ratio (0.1 by default); a common axis up to the largest keeps runs comparable.
    top = min(1.0, 1.15 * max(max(values) for _, values in drawn.values())) or 1.0
    # Horizontal bars: parameter names are long, and a model has dozens of tensors.
    fig, axes = plt.subplots(1, len(drawn), figsize=(6 * len(drawn), max(3.0, 0.22 * rows + 1.5)), squeeze=False)
    for ax, (label, (names, values)) in zip(axes[0], drawn.items()):
        ax.barh(range(len(names)), values, color="tab:blue")
        ax.set_yticks(range(len(names)), names, fontsize=6)
        ax.invert_yaxis()  # model order, top to bottom
        ax.set_xlim(0, top)
        ax.set_xlabel("fraction of entries perturbed")
        ax.set_title(f"Fisher mask density\n{label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return drawn


def format_table(runs: list[RunData]) -> str:
    header = ("run", "sam_type", "metric", "best", "at step", "last train loss", "steps")
    rows = [header]
    for run in runs:
        rows.append((
            run.path.name, run.sam_type, run.metric_name or "-",
            f"{run.best:.4f}" if run.best is not None else "-",
            str(run.best_step) if run.best_step is not None else "-",
            f"{run.train[1][-1]:.4f}" if run.train[1] else "-",
            str(run.train[0][-1]) if run.train[0] else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def make_report(run_dirs: list[str | Path], out_dir: str | Path) -> Report:
    """Write train_loss.png, dev_metric.png and (if any run logged a mask) mask_density.png."""
    if not run_dirs:
        raise ReportError("no run directories given")
    runs = [load_run(d) for d in run_dirs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"train_loss": out / "train_loss.png", "dev_metric": out / "dev_metric.png"}
    names = sorted({run.metric_name for run in runs if run.metric_name})
    series: dict[str, dict[str, Any]] = {
        "train_loss": _line_plot(runs, "train", "train loss", "Training loss", files["train_loss"]),
        "dev_metric": _line_plot(runs, "eval", " / ".join(names) or "dev metric", "Dev metric",
                                 files["dev_metric"]),
    }
    mask_file = out / "mask_density.png"
    series["mask_density"] = _mask_plot(runs, mask_file)
    if series["mask_density"]:
        files["mask_density"] = mask_file
    return Report(runs=runs, files=files, series=series, table=format_table(runs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fsam-report", description=__doc__.strip().splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output_dir of a training run")
    parser.add_argument("--out", default="report", help="folder for the PNG files (default: ./report)")
    args = parser.parse_args(argv)
    try:
        report = make_report(args.run_dirs, args.out)
    except ReportError as err:
        print(f"fsam-report: error: {err}", file=sys.stderr)
        return 2
    print(report.table)
    for path in report.files.values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
