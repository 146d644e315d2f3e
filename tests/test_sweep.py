"""Local grid sweeps: expansion, the per-run command, results from metrics.jsonl, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from fsam_ds.cli import sweep as sw
from fsam_ds.cli.launch import LaunchCommand
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.metrics_log import encode_event

ROOT = Path(__file__).resolve().parents[1]
SWEEP = {
    "method": "grid",
    "parameters": {
        "config": {"value": "base.yaml"},
        "sam.sam_type": {"values": ["sam", "fisher-sam"]},
        "sam.rho": {"values": [0.02, 0.05, 0.1]},
        "optim.lr": {"value": 2e-5},
        "seed": {"values": [1, 2]},
    },
}


def test_grid_count_is_the_product_and_last_parameter_varies_fastest():
    runs = sw.expand_grid(SWEEP)
    assert len(runs) == 2 * 3 * 1 * 2
    assert [r.params["seed"] for r in runs[:4]] == [1, 2, 1, 2]
    assert runs[0].params == {"config": "base.yaml", "sam.sam_type": "sam", "sam.rho": 0.02, "optim.lr": 2e-5,
                              "seed": 1}
    assert runs[-1].params["sam.sam_type"] == "fisher-sam" and runs[-1].params["sam.rho"] == 0.1
    assert len({tuple(r.params.items()) for r in runs}) == len(runs)


def test_value_parameters_are_constant_and_left_out_of_names():
    runs = sw.expand_grid(SWEEP)
    assert list(runs[0].varying) == ["sam.sam_type", "sam.rho", "seed"]
    assert runs[7].name == "007-sam_type=fisher-sam-rho=0.02-seed=2"
    assert len({r.name for r in runs}) == len(runs)


def test_names_keep_full_dotted_key_when_short_names_collide():
    runs = sw.expand_grid({"parameters": {"a.lr": {"values": [1, 2]}, "b.lr": {"values": [3, 4]}}})
    assert runs[0].name == "000-a.lr=1-b.lr=3"


def test_train_args_match_the_wandb_agent_format(tmp_path):
    run = sw.expand_grid(SWEEP)[0]
    assert sw.train_args(run, tmp_path / "r") == [
        "--config=base.yaml", "--sam.sam_type=sam", "--sam.rho=0.02", "--optim.lr=2e-05", "--seed=1",
        f"--output_dir={tmp_path / 'r'}"]
    assert sw.train_args(run, Path("o"), base_config="other.yaml")[0] == "--config=other.yaml"
    assert sw.format_arg("flag", True) == "--flag=True" and sw.format_arg("betas", [0.9, 0.98]) == "--betas=[0.9, 0.98]"


def test_output_dir_in_the_sweep_is_replaced_by_the_run_dir():
    runs = sw.expand_grid({"parameters": {"output_dir": {"value": "x"}, "seed": {"values": [1, 2]}}})
    assert all("output_dir" not in r.params for r in runs)
    assert sw.train_args(runs[0], Path("root/000"))[-1] == "--output_dir=root/000"


@pytest.mark.parametrize("spec,needle", [
    ({"method": "random", "parameters": {"a": {"values": [1]}}}, "method is 'random'"),
    ({"method": "grid"}, "no 'parameters'"),
    ({"parameters": {"sam": {"parameters": {"rho": {"values": [1]}}}}}, "use dotted names"),
    ({"parameters": {"lr": {"min": 1e-5, "max": 1e-4}}}, "'lr' has ['max', 'min']"),
    ({"parameters": {"lr": {"values": []}}}, "non-empty list"),
    ({"parameters": {"lr": 0.1}}, "'lr' is 0.1"),
])
def test_grid_errors(spec, needle):
    with pytest.raises(ConfigError) as info:
        sw.expand_grid(spec)
    assert needle in str(info.value)


def test_make_command_per_launcher():
    assert sw.make_command(["--seed=1"], python="py").argv == ["py", "-m", "fsam_ds.train", "--seed=1"]
    torchrun = sw.make_command(["--seed=1"], launcher="torchrun", nproc=2)
    assert torchrun.argv[1:] == ["--nproc_per_node", "2", "--standalone", "-m", "fsam_ds.train", "--seed=1"]
    deepspeed = sw.make_command(["--seed=1"], launcher="deepspeed", nproc=2)
    assert deepspeed.argv[1:4] == ["--num_gpus", "2", "--master_port"] and "OMP_NUM_THREADS" in deepspeed.env
    with pytest.raises(ConfigError, match="launcher is 'mpirun'"):
        sw.make_command([], launcher="mpirun")


# ---------------------------------------------------------------- results


def _write_metrics(run_dir: Path, lines: list) -> None:
    """Lines as the trainer's writer encodes them; a str is written as given (a damaged line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(
        (line if isinstance(line, str) else encode_event(line)) + "\n" for line in lines))


def test_run_summary_takes_the_last_summary_and_survives_a_damaged_file(tmp_path):
    _write_metrics(tmp_path / "a", [{"event": "eval", "acc": 0.5}, {"event": "summary", "best_metric": 0.6},
                                    {"event": "summary", "best_metric": 0.7, "metric_name": "acc"}, '{"event": "summ'])
    with pytest.warns(UserWarning, match="cut short"):
        assert sw.run_summary(tmp_path / "a") == {"event": "summary", "best_metric": 0.7, "metric_name": "acc"}
    assert sw.run_summary(tmp_path / "missing") is None
    _write_metrics(tmp_path / "b", ['{"event": "summ', {"event": "summary", "best_metric": 0.7}])
    with pytest.warns(UserWarning, match=r"metrics.jsonl:1 is not valid JSON"):
        assert sw.run_summary(tmp_path / "b") is None  # a damaged run is a failed run, not the sweep's end


def fake_trainer(outcomes: dict[int, object]):
    """A runner that plays the trainer: writes metrics.jsonl per run index, or fails."""
    calls = []

    def runner(command: LaunchCommand, log_path: Path) -> int:
        calls.append(command)
        output_dir = Path(next(a for a in command.argv if a.startswith("--output_dir=")).split("=", 1)[1])
        index = int(output_dir.name[:3])
        outcome = outcomes.get(index, 0.5 + index / 100)
        if outcome == "crash":
            _write_metrics(output_dir, [{"event": "train", "step": 1, "loss": 0.7}])
            return 1
        if outcome == "nan":
            _write_metrics(output_dir, [{"event": "summary", "best_metric": math.nan, "metric_name": "accuracy"}])
            return 0
        _write_metrics(output_dir, [{"event": "eval", "accuracy": outcome},
                                    {"event": "summary", "best_metric": outcome, "metric_name": "accuracy"}])
        return 0

    runner.calls = calls
    return runner


def _python(args: list[str]) -> LaunchCommand:
    return LaunchCommand(["python", "-m", "fsam_ds.train", *args])


def test_run_sweep_collects_results_and_marks_failed_runs(tmp_path):
    runs = sw.expand_grid(SWEEP)
    runner = fake_trainer({3: "crash", 5: "nan"})
    lines = []
    results = sw.run_sweep(runs, tmp_path, command_for=_python, runner=runner, out=lines.append)
    assert len(runner.calls) == len(runs)
    assert [r.status for r in results].count("failed") == 1
    assert results[3].status == "failed" and results[3].returncode == 1 and results[3].best_metric is None
    assert results[5].status == "no metric" and results[5].best_metric is None
    assert results[0].status == "ok" and results[0].best_metric == 0.5 and results[0].metric_name == "accuracy"
    table = sw.format_table(results).splitlines()
    assert table[0].split() == ["run", "sam.sam_type", "sam.rho", "seed", "metric", "best", "status"]
    assert table[1].split() == ["000", "sam", "0.02", "1", "accuracy", "0.5000", "ok"]
    assert table[4].split() == ["003", "sam", "0.05", "2", "-", "-", "failed"]
    assert any("003-sam_type=sam-rho=0.05-seed=2: failed (exit 1" in line for line in lines)


def test_seed_table_averages_over_seeds(tmp_path):
    runs = sw.expand_grid(SWEEP)
    results = sw.run_sweep(runs, tmp_path, command_for=_python, runner=fake_trainer({3: "crash"}), out=lambda s: None)
    rows = sw.format_seed_table(results).splitlines()
    assert rows[0].split() == ["sam.sam_type", "sam.rho", "metric", "mean", "std", "runs", "ok"]
    assert rows[1].split() == ["sam", "0.02", "accuracy", "0.5050", "0.0071", "2/2"]
    assert rows[2].split() == ["sam", "0.05", "accuracy", "0.5200", "-", "1/2"]
    no_seed = sw.expand_grid({"parameters": {"a": {"values": [1, 2]}}})
    assert sw.format_seed_table([sw.Result(r, "ok") for r in no_seed]) is None


def test_dry_run_prints_commands_without_running(tmp_path):
    lines = []

    def never(command, log_path):
        raise AssertionError("dry run must not run anything")

    results = sw.run_sweep(sw.expand_grid(SWEEP), tmp_path, command_for=_python, runner=never, dry_run=True,
                           out=lines.append)
    assert len(lines) == 12 and all(r.status == "dry-run" for r in results)
    assert lines[0] == (f"python -m fsam_ds.train --config=base.yaml --sam.sam_type=sam --sam.rho=0.02 "
                        f"--optim.lr=2e-05 --seed=1 --output_dir={tmp_path}/000-sam_type=sam-rho=0.02-seed=1")


def test_resume_skips_finished_runs(tmp_path):
    runs = sw.expand_grid(SWEEP)
    sw.run_sweep(runs, tmp_path, command_for=_python, runner=fake_trainer({3: "crash"}), out=lambda s: None)
    again = fake_trainer({})
    results = sw.run_sweep(runs, tmp_path, command_for=_python, runner=again, resume=True, out=lambda s: None)
    assert len(again.calls) == 1  # only the crashed run is repeated, from its newest checkpoint
    assert again.calls[0].argv[-1] == "--resume=true"
    assert results[3].status == "ok" and results[0].status == "skipped" and results[0].best_metric == 0.5


def test_cli_end_to_end_with_injected_runner(tmp_path, capsys):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    root = tmp_path / "runs"
    code = sw.main([str(sweep_file), "--run-root", str(root), "--python", "py"], runner=fake_trainer({1: "crash"}))
    assert code == 1
    out = capsys.readouterr().out
    assert "12 runs" in out and "over seeds:" in out
    assert "001  sam           0.02     2     -         -       failed" in out
    records = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert len(records) == 12 and records[1]["status"] == "failed" and records[0]["best_metric"] == 0.5


def test_cli_rejects_bad_sweeps(tmp_path, capsys):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("method: bayes\nparameters: {a: {values: [1]}}\n")
    assert sw.main([str(sweep_file), "--dry-run"]) == 2
    assert "method is 'bayes'" in capsys.readouterr().err


def test_repository_sweep_file():
    spec = sw.load_sweep(ROOT / "launch/sweeps/sam_type_rho_seed.yaml")
    assert spec["command"] == ["${env}", "${interpreter}", "-m", "fsam_ds.train", "${args}"]
    runs = sw.expand_grid(spec)
    grid = sw.grid_values(spec)
    assert set(grid) == {"config", "output_dir", "sam.sam_type", "sam.rho", "optim.lr", "seed"}
    assert len(runs) == math.prod(len(v) for v in grid.values()) == 36
    assert all(isinstance(lr, float) for lr in grid["optim.lr"])
    assert (ROOT / grid["config"][0]).is_file()
