"""`python -m benchmarks quality`'s table, from run folders written here by hand (no training runs).

Every expected number is computed in the test from the values it wrote, with numpy, not with the
command's own helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality
from benchmarks.__main__ import main

SEEDS = [42, 1, 2]
# variant: (accuracy per seed, CPU seconds per seed, sharpness-aware steps of 200); None = no summary
POLARITY = {
    "adamw": ([0.80, 0.81, 0.82], [100.0, 110.0, 120.0], 0),
    "fisher-sam": ([0.83, 0.84, 0.85], [200.0, 220.0, 240.0], 200),
    "fisher-sam@every:5": ([0.79, None, 0.83], [130.0, 999.0, 134.0], 40),
}


def write_run(root: Path, task: str, variant: str, seed: int, dev: dict | None, cpu_s: float,
              sam_steps: int, before: dict | None = None) -> None:
    """A run folder as fsam-train and the command leave it; dev=None: killed before its summary."""
    run = quality.PlannedRun(task, variant, seed)
    folder = run.folder(root)
    folder.mkdir(parents=True)
    events = [{"event": "start", "step": 0}]
    if before is not None:
        events.append({"event": "eval", "step": 0, **before})
    if dev is not None:
        events.append({"event": "eval", "step": 200, **dev})
        events.append({"event": "summary", "step": 200, "steps": 200, "sam_steps": sam_steps,
                       "best_metric": dev.get("accuracy", dev.get("chrf")), "metric_name": "accuracy"})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    run.cost_file(root).write_text(json.dumps({"cpu_s": cpu_s}))


@pytest.fixture
def polarity_root(tmp_path):
    for variant, (accuracies, cpus, sam_steps) in POLARITY.items():
        for seed, accuracy, cpu in zip(SEEDS, accuracies, cpus):
            write_run(tmp_path, "polarity", variant, seed, None if accuracy is None else {"accuracy": accuracy},
                      cpu, sam_steps)
    return tmp_path


def test_means_stds_and_cpu_ratios_of_the_finished_runs(polarity_root):
    runs = quality.plan(["polarity"], list(POLARITY), SEEDS)
    summary = quality.summarise(runs, polarity_root)["polarity"]
    adamw_cpu = np.mean(POLARITY["adamw"][1])
    for variant, (accuracies, cpus, sam_steps) in POLARITY.items():
        done = [i for i, a in enumerate(accuracies) if a is not None]
        entry = summary[variant]
        assert (entry["done"], entry["planned"]) == (len(done), 3)
        mean, std = entry["metrics"]["accuracy"]
        assert mean == pytest.approx(np.mean([accuracies[i] for i in done]))
        assert std == pytest.approx(np.std([accuracies[i] for i in done], ddof=1))
        # the unfinished run's cost (999 s) is not counted: missing, not a zero and not a number
        assert entry["cpu_s"] == pytest.approx(np.mean([cpus[i] for i in done]))
        assert entry["sam_share"] == pytest.approx(sam_steps / 200)
    table = quality.format_table({"polarity": summary})
    every5 = np.mean([0.79, 0.83]), np.std([0.79, 0.83], ddof=1)
    assert f"| fisher-sam@every:5 | 2 of 3 | 0.20 | {every5[0]:.4f} ± {every5[1]:.4f} | 132 | " \
           f"{132 / adamw_cpu:.2f} |" in table
    assert f"| fisher-sam | 3 of 3 | 1.00 | 0.8400 ± 0.0100 | 220 | {220 / adamw_cpu:.2f} |" in table
    assert "seeds 42, 1, 2; PARTIAL: 8 of 9 runs done" in table
    # fisher-sam: 0.84 - 0.01 > 0.81 + 0.01; every:5 (0.81 ± 0.028) overlaps AdamW's spread
    assert "above AdamW's accuracy beyond the seed spread: fisher-sam" in table


def test_a_variant_within_the_spread_is_not_a_win_and_one_seed_is_not_judged(tmp_path):
    for seed, accuracy in zip(SEEDS, [0.80, 0.81, 0.82]):
        write_run(tmp_path, "polarity", "adamw", seed, {"accuracy": accuracy}, 100.0, 0)
    for seed, accuracy in zip(SEEDS, [0.81, 0.83, 0.82]):  # mean 0.82 - std 0.01 = 0.81: not above 0.82
        write_run(tmp_path, "polarity", "fisher-sam", seed, {"accuracy": accuracy}, 200.0, 200)
    write_run(tmp_path, "polarity", "fisher-msam", 42, {"accuracy": 0.90}, 110.0, 200)
    runs = quality.plan(["polarity"], ["adamw", "fisher-sam", "fisher-msam"], SEEDS)
    table = quality.format_table(quality.summarise(runs, tmp_path))
    assert "no variant beats AdamW's accuracy beyond the seed spread among those with two or more seeds" in table
    assert "not judged (fewer than two seeds here or for AdamW): fisher-msam" in table
    assert "| fisher-msam | 1 of 3 | 1.00 | 0.9000 | 110 | 1.10 |" in table


def test_spelling_reads_exact_match_and_chrf_after_training(tmp_path):
    before = {"exact_match": 0.0, "chrf": 0.70}
    write_run(tmp_path, "spelling", "adamw", 42, {"exact_match": 0.4375, "chrf": 0.9296}, 160.0, 0, before)
    write_run(tmp_path, "spelling", "fisher-sam", 42, {"exact_match": 0.4583, "chrf": 0.9455}, 280.0, 200, before)
    runs = quality.plan(["spelling"], ["adamw", "fisher-sam"], None)
    assert [r.seed for r in runs] == [42, 42]
    table = quality.format_table(quality.summarise(runs, tmp_path))
    assert "| fisher-sam | 1 of 1 | 1.00 | 0.4583 | 0.9455 | 280 | 1.75 |" in table
    assert "seeds 42; complete" in table and "PARTIAL" not in table


def test_runs_go_seed_by_seed_polarity_first():
    runs = quality.plan(["spelling", "polarity"], ["adamw", "fisher-msam"], None)
    assert [(r.task, r.seed, r.variant) for r in runs] == [
        ("polarity", 42, "adamw"), ("polarity", 42, "fisher-msam"), ("polarity", 1, "adamw"),
        ("polarity", 1, "fisher-msam"), ("polarity", 2, "adamw"), ("polarity", 2, "fisher-msam"),
        ("spelling", 42, "adamw"), ("spelling", 42, "fisher-msam")]


def test_table_only_trains_nothing_and_prints_the_partial_table(polarity_root, capsys, monkeypatch):
    monkeypatch.setattr(quality, "execute", lambda *a: pytest.fail("--table-only must not train"))
    assert main(["quality", "--output_dir", str(polarity_root), "--tasks", "polarity", "--table-only",
                 "--variants", *POLARITY]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL: 8 of 9 runs done" in out
    assert (polarity_root / quality.TABLE_FILE).read_text().strip() in out


def test_finished_runs_are_kept_and_the_others_run(polarity_root, monkeypatch):
    ran = []
    monkeypatch.setattr(quality, "execute", lambda run, *a: ran.append(run) or {"returncode": 1, "cpu_s": 0,
                                                                                  "wall_s": 0})
    main(["quality", "--output_dir", str(polarity_root), "--tasks", "polarity", "--variants", *POLARITY])
    assert ran == [quality.PlannedRun("polarity", "fisher-sam@every:5", 1)]
