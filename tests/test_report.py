"""fsam-report: plots and table from metrics.jsonl, checked on written files and on a real trainer run."""

import json
import math

import matplotlib.image as mpimg
import pytest

import train_fixtures as fx
from fsam_ds.cli.report import ReportError, format_table, load_run, main, make_report
from fsam_ds.trainer.metrics_log import encode_event


def write_run(root, name, sam_type, losses, accs, mask=None, summary=True, extra_lines=()):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": "sst2", "sam": {"sam_type": sam_type}}))
    lines = [{"event": "start", "step": 0}]
    lines += [{"event": "train", "step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    lines += [{"event": "eval", "step": 10 * (i + 1), "metric_name": "accuracy", "accuracy": acc, "loss": 9.0}
              for i, acc in enumerate(accs)]
    if mask:
        lines.append({"event": "mask", "step": 0, "density": {"stale": 1.0}})
        lines.append({"event": "mask", "step": 10, "density": mask})
    if summary:
        lines.append({"event": "summary", "step": 10 * len(losses), "best_metric": max(accs),
                      "metric_name": "accuracy"})
    text = "\n".join(encode_event(line) for line in lines) + "\n" + "".join(extra_lines)
    (run / "metrics.jsonl").write_text(text)
    return run


def test_report_plots_each_run_and_the_last_mask(tmp_path, capsys):
    a = write_run(tmp_path, "sst2-sam-s1", "sam", [0.9, 0.6, 0.4], [0.70, 0.80])
    b = write_run(tmp_path, "sst2-fisher-sam-s1", "fisher-sam", [0.8, 0.5, 0.3], [0.75, 0.85],
                  mask={"layer.0.weight": 0.1, "layer.1.weight": 0.3})
    report = make_report([a, b], tmp_path / "out")

    assert set(report.files) == {"train_loss", "dev_metric", "mask_density"}
    for path in report.files.values():
        image = mpimg.imread(path)
        assert path.stat().st_size > 5000 and image.shape[0] > 100 and image.std() > 0.01
    loss = report.series["train_loss"]
    assert loss["sst2-sam-s1 (sam)"] == ([10, 20, 30], [0.9, 0.6, 0.4])
    assert loss["sst2-fisher-sam-s1 (fisher-sam)"] == ([10, 20, 30], [0.8, 0.5, 0.3])
    # The dev curve is the selection metric, never the eval loss logged beside it.
    assert report.series["dev_metric"]["sst2-sam-s1 (sam)"] == ([10, 20], [0.70, 0.80])
    assert report.series["mask_density"] == {
        "sst2-fisher-sam-s1 (fisher-sam)": (["layer.0.weight", "layer.1.weight"], [0.1, 0.3])}

    assert main([str(a), str(b), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "sst2-fisher-sam-s1" in out and "0.8500" in out and "0.8000" in out
    assert (tmp_path / "cli" / "mask_density.png").is_file()


def test_plots_change_with_the_data(tmp_path):
    a = write_run(tmp_path / "1", "run", "sam", [0.9, 0.6, 0.4], [0.7])
    b = write_run(tmp_path / "2", "run", "sam", [0.1, 0.8, 0.2], [0.7])
    first = make_report([a], tmp_path / "out1").files["train_loss"].read_bytes()
    second = make_report([b], tmp_path / "out2").files["train_loss"].read_bytes()
    assert first != second


def test_no_mask_plot_without_mask_lines(tmp_path):
    run = write_run(tmp_path, "r", "sam", [1.0], [0.5])
    report = make_report([run], tmp_path / "out")
    assert "mask_density" not in report.files and not (tmp_path / "out" / "mask_density.png").exists()


def test_resumed_and_crashed_runs(tmp_path):
    # A resumed run repeats steps after its checkpoint; a crash may leave a half-written line.
    resumed = [json.dumps({"event": "train", "step": 20, "loss": 0.55}) + "\n",
               json.dumps({"event": "train", "step": 40, "loss": 0.2}) + "\n", '{"event": "tra']
    run = write_run(tmp_path, "r", "esam", [0.9, 0.6, 0.4], [0.6, 0.9], summary=False, extra_lines=resumed)
    with pytest.warns(UserWarning, match="not valid JSON"):
        data = load_run(run)
    assert data.train == ([10, 20, 30, 40], [0.9, 0.55, 0.4, 0.2])
    assert data.best == 0.9 and data.best_step == 20 and data.metric_name == "accuracy"


def test_summary_best_metric_wins_and_no_metric_is_guessed_without_a_name(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(encode_event(e) for e in [
        {"event": "eval", "step": 5, "metric_name": "f1", "loss": 0.3, "f1": 0.5, "accuracy": 0.6},
        {"event": "summary", "step": 5, "best_metric": 0.42, "best_step": 5, "metric_name": "f1"},
    ]) + "\n")
    with pytest.warns(UserWarning, match="no config.json"):
        data = load_run(run)
    assert data.metric_name == "f1" and data.eval == ([5], [0.5])
    assert data.best == 0.42 and data.sam_type == "?"
    (run / "metrics.jsonl").write_text(encode_event({"event": "eval", "step": 5, "loss": 0.3, "accuracy": 0.6}) + "\n")
    with pytest.warns(UserWarning, match="no config.json"):
        data = load_run(run)
    assert data.metric_name is None and data.eval == ([], []) and data.best is None


def test_nonfinite_values_are_left_out_of_the_curves(tmp_path):
    run = write_run(tmp_path, "r", "sam", [0.9, math.nan, math.inf, 0.4], [0.5, math.nan])
    data = load_run(run)
    assert data.train == ([10, 40], [0.9, 0.4]) and data.eval == ([10], [0.5])


def test_a_damaged_metrics_file_is_a_report_error_naming_the_line(tmp_path, capsys):
    run = write_run(tmp_path, "r", "sam", [0.9], [0.5], extra_lines=['{"event": "tr\n', encode_event({"event": "x"})])
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    assert "metrics.jsonl:5 is not valid JSON" in capsys.readouterr().err


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="has no metrics.jsonl"):
        make_report([tmp_path / "empty"], tmp_path / "out")
    assert main([str(tmp_path / "empty")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


# ---------------------------------------------------------------- against a real trainer run
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A real 8-step fisher-sam run of the trainer (tiny BERT, 64 generated sentences), evaluated twice."""
    root = tmp_path_factory.mktemp("trained")
    model = fx.write_tiny_model(root / "model")
    train, dev = fx.write_sst2_files(root / "sst2")
    out = root / "run"
    args = fx.base_args(model, train, dev, out, **{"optim.epochs": 1, "log.log_every": 2, "eval.every_steps": 4})
    result = fx.run(fx.train_cmd(args), timeout=600)
    assert (out / "metrics.jsonl").is_file(), result.stdout[-4000:]
    return out


def test_everything_the_report_shows_is_what_the_trainer_wrote(trained_run, tmp_path):
    """The report's names are checked against the trainer's own output, read here with the standard
    library: a name the trainer never writes would leave a curve, the mask or the best value empty."""
    written = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    kinds = {kind: [e for e in written if e["event"] == kind] for kind in ("train", "eval", "mask", "summary")}
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}  # the run wrote every kind the report reads
    summary = kinds["summary"][-1]
    metric = summary["metric_name"]
    assert {e["metric_name"] for e in kinds["eval"]} == {metric}

    report = make_report([trained_run], tmp_path / "out")
    (data,) = report.runs
    label = data.label
    assert data.sam_type == "fisher-sam" and data.metric_name == metric
    assert report.series["train_loss"][label] == ([e["step"] for e in kinds["train"]],
                                                  [e["loss"] for e in kinds["train"]])
    assert report.series["dev_metric"][label] == ([e["step"] for e in kinds["eval"]],
                                                  [e[metric] for e in kinds["eval"]])
    assert report.series["mask_density"][label] == (list(kinds["mask"][-1]["density"]),
                                                    list(kinds["mask"][-1]["density"].values()))
    assert (data.best, data.best_step) == (summary["best_metric"], summary["best_step"])
    assert data.best is not None and data.best_step is not None
    row = format_table([data]).splitlines()[2].split()
    assert row == [trained_run.name, "fisher-sam", metric, f"{summary['best_metric']:.4f}", str(summary["best_step"]),
                   f"{kinds['train'][-1]['loss']:.4f}", str(kinds["train"][-1]["step"])]
