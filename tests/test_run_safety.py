"""What fsam-train guarantees when things go wrong: runs never replace each other unasked, damaged
checkpoints are never loaded, runs that train nothing do not report success, and resume never
silently mixes settings. Each test reproduces a failure seen on a real run with the tiny BERT and
generated data of train_fixtures: runs that train in subprocesses like a user's command line, launches
that are refused before training by the trainer's main in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import train_fixtures as fx
from fsam_ds.trainer.run_dir import CheckpointDamaged, damage, verify_folder
from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.run_config import config_to_dict, load_config
from fsam_ds.trainer.run_identity import config_hash, run_differences

TIMEOUT = 300
SHORT = {"optim.epochs": 1, "log.log_every": 4, "data.micro_batch_size": 8}  # 8 steps


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    model = fx.write_tiny_model(root / "model")
    train, dev = fx.write_sst2_files(root / "sst2")
    return {"model": model, "train": train, "dev": dev}


# The run that the tests below copy (shutil.copytree) instead of training their own: ZeRO-1, so that
# its checkpoints hold every kind of checkpoint file, and a checkpoint every 2 of its 8 steps, so
# that the newest one (step8) has intact older ones beside it.
FINISHED = {"sam.rho": 0.02, "zero_stage": 1, "checkpoint_every": 2, "keep_checkpoints": 3}


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> Path:
    """A run trained with FINISHED, launched without output_dir in an empty folder: runs/<its default name>."""
    cwd = tmp_path_factory.mktemp("finished")
    result = train(assets, None, cwd, **FINISHED)
    assert result.returncode == 0, result.stdout[-4000:]
    (run,) = (cwd / "runs").iterdir()
    return run


def train_args(assets: dict[str, Path], out: Path | None, *extra: str, **settings) -> list[str]:
    """fsam-train's arguments; out None leaves output_dir at its default (runs/... under the working folder)."""
    args = fx.base_args(assets["model"], assets["train"], assets["dev"], out or Path("unused"), **{**SHORT, **settings})
    if out is None:
        args = [a for a in args if not a.startswith("--output_dir=")]
    return args + list(extra)


def train(assets: dict[str, Path], out: Path | None, cwd: Path, *extra: str, **settings) -> subprocess.CompletedProcess:
    """fsam-train in `cwd`, in a subprocess."""
    return fx.run(fx.train_cmd(train_args(assets, out, *extra, **settings)), TIMEOUT, cwd=cwd, PYTHONPATH=str(fx.REPO))


# set as a one-process torchrun sets them, so that init_distributed leaves os.environ as it found it
ONE_PROCESS = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}


def train_here(assets: dict[str, Path], out: Path | None, cwd: Path, *extra: str,
               **settings) -> subprocess.CompletedProcess:
    """`train`'s launch by fsam-train's main in this process (no interpreter start), with its console
    output (stdout and stderr, as `train` reads them) and its exit status; for launches refused before
    training. An exception that main does not turn into an error line fails the test as it is raised."""
    # imported before the streams are redirected: they create their log handlers on import, and those
    # must write to pytest's streams, not to this launch's buffer
    import datasets  # noqa: F401
    import deepspeed  # noqa: F401
    import transformers  # noqa: F401

    from fsam_ds.cli.train import main
    from fsam_ds.zero.distributed import free_port

    args = train_args(assets, out, *extra, **settings)
    console = io.StringIO()
    # the subprocesses' environment, PATH included: DeepSpeed builds its CPU communication op with the
    # ninja found there, and another ninja version, not reading that build's log, would build it again
    env = fx.env(**ONE_PROCESS, MASTER_PORT=str(free_port()), PYTHONPATH=str(fx.REPO))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for key, value in env.items():
            if os.environ.get(key) != value:
                patch.setenv(key, value)
        with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
            code = main(args)
    return subprocess.CompletedProcess(args, code, console.getvalue(), None)


def error_line(result: subprocess.CompletedProcess, code: int = 2) -> str:
    assert result.returncode == code, result.stdout[-4000:]
    assert "Traceback" not in result.stdout, result.stdout[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("fsam-train: error:")]
    assert len(lines) == 1, result.stdout[-4000:]
    return lines[0]


def checksums(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def flip_middle(path: Path, size: int = 4096) -> None:
    """Overwrites `size` bytes in the middle of the file (half the file if it is smaller) with other bytes."""
    data = bytearray(path.read_bytes())
    n = min(size, len(data) // 2)
    start = (len(data) - n) // 2
    data[start:start + n] = bytes((b + 1 + i) % 256 for i, b in enumerate(data[start:start + n]))
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------- 1. runs never replace each other

def test_default_folder_names_the_run_by_its_settings():
    base = ["--task=sst2", "--model=m"]
    a, b = load_config(base + ["--sam.rho=0.02"]), load_config(base + ["--sam.rho=0.05"])
    logging_only = load_config(base + ["--sam.rho=0.02", "--log.log_every=3", "--keep_checkpoints=5"])
    assert a.output_dir != b.output_dir  # the old default, runs/sst2-fisher-sam-s42, was one folder for both
    assert a.output_dir == logging_only.output_dir  # settings that cannot change the result keep the folder
    assert a.output_dir == f"runs/sst2-fisher-sam-s42-{config_hash(config_to_dict(a))}"
    assert run_differences(config_to_dict(a), config_to_dict(b)) == ["sam.rho: 0.02 -> 0.05"]
    assert run_differences(config_to_dict(a), config_to_dict(logging_only)) == []


def test_relaunches_never_destroy_an_earlier_run(assets, finished_run, tmp_path):
    """Run A (rho 0.02) and run B (rho 0.05) launched in the same folder with the default output_dir;
    then fresh runs into A's folder, one of them with a setting that fails only once the DeepSpeed
    config is checked: A's checkpoints, metrics and exported models stay byte for byte. A is the
    module's finished run, copied into this test's folder as its launch there left it."""
    run_a = tmp_path / "runs" / finished_run.name
    shutil.copytree(finished_run, run_a)
    before = checksums(run_a)
    assert {"metrics.jsonl", "final/model.safetensors", "best/model.safetensors"} <= set(before)
    assert any(name.startswith("checkpoints/step8/") for name in before)

    result = train(assets, None, tmp_path, **{**FINISHED, "sam.rho": 0.05})
    assert result.returncode == 0, result.stdout[-4000:]
    assert len(list((tmp_path / "runs").iterdir())) == 2  # B got its own folder

    message = error_line(train_here(assets, run_a, tmp_path, **{**FINISHED, "sam.rho": 0.05}))
    assert "holds another run" in message and "--resume=true" in message and "--overwrite=true" in message
    assert "sam.rho: 0.02 -> 0.05" in message
    message = error_line(train_here(assets, run_a, tmp_path, "--overwrite=true", **{**FINISHED, "zero_stage": 2},
                                    ds_config=str(fx.REPO / "ds_configs/zero2_bf16.json")))
    assert "bf16.enabled is true but precision is 'fp32'" in message  # failed after the folder check
    message = error_line(train_here(assets, run_a, tmp_path, "--resume=true", **{**FINISHED, "sam.rho": 0.05}))
    assert "sam.rho: 0.02 -> 0.05" in message
    assert checksums(run_a) == before

    result = train(assets, run_a, tmp_path, "--overwrite=true", **{**FINISHED, "sam.rho": 0.05})
    assert result.returncode == 0, result.stdout[-4000:]
    starts = fx.events(run_a, "start")
    assert len(starts) == 1 and not starts[0]["resumed"]  # replaced, as asked
    assert checksums(run_a)["final/model.safetensors"] != before["final/model.safetensors"]


# --------------------------------------------------------------------- 2. damaged checkpoints

CHECKPOINT_FILES = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "fsam_state_rank0.pt",
                    "rng_state_rank0.pt", "trainer_state.json", "run_config.json", "manifest.json"]


def test_damaged_checkpoint_files_are_never_loaded(assets, finished_run, tmp_path):
    """4 KiB changed in the middle of each kind of checkpoint file: resume=<that checkpoint> refuses,
    naming the file and the newest intact checkpoint; resume=true falls back to it, saying so, and
    keeps the damaged one as it is."""
    assert sorted(p.name for p in (finished_run / "checkpoints" / "step8").iterdir()) == sorted(CHECKPOINT_FILES)

    for name in CHECKPOINT_FILES:
        out = tmp_path / name.replace(".", "_")
        shutil.copytree(finished_run, out)
        newest = out / "checkpoints" / "step8"
        flip_middle(newest / name)
        assert damage(newest) is not None and name in damage(newest)
        before = checksums(out)
        message = error_line(train_here(assets, out, tmp_path, f"--resume={newest}", **FINISHED))
        assert f"'{newest}' is damaged: {name}" in message, message
        assert f"--resume={out / 'checkpoints' / 'step6'}" in message, message
        assert checksums(out) == before, name

    out = tmp_path / "fallback"
    shutil.copytree(finished_run, out)
    flip_middle(out / "checkpoints" / "step8" / "mp_rank_00_model_states.pt")
    damaged = checksums(out / "checkpoints" / "step8")
    result = train(assets, out, tmp_path, "--resume=true", **FINISHED)
    assert result.returncode == 0, result.stdout[-4000:]
    assert "checkpoint" in result.stdout and "mp_rank_00_model_states.pt does not match" in result.stdout
    assert f"resumed from {out / 'checkpoints' / 'step6'}" in result.stdout
    assert checksums(out / "checkpoints" / "damaged-step8") == damaged  # kept for inspection, untouched
    assert fx.summary(out)["steps"] == 8


def test_exported_models_carry_a_manifest(assets, tmp_path):
    out = tmp_path / "run"
    result = train(assets, out, tmp_path)
    assert result.returncode == 0, result.stdout[-4000:]
    for name in ("best", "final"):
        verify_folder(out / name)  # intact
    flip_middle(out / "final" / "model.safetensors")
    with pytest.raises(CheckpointDamaged, match="model.safetensors does not match"):
        verify_folder(out / "final")


# --------------------------------------------------------------------- 3. no success for runs that did nothing

@pytest.mark.parametrize("sam_type", ["none", "fisher-sam"])
def test_a_run_whose_loss_stays_non_finite_fails(assets, tmp_path, sam_type):
    """lr 1e30: the first update blows the weights up and every later loss is nan. The SAM step skips
    those updates; the baseline's fp32 DeepSpeed step applies them. Either way the run stops."""
    out = tmp_path / "run"
    result = train(assets, out, tmp_path, max_consecutive_skipped=3,
                   **{"optim.lr": 1e30, "optim.warmup_ratio": 0, "sam.sam_type": sam_type})
    message = error_line(result, code=3)
    assert "4 consecutive steps (up to step 5)" in message and "max_consecutive_skipped = 3" in message
    assert "optim.lr" in message and "sam.rho" in message and "fp16" in message
    assert fx.summary(out) is None and not (out / "final").exists()
    assert fx.events(out, "failed")[0]["skipped_steps"] == 4


def test_skipped_steps_are_reported_by_a_run_allowed_to_finish(assets, tmp_path):
    out = tmp_path / "run"
    result = train(assets, out, tmp_path, max_consecutive_skipped=0, **{"optim.lr": 1e30, "optim.warmup_ratio": 0})
    assert result.returncode == 0, result.stdout[-4000:]
    assert fx.summary(out)["skipped_steps"] == 7  # steps 2-8
    assert "done: 8 steps (7 skipped)" in result.stdout
    assert [e["skipped_steps"] for e in fx.events(out, "train")] == [3, 7]  # logged at steps 4 and 8


def test_a_short_run_with_every_step_lost_fails_at_the_end():
    """Fewer steps than max_consecutive_skipped, all lost: the end of the run refuses to call it done."""
    from fsam_ds.trainer.run_dir import TrainerState
    from fsam_ds.trainer.loop import Run, TrainingFailed, finish
    from fsam_ds.trainer.metrics_log import NullLogger

    cfg = load_config(["--task=sst2", "--model=m"])
    state = TrainerState(step=4, skipped_steps=4, last_eval_step=4)  # its last step evaluated: only the verdict left
    run = Run(cfg, None, None, None, None, NullLogger(), state, [], "", None)
    with pytest.raises(TrainingFailed, match="every one of its 4 steps had a non-finite loss"):
        finish(run, 0.0)


# --------------------------------------------------------------------- 4. resume with changed settings

def test_resume_refuses_changed_run_settings_and_applies_the_others(assets, tmp_path):
    out = tmp_path / "run"
    result = train(assets, out, tmp_path, checkpoint_every=4)
    assert result.returncode == 0, result.stdout[-4000:]
    before = checksums(out)
    message = error_line(train(assets, out, tmp_path, "--resume=true", checkpoint_every=4,
                               **{"optim.lr": 2e-3, "sam.sam_type": "sam"}))
    assert "optim.lr: 0.001 -> 0.002" in message and 'sam.sam_type: "fisher-sam" -> "sam"' in message
    assert checksums(out) == before

    # extending the run and logging more often are applied: 8 more steps, each logged
    result = train(assets, out, tmp_path, "--resume=true", checkpoint_every=4,
                   **{"optim.epochs": 2, "log.log_every": 1})
    assert result.returncode == 0, result.stdout[-4000:]
    assert "resumed from" in result.stdout
    assert [e["step"] for e in fx.events(out, "train")] == [4, 8] + list(range(9, 17))
    assert fx.summary(out)["steps"] == 16


def test_manifest_sees_a_one_byte_change_a_truncation_and_a_missing_file(tmp_path):
    """The manifest hashes every byte: one changed byte in the middle of 1 MiB is seen."""
    from fsam_ds.trainer.run_dir import write_manifest

    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(1 << 20))
    write_manifest(tmp_path)
    assert damage(tmp_path) is None
    flip_middle(blob, size=1)
    assert damage(tmp_path) == "blob.bin does not match the sha256 its manifest records"
    blob.write_bytes(blob.read_bytes()[:1000])  # a copy cut short
    assert damage(tmp_path) == "blob.bin has 1000 bytes where the manifest records 1048576"
    blob.unlink()
    assert damage(tmp_path) == "blob.bin is missing"


def _manifests_from_the_ranks(rank: int, world: int, out: Path, stages: list[int]) -> list[dict]:
    """Per stage: a checkpoint saved by `world` ranks, its manifest, the manifest of the same files computed
    afterwards by reading, then a byte flipped in a file rank 1 wrote and what each rank finds."""
    import json

    import torch.distributed as dist

    from ds_workers import build_engine, global_batches, mlp, per_example_loss, sam_config, split
    from fsam_ds.trainer.run_dir import MANIFEST, RunDir, TrainerState, save_checkpoint, write_manifest

    results = []
    for stage in stages:
        root = out / f"stage{stage}"
        sam_engine = build_engine(mlp(), stage, sam=sam_config("fisher-sam"))
        sam_engine.train_step(split(global_batches("mlp", 1)[0], rank, world), per_example_loss("mlp"))
        folder = save_checkpoint(sam_engine, root, TrainerState(step=1, total_steps=2), keep=2, run_config={})
        merged = json.loads((folder / MANIFEST).read_text())["files"]
        reread = root / "reread"
        if rank == 0:
            shutil.copytree(folder, reread, ignore=shutil.ignore_patterns(MANIFEST))
            write_manifest(reread)
        dist.barrier()
        by_reading = json.loads((reread / MANIFEST).read_text())["files"]
        victim = max((name for name, entry in merged.items() if entry.get("rank") == 1),
                     key=lambda name: merged[name]["bytes"])
        if rank == 1:
            flip_middle(folder / victim, size=1)
        dist.barrier()
        own_part = damage(folder, rank, world)
        verdict = RunDir.damage(folder)
        try:
            RunDir(root, {})._resume_point(str(folder))
            refusal = None
        except CheckpointDamaged as err:
            refusal = str(err)
        results.append({"merged": merged, "by_reading": by_reading, "victim": victim, "own_part": own_part,
                        "verdict": verdict, "refusal": refusal})
    return results


def test_manifests_are_merged_from_the_ranks_and_checked_by_them(tmp_path):
    """Each rank hashes the checkpoint files it writes as it writes them, and rank 0 only merges: the merged
    manifest equals one computed afterwards by reading every file. On resume each rank checks its own part:
    a byte flipped in a file rank 1 wrote is found by rank 1 (not by rank 0) and named on every rank."""
    from dist_harness import run_distributed

    per_rank = run_distributed(_manifests_from_the_ranks, 2, tmp_path, tmp_path / "out", [2, 3])
    for stage, rank0, rank1 in zip([2, 3], *per_rank):
        merged, by_reading = rank0["merged"], rank0["by_reading"]
        assert {n: (e["bytes"], e["sha256"]) for n, e in merged.items()} == \
               {n: (e["bytes"], e["sha256"]) for n, e in by_reading.items()}, stage
        owners = {name: entry.get("rank") for name, entry in merged.items()}
        assert owners["zero_pp_rank_1_mp_rank_00_optim_states.pt"] == 1 and owners["rng_state_rank1.pt"] == 1
        assert owners["zero_pp_rank_0_mp_rank_00_optim_states.pt"] == 0 and owners["fsam_state_rank1.pt"] == 1
        # what rank 0 read after the save: the small files it wrote itself and nothing of the ranks' shards
        assert {n for n, owner in owners.items() if owner is None} <= {"trainer_state.json", "run_config.json",
                                                                        "zero_to_fp32.py"}, owners
        victim = rank0["victim"]
        assert rank0["own_part"] is None
        assert rank1["own_part"] == f"{victim} does not match the sha256 its manifest records"
        for rank in (rank0, rank1):
            assert rank["verdict"] == rank1["own_part"]
            assert rank["refusal"] is not None and f"is damaged: {victim} does not match" in rank["refusal"]


# --------------------------------------------------------------------- 5. what the run folder records

def _save_and_load_a_nonfinite_state(rank: int, world: int, out: Path, model: Path) -> tuple[Path, dict, dict]:
    import math
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fsam_ds.trainer.export import export_model
    from fsam_ds.trainer.run_dir import TrainerState, load_checkpoint, save_checkpoint

    sam_engine = SimpleNamespace(save_checkpoint=lambda root, tag, client_state, **options: None,
                                 load_checkpoint=lambda root, tag, **options: None)
    order = {"world_size": 1, "micro_batch_size": 8, "grad_accum": 1, "seed": 3, "steps_per_epoch": 8}
    state = TrainerState(step=3, total_steps=8, data=order, last_metrics={"pearson": math.nan, "loss": math.inf},
                         best_metric=0.5, best_metrics={"pearson": 0.5, "loss": -math.inf})
    folder = save_checkpoint(sam_engine, out, state, keep=1, run_config={})
    loaded, _ = load_checkpoint(sam_engine, folder, order, 8)
    engine = SimpleNamespace(module=AutoModelForSequenceClassification.from_pretrained(model),
                             zero_optimization_stage=lambda: 0)
    export_model(engine, AutoTokenizer.from_pretrained(model), out / "best", {"metrics": state.last_metrics})
    return folder, loaded.last_metrics, loaded.best_metrics


def test_checkpoints_and_exports_write_nan_as_metrics_jsonl_does(assets, tmp_path):
    """trainer_state.json and best.json hold a nan or infinite dev metric the way metrics.jsonl does (as
    `encode_event` writes it), and a resumed run reads it back as the float, not as None."""
    import json
    import math

    from dist_harness import run_distributed
    from fsam_ds.trainer.metrics_log import encode_event

    out = tmp_path / "run"
    folder, last, best = run_distributed(_save_and_load_a_nonfinite_state, 1, tmp_path, out, assets["model"])[0]
    in_metrics_jsonl = json.loads(encode_event({"pearson": math.nan, "loss": math.inf}))
    assert in_metrics_jsonl == {"pearson": "nan", "loss": "inf"}
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["last_metrics"] == in_metrics_jsonl and state["best_metrics"]["loss"] == "-inf"
    assert json.loads((out / "best" / "best.json").read_text())["metrics"] == in_metrics_jsonl
    assert math.isnan(last["pearson"]) and last["loss"] == math.inf and best == {"pearson": 0.5, "loss": -math.inf}
    verify_folder(folder)


PERTURBED_CASES = [  # per rank: first-pass mean loss, the perturbed losses of the examples it kept
    ([0.5, []], [1.5, [1.0, 2.0, 6.0]]),  # ESAM kept no example on rank 0
    ([0.5, [5.0]], [1.5, [1.0, 1.0, 1.0]]),  # the mean of the ranks' means would be 3
]


def _logged_losses(rank: int, world: int) -> list[tuple[float, float]]:
    """(loss, perturbed_loss) that `log_step` logs for each of PERTURBED_CASES on this rank."""
    import math
    from types import SimpleNamespace

    import torch

    from fsam_ds.sam.core import StepStats
    from fsam_ds.sam.driver import StepOutput
    from fsam_ds.trainer.run_dir import TrainerState
    from fsam_ds.trainer.loop import Run, log_step

    class Recorder:
        def __init__(self) -> None:
            self.logged: list[tuple[float, float]] = []

        def train_step(self, step: int, loss: float, examples: int, **scalars) -> None:
            self.logged.append((loss, scalars["perturbed_loss"]))

    cfg = load_config(["--task=sst2", "--model=m", "--sam.sam_type=esam"])
    sam_engine = SimpleNamespace(engine=SimpleNamespace(device=torch.device("cpu")))
    run = Run(cfg, None, None, sam_engine, None, Recorder(), TrainerState(step=1), [], "", None)
    for case in PERTURBED_CASES:
        loss, kept = case[rank]
        perturbed = sum(kept) / len(kept) if kept else math.nan
        out = StepOutput(loss, perturbed, StepStats(True, 1.0, 0.05, 0.1), False, len(kept))
        log_step(run, out, lr=1e-3, examples=16, epoch=0.1)
    return run.logger.logged


def test_the_logged_perturbed_loss_is_the_mean_over_the_examples_kept_on_all_ranks(tmp_path):
    """ESAM keeps different numbers of examples on each rank, maybe none: the step logs the mean over
    every example kept in the global batch, not the mean of the ranks' means (nan if one kept none)."""
    from dist_harness import run_distributed

    logged = run_distributed(_logged_losses, 2, tmp_path)
    expected = []
    for case in PERTURBED_CASES:
        kept = [loss for _, losses in case for loss in losses]
        expected += [sum(first for first, _ in case) / 2, sum(kept) / len(kept)]
    for rank_logged in logged:
        assert [value for pair in rank_logged for value in pair] == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------- 6. one run per folder, overwrite, failures

def _popen_train(assets: dict[str, Path], out: Path | None, cwd: Path, *extra: str, **settings) -> subprocess.Popen:
    return subprocess.Popen(fx.train_cmd(train_args(assets, out, *extra, **settings)), cwd=cwd,
                            env=fx.env(PYTHONPATH=str(fx.REPO)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_two_launches_at_once_into_one_folder_one_runs_and_the_other_stops_at_once(assets, tmp_path):
    """The same command twice at once (a job submitted twice): both pick the same default folder. One
    trains; the other exits 2 naming the holder (host, pid, start time) and the fix, and leaves the
    folder to it: one start event, every metrics.jsonl line whole, one run's checkpoints and exports."""
    import socket

    import signal

    launches = [_popen_train(assets, None, tmp_path) for _ in range(2)]
    try:
        outputs = [p.communicate(timeout=TIMEOUT)[0] for p in launches]
    finally:  # a launch that hangs is killed with its children, never left behind
        for p in launches:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    codes = [p.returncode for p in launches]
    assert sorted(codes) == [0, 2], outputs
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    message = error_line(subprocess.CompletedProcess([], 2, outputs[loser], None))
    assert "is in use by another run" in message and "another --output_dir" in message, message
    assert f"host {socket.gethostname()}, pid {launches[winner].pid}, started " in message, message
    (run,) = (tmp_path / "runs").iterdir()
    assert len(fx.events(run, "start")) == 1 and fx.summary(run)["steps"] == 8  # every line parses
    assert not (run / "run.lock").exists()  # released at the end of the run


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint(assets, finished_run, tmp_path):
    """--overwrite=true that fails before its first checkpoint puts the earlier run back byte for byte;
    one killed before it leaves the earlier run in replaced-run/, which a later launch names and which
    the next --overwrite=true run (taking over the killed run's claim) removes once it has a checkpoint."""
    run_a = tmp_path / "a"
    shutil.copytree(finished_run, run_a)
    before = checksums(run_a)

    failing = {**FINISHED, "checkpoint_every": 0, "max_consecutive_skipped": 1, "optim.lr": 1e30,
               "optim.warmup_ratio": 0}
    result = train(assets, run_a, tmp_path, "--overwrite=true", **failing)
    error_line(result, code=3)
    assert "earlier run it was replacing (--overwrite=true) is back" in result.stdout, result.stdout[-3000:]
    assert checksums(run_a) == before

    killed = fx.run(fx.killed_train_cmd(train_args(assets, run_a, "--overwrite=true", **FINISHED)), TIMEOUT,
                    cwd=tmp_path, PYTHONPATH=str(fx.REPO), FSAM_TEST_KILL_AT="1")
    assert killed.returncode == -9, killed.stdout[-3000:]
    assert checksums(run_a / "replaced-run") == {k: v for k, v in before.items()}
    refused = train_here(assets, run_a, tmp_path, **FINISHED)
    message = error_line(refused)
    assert "replaced-run/, a run set aside by an --overwrite=true run" in message, message
    # the killed run's claim was left behind; this launch took it over, then released it
    assert "claimed by a run that is gone" in refused.stdout and "its process no longer exists" in refused.stdout

    result = train(assets, run_a, tmp_path, "--overwrite=true", **FINISHED)
    assert result.returncode == 0, result.stdout[-3000:]
    assert not (run_a / "replaced-run").exists() and fx.summary(run_a)["steps"] == 8


EVALUATION_FAILS = """
import sys
import fsam_ds.trainer.loop as loop, fsam_ds.cli.train

def failing(*args, **kwargs):
    raise IndexError("index out of range in self")

loop.evaluate = failing
sys.argv[0] = "fsam-train"
fsam_ds.cli.train.main()
"""


def test_a_failed_evaluation_loses_no_training(assets, tmp_path):
    """The evaluation after the last step fails (as generation past a model's positions did): the step's
    checkpoint is already on disk, the error says how to resume, and the resumed run evaluates that step,
    exports and ends as an uninterrupted run would."""
    out = tmp_path / "run"
    args = train_args(assets, out)
    result = fx.run([fx.PYTHON, "-c", EVALUATION_FAILS, *args], TIMEOUT, cwd=tmp_path, PYTHONPATH=str(fx.REPO))
    assert result.returncode == 3, result.stdout[-4000:]
    assert "in failing\nIndexError: index out of range in self" in result.stdout  # the cause's traceback
    (message,) = [line for line in result.stdout.splitlines() if line.startswith("fsam-train: error:")]
    assert "the evaluation at step 8 failed (IndexError: index out of range in self)" in message, message
    assert f"saved in {out / 'checkpoints' / 'step8'}" in message and "--resume=true" in message
    verify_folder(out / "checkpoints" / "step8")
    assert not (out / "final").exists() and fx.events(out, "eval") == []

    result = train(assets, out, tmp_path, "--resume=true")
    assert result.returncode == 0, result.stdout[-3000:]
    assert [e["step"] for e in fx.events(out, "eval")] == [8] and fx.summary(out)["steps"] == 8
    verify_folder(out / "final")


FILE_SIZE_LIMIT = """
import resource, signal, sys
import fsam_ds.zero.engine, fsam_ds.cli.train

real = fsam_ds.zero.engine.SAMEngine.save_checkpoint

def limited(self, *args, **kwargs):
    # a file-size limit from the first checkpoint on (DeepSpeed's ops are built and loaded by then):
    # a write past it fails with EFBIG, as a full disk fails with ENOSPC
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    return real(self, *args, **kwargs)

fsam_ds.zero.engine.SAMEngine.save_checkpoint = limited
sys.argv[0] = "fsam-train"
fsam_ds.cli.train.main()
"""


def test_a_checkpoint_that_cannot_be_written_is_reported_and_removed(assets, tmp_path):
    out = tmp_path / "run"
    result = fx.run([fx.PYTHON, "-c", FILE_SIZE_LIMIT, *train_args(assets, out)], TIMEOUT, cwd=tmp_path,
                    PYTHONPATH=str(fx.REPO))
    message = error_line(result, code=3)
    assert f"Could not write '{out / 'checkpoints' / 'step8'}'" in message, message
    assert "disk may be full or a file-size limit reached" in message and "--resume=true" in message
    assert "no earlier checkpoint exists" in message
    assert not (out / "checkpoints" / "step8").exists()  # no half checkpoint left to look intact


def test_a_live_claim_refuses_a_launch_before_anything_is_read(assets, tmp_path):
    import json
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                              "started": "2026-12-01T10:00:00+00:00", "command": "fsam-train x"}))
    message = error_line(train_here(assets, out, tmp_path))
    assert f"pid {os.getpid()}, started 2026-12-01T10:00:00+00:00 with `fsam-train x`" in message, message
    assert sorted(p.name for p in out.iterdir()) == ["run.lock"]


def _rank0_failures(rank: int, world: int) -> list[tuple[str, str]]:
    from fsam_ds.trainer.run_dir import _from_rank0

    def denied() -> None:
        raise PermissionError("run_config.json: permission denied")

    def refused() -> None:
        raise ConfigError("refused on rank 0")

    seen = []
    for compute in (denied, refused):
        try:
            _from_rank0(compute)
            seen.append(("returned", ""))
        except Exception as err:  # what each rank raises
            seen.append((type(err).__name__, str(err)))
    return seen


def test_a_decision_rank_0_cannot_make_stops_every_rank(tmp_path):
    """Rank 0 decides for the folder (resume point, another run); an unexpected error there (a file it may
    not read) is raised on rank 0 and named on the other ranks, which would otherwise wait for its answer
    until the run is killed; a refusal (ConfigError) is the same refusal on every rank."""
    from dist_harness import run_distributed

    rank0, rank1 = run_distributed(_rank0_failures, 2, tmp_path, timeout=120)
    assert rank0[0] == ("PermissionError", "run_config.json: permission denied")
    assert rank1[0][0] == "_Rank0Failed" and "PermissionError: run_config.json: permission denied" in rank1[0][1]
    assert rank0[1] == rank1[1] == ("ConfigError", "refused on rank 0")


def test_a_checkpoint_whose_run_configuration_cannot_be_read_is_refused_by_name(tmp_path):
    from fsam_ds.trainer.run_dir import RUN_CONFIG_FILE, CheckpointDamaged, ResumePoint, RunDir

    folder = tmp_path / "checkpoints" / "step4"
    folder.mkdir(parents=True)
    (folder / RUN_CONFIG_FILE).write_text("{not json")
    run_dir = RunDir(tmp_path, {"task": "sst2"})
    run_dir.point = ResumePoint(folder)
    with pytest.raises(CheckpointDamaged, match=f"its {RUN_CONFIG_FILE} cannot be read"):
        run_dir._refuse_another_run(True)
    (folder / RUN_CONFIG_FILE).unlink()  # a checkpoint written without it is not taken for the same run
    with pytest.raises(CheckpointDamaged, match="FileNotFoundError"):
        run_dir._refuse_another_run(True)
