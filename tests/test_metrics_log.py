import json
import math
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fsam_ds.trainer.metrics_log import (
    MetricsFileError, NullLogger, RunLogger, encode_event, open_run_logger, read_events, read_summary,
    resolve_wandb_mode, trim_metrics, wandb_api_key_configured,
)
from fsam_ds.trainer.run_config import config_to_dict, load_config


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path, monkeypatch):
    """Keep wandb away from the user's home, credentials and any server."""
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DISABLED", "WANDB_BASE_URL", "RANK", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    monkeypatch.chdir(tmp_path)


def make_cfg(tmp_path, wandb="disabled", *extra):
    return load_config(["--task=sst2", "--model=m", f"--output_dir={tmp_path / 'run'}", f"--log.wandb={wandb}",
                        "--log_every=2", "--progress=false", *extra])


def open_logger(cfg, **kwargs):
    return open_run_logger(cfg, config_to_dict(cfg), **kwargs)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_jsonl_events_and_flush_before_close(tmp_path):
    cfg = make_cfg(tmp_path)
    logger = open_logger(cfg, rank=0, total_steps=4)
    assert isinstance(logger, RunLogger)
    assert logger.train_step(1, 1.0, examples=16, lr=1e-5) is None  # between log points
    logger.train_step(2, 3.0, examples=16, lr=2e-5)
    logger.log_eval(2, {"accuracy": 0.75, "loss": 0.5}, metric_name="accuracy", epoch=1)
    logger.log_mask(2, {"encoder.layer.0.weight": 0.1})
    logger.summary(best_metric=0.75, metric_name="accuracy", best_step=2)
    # Every line is on disk before close(): a crash here would lose nothing.
    events = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    logger.close()

    assert [e["event"] for e in events] == ["start", "train", "eval", "mask", "summary"]
    train = events[1]
    assert train["step"] == 2 and train["loss"] == pytest.approx(2.0) and train["lr"] == 2e-5
    assert train["examples_per_s"] > 0
    assert events[2]["accuracy"] == 0.75 and events[2]["metric_name"] == "accuracy" and events[2]["epoch"] == 1
    assert events[3]["density"] == {"encoder.layer.0.weight": 0.1}
    assert events[4]["best_metric"] == 0.75 and events[4]["metric_name"] == "accuracy"


def test_tensor_and_nonfinite_values_stay_valid_json(tmp_path):
    with open_logger(make_cfg(tmp_path), rank=0) as logger:
        logger.train_step(2, torch.tensor(0.5), examples=4, grad_norm=torch.tensor(float("inf")),
                          rho=np.float32(-np.inf), perturbation_norm=float("nan"), mask_rebuilt=np.bool_(True))
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # json.dumps' default, which is not JSON
    train = read_jsonl(tmp_path / "run" / "metrics.jsonl")[1]  # the standard library's reader
    assert train["loss"] == 0.5 and train["mask_rebuilt"] is True
    assert (train["grad_norm"], train["rho"], train["perturbation_norm"]) == ("inf", "-inf", "nan")


def _same(a, b) -> bool:
    """Equality that counts nan as equal to nan, through dicts and lists."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_reader_gives_back_exactly_what_the_writer_logged(tmp_path):
    with open_logger(make_cfg(tmp_path), rank=0) as logger:
        written = [logger.log("start_extra", step=0, note="nan-free text"),
                   logger.train_step(2, torch.tensor(0.25), examples=4, grad_norm=float("inf"), lr=1e-5),
                   logger.log_eval(2, {"accuracy": 0.5, "mcc": float("nan")}, metric_name="accuracy", epoch=1),
                   logger.log_mask(2, {"layer.0": np.float64(0.1), "layer.1": torch.tensor(float("-inf"))}),
                   logger.summary(best_metric=None, metric_name="accuracy", best_step=None)]
    events = read_events(tmp_path / "run" / "metrics.jsonl")
    assert [e["event"] for e in events] == ["start", "start_extra", "train", "eval", "mask", "summary"]
    assert all(_same(got, want) for got, want in zip(events[1:], written)), (events[1:], written)
    assert math.isinf(events[2]["grad_norm"]) and math.isnan(events[3]["mcc"])
    assert events[4]["density"]["layer.1"] == -math.inf and events[5]["best_metric"] is None
    # the comparison can fail: a value read back as the string it was written as is not the float
    assert not _same({"x": "nan"}, {"x": math.nan}) and not _same({"x": math.inf}, {"x": -math.inf})
    assert read_events(tmp_path / "run" / "metrics.jsonl", "eval") == [events[3]]
    assert read_summary(tmp_path / "run" / "metrics.jsonl") == events[5]


def _write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else encode_event(line)) + "\n" for line in lines))
    return path


def test_a_cut_short_last_line_is_skipped_with_a_warning(tmp_path):
    path = _write_lines(tmp_path / "metrics.jsonl", [{"event": "train", "step": 1, "loss": 0.5}, "", '{"event": "tr'])
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: skipping the last line, which is not valid JSON"):
        assert read_events(path) == [{"event": "train", "step": 1, "loss": 0.5}]


@pytest.mark.parametrize("bad, problem", [('{"event": "tr', "not valid JSON"),
                                          ("[1, 2]", "a JSON list, not an object")])
def test_a_bad_line_elsewhere_is_an_error_naming_file_and_line(tmp_path, bad, problem):
    path = _write_lines(tmp_path / "metrics.jsonl", [{"event": "start"}, bad, {"event": "summary", "best_metric": 1}])
    with pytest.raises(MetricsFileError, match=rf"metrics.jsonl:2 is {problem}.*Delete or repair line 2"):
        read_events(path)
    with pytest.raises(MetricsFileError):
        read_summary(path)
    assert read_summary(tmp_path / "missing.jsonl") is None


def test_trim_keeps_what_the_checkpoint_had_seen_in_the_writers_encoding(tmp_path):
    lines = [{"event": "start", "step": 0}, {"event": "train", "step": 2, "loss": 0.5, "grad_norm": math.inf},
             {"event": "eval", "step": 4, "accuracy": math.nan}, {"event": "train", "step": 6, "loss": 0.25},
             {"event": "summary", "step": 4, "best_metric": 0.5}, '{"event": "tra']
    path = _write_lines(tmp_path / "metrics.jsonl", lines)
    with pytest.warns(UserWarning, match="cut short"):
        trim_metrics(path, step=4)
    assert path.read_text() == "".join(encode_event(line) + "\n" for line in lines[:3])
    kept = read_events(path)  # no warning now: the cut-short line is gone
    assert [e.get("step") for e in kept] == [0, 2, 4] and math.isnan(kept[2]["accuracy"])
    trim_metrics(tmp_path / "missing.jsonl", step=4)  # nothing to trim
    assert not (tmp_path / "missing.jsonl").exists()


def test_fresh_run_truncates_and_resume_appends(tmp_path):
    with open_logger(make_cfg(tmp_path), rank=0) as logger:
        logger.train_step(2, 1.0, examples=4)
    with open_logger(make_cfg(tmp_path, "disabled", "--resume=true"), rank=0, start_step=2) as logger:
        assert logger.resumed
        logger.train_step(4, 0.5, examples=4)
    events = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [(e["event"], e.get("step")) for e in events] == [("start", 0), ("train", 2), ("start", 2), ("train", 4)]
    assert events[2]["resumed"] is True
    with open_logger(make_cfg(tmp_path), rank=0) as logger:
        pass
    assert [e["event"] for e in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == ["start"]


def test_other_ranks_get_a_no_op_logger(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "offline")
    logger = open_logger(cfg, rank=1)
    assert isinstance(logger, NullLogger)
    logger.train_step(2, 1.0, examples=4)
    logger.log_eval(2, {"accuracy": 1.0})
    logger.log_mask(2, {"w": 0.5})
    logger.summary(1.0, "accuracy")
    logger.close()
    monkeypatch.setenv("RANK", "2")
    assert isinstance(open_logger(cfg), NullLogger)
    assert not (tmp_path / "run").exists() and not (tmp_path / "wandb").exists()


def test_null_logger_mirrors_the_public_interface():
    public = {n for n in dir(RunLogger) if not n.startswith("_") and callable(getattr(RunLogger, n))}
    assert public <= {n for n in dir(NullLogger) if callable(getattr(NullLogger, n))}


def test_console_lines_every_log_every_steps(tmp_path, capsys):
    with open_logger(make_cfg(tmp_path), rank=0, total_steps=8) as logger:
        for step in range(1, 5):
            logger.train_step(step, 0.25 * step, examples=32, lr=1e-5)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert len(lines) == 2
    assert lines[1].startswith("step 4/8 | loss 0.8750") and "ex/s" in lines[1] and "eta" in lines[1]


def test_wandb_disabled_writes_nothing(tmp_path):
    with open_logger(make_cfg(tmp_path, "disabled"), rank=0) as logger:
        logger.train_step(2, 1.0, examples=4)
        assert logger.wandb_mode == "disabled"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "wandb-home").exists()


def test_auto_mode_decides_from_local_credentials_only(tmp_path, monkeypatch):
    assert not wandb_api_key_configured()
    assert resolve_wandb_mode("auto") == "offline"
    netrc = Path.home() / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode("auto") == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == "disabled"
    assert resolve_wandb_mode("offline") == "offline"  # an explicit choice wins over the environment


def read_wandb_records(run_file):
    """Decode a run's .wandb file: a 7-byte header, then 32 KiB blocks of framed protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # too little room for a frame header: the writer padded to the next block
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # the writer is mid-record; read again later
            break
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def wandb_history_and_summary(run_dir, timeout=30.0):
    run_files = list(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    # run.finish() returns before wandb's writer process has flushed the file; wait for its exit record.
    deadline = time.monotonic() + timeout
    records = read_wandb_records(run_files[0])
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.1)
        records = read_wandb_records(run_files[0])
    history, summary = [], {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    return history, summary


def test_wandb_offline_history_holds_the_logged_keys(tmp_path):
    with open_logger(make_cfg(tmp_path, "offline"), rank=0) as logger:
        assert logger.wandb_mode == "offline"
        logger.train_step(1, 0.75, examples=8)
        logger.train_step(2, 0.25, examples=8, lr=3e-5)
        logger.log_eval(2, {"accuracy": 0.625}, metric_name="accuracy")
        logger.log_mask(2, {"layer.0.weight": 0.125})
        logger.summary(best_metric=0.625, metric_name="accuracy")
    history, summary = wandb_history_and_summary(tmp_path / "run")
    assert any("train/loss" in h for h in history), (history, summary)
    assert any("train/loss" in h for h in history), history
    train = next(h for h in history if "train/loss" in h)
    assert train["train/loss"] == pytest.approx(0.5) and train["train/lr"] == 3e-5 and train["step"] == 2
    assert any(h.get("eval/accuracy") == 0.625 for h in history)
    assert any(h.get("mask/density/layer.0.weight") == 0.125 for h in history)
    assert summary["best_metric"] == 0.625 and summary["metric_name"] == "accuracy"
    assert (tmp_path / "run" / "wandb-run-id").is_file()


def test_wandb_init_failure_does_not_stop_training(tmp_path, monkeypatch):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(UserWarning, match="boom"):
        logger = open_logger(make_cfg(tmp_path, "offline"), rank=0)
    with logger:
        assert logger.wandb_mode == "disabled"
        logger.train_step(2, 1.0, examples=4)
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["event"] == "train"


def test_online_without_a_key_never_prompts_and_logs_offline(tmp_path):
    with pytest.warns(UserWarning, match="no wandb API key"):
        logger = open_logger(make_cfg(tmp_path, "online"), rank=0)
    with logger:
        assert logger.wandb_mode == "offline"


def test_unreachable_server_falls_back_to_offline_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "3")
    with pytest.warns(UserWarning, match="falling back to offline"):
        logger = open_logger(make_cfg(tmp_path, "auto"), rank=0)
    with logger:
        assert logger.wandb_mode == "offline"
        logger.train_step(2, 1.0, examples=4)
    history, _ = wandb_history_and_summary(tmp_path / "run")
    assert any("train/loss" in h for h in history), history


def test_the_demo_reads_its_accuracy_from_the_summary_line(tmp_path):
    from fsam_ds.cli.demo import best_accuracy

    assert best_accuracy(tmp_path) is None  # no metrics.jsonl: the run never started
    _write_lines(tmp_path / "metrics.jsonl", [{"event": "eval", "step": 4, "accuracy": 0.9}])
    assert best_accuracy(tmp_path) is None  # no summary: the run did not finish
    _write_lines(tmp_path / "metrics.jsonl", [{"event": "summary", "best_metric": 0.5},
                                              {"event": "summary", "best_metric": 0.75}])
    assert best_accuracy(tmp_path) == 0.75
