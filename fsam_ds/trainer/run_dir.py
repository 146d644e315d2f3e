"""The run folder, and its one owner: `RunDir` opens it, decides whether the run resumes, clears or sets
aside what an earlier run left, saves and loads checkpoints, exports models and verifies them.

Layout under the run's output_dir:

    run.lock               the claim of the run that holds the folder (below).
    config.json            the run's configuration as given (`RunDir.start` writes it).
    metrics.jsonl, wandb-run-id
                           what the run logs (`fsam_ds.trainer.metrics_log`).
    checkpoints/step<N>/   DeepSpeed checkpoint plus each rank's SAM state (SAMEngine.save_checkpoint),
                           rng_state_rank<r>.pt per rank, trainer_state.json, run_config.json (the
                           run's configuration, compared on resume) and manifest.json, written last:
                           size and sha256 of every file. A folder without a manifest was cut short
                           (a killed run) and is never resumed from; one whose files differ from it
                           is damaged and is never loaded.
    checkpoints/damaged-step<N>/   a damaged checkpoint that resume=true passed over, kept for inspection.
                           A checkpoint is written before every evaluation (and every checkpoint_every
                           steps), so a failed evaluation or export loses no training.
    replaced-run/          the earlier run an --overwrite=true run set aside, removed at that run's first
                           checkpoint and put back if it fails before (kept if it is killed).
    best/, final/          Hugging Face model folders (`fsam_ds.trainer.export`) with manifest.json and
                           run_config.json, the run's configuration (fsam-predict rebuilds the task from
                           it); best/ also holds best.json with the step and the dev metrics that selected it.

Manifests scale with the ranks. Each rank hashes the checkpoint files it writes right after writing each
(the files DeepSpeed saves through its checkpoint engine, the SAM and RNG states), while they are in its
page cache; rank 0 merges the ranks' entries and hashes only the few small files nobody recorded. On
resume each rank verifies the entries it wrote (by rank, modulo the world size), and the first problem
any rank finds is named on every rank.
Checkpoints assume a file system that every rank sees, as DeepSpeed's do.

Non-finite floats (a dev metric that is nan) are written as in metrics.jsonl, as the strings "nan", "inf"
and "-inf", and read back as floats (`fsam_ds.zero.files.encode_nonfinite`).

One run per output folder: `RunDir.open` claims output_dir exclusively, held by rank 0 for the run's life.

Two launches into one folder (a job submitted twice, a scheduler's requeue while the first attempt
still runs, two identical commands sharing the default folder) would otherwise interleave their
checkpoints, exports and metrics.jsonl lines. The claim is the file `output_dir/run.lock`, created
with O_CREAT | O_EXCL, which is atomic on local file systems and on NFS v3 and later, so of two
launches exactly one gets it; the other stops at once (exit status 2) with the holder's host, pid and
start time. Rank 0 claims and broadcasts the answer, so every rank of the refused launch stops.

A run killed without a chance to release its claim (SIGKILL, a node lost) leaves the file behind. A
later launch takes it over, with a message, when the holder is gone: on the same host its process no
longer exists (or the pid now belongs to a younger process); from another host, which cannot see
that process, when its heartbeat is older than `STALE_AFTER_S`; and at once when it was an earlier
attempt of the same elastic job (torchrun's rendezvous id, a lower restart count), which the elastic
agent stopped before restarting the workers, maybe with rank 0 on another node. The holder refreshes
the file's modification time every `HEARTBEAT_S` from a daemon thread, however long a step or an
evaluation takes.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer.metrics_log import METRICS_FILE, trim_metrics
from fsam_ds.trainer.run_identity import SAFE_TO_CHANGE_ON_RESUME, run_differences
from fsam_ds.zero.engine import EngineStepper
from fsam_ds.zero.files import TMP_SUFFIX, WrittenFiles, file_digest, read_json, write_json

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
RUN_CONFIG_FILE = "run_config.json"
MANIFEST = "manifest.json"
EXPORTS = ("best", "final")
CONFIG_FILE = "config.json"
RUN_FILES = (METRICS_FILE, CONFIG_FILE, "wandb-run-id")
"""The files a run writes at the top of output_dir, beside the folders."""
REPLACED = "replaced-run"
_REPLACED = re.compile(r"^replaced-run(\.\d+)?$")
_TAG = re.compile(r"^step(\d+)$")
# Settings that fix which examples each step sees; resuming with another value would not continue
# the same run.
DATA_ORDER_KEYS = ("world_size", "micro_batch_size", "grad_accum", "seed", "steps_per_epoch")


@dataclass
class TrainerState:
    """Where the run stands; saved as the checkpoint's client state and as trainer_state.json."""

    step: int = 0
    """Optimizer steps done (skipped overflow steps included: they consumed their batches)."""
    epoch: int = 0
    """Epoch of the next step."""
    step_in_epoch: int = 0
    """Steps of `epoch` already done; a resumed run skips that many steps' batches."""
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_eval_step: int | None = None
    last_metrics: dict[str, float] = field(default_factory=dict)
    total_steps: int = 0
    skipped_steps: int = 0
    """Steps whose update was skipped (non-finite gradients or loss), over the whole run."""
    consecutive_skipped: int = 0
    """Skipped steps since the last applied update."""
    sam_steps: int = 0
    """Applied updates that were sharpness-aware (all of them under sam.schedule = always)."""
    data: dict[str, int] = field(default_factory=dict)
    """The DATA_ORDER_KEYS values of the run."""
    eval_pending: bool = False
    """The checkpoint was written before this step's evaluation, which a resumed run runs first."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class CheckpointDamaged(ConfigError):
    """A checkpoint or exported model whose files differ from its manifest."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint or exported model could not be written (a full disk, a file-size limit)."""


# ------------------------------------------------------------------------------------ RNG state

def rng_state() -> dict[str, Any]:
    """Every generator the training step draws from (dropout uses torch's default generator)."""
    from deepspeed.accelerator import get_accelerator

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


# ------------------------------------------------------------------------------------ manifests

def write_manifest(folder: Path, recorded: dict[str, dict[str, Any]] | None = None) -> None:
    """Records the size and sha256 of every file under `folder`; written last and atomically, so a
    folder with a manifest was written completely, and any later change to a file is detected.
    `recorded`: entries the ranks took as they wrote (name relative to `folder` -> bytes, sha256, rank),
    taken as they are; only the other files are read here."""
    recorded = recorded or {}
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
                       and not p.name.endswith(TMP_SUFFIX)):
        name = path.relative_to(folder).as_posix()
        entry = recorded.get(name)
        if entry is None:
            digest = file_digest(path)
            entry = {"bytes": digest.bytes, "sha256": digest.sha256}
        files[name] = entry
    write_json(folder / MANIFEST, {"files": files})


def damage(folder: Path, rank: int = 0, world: int = 1) -> str | None:
    """What is wrong with `folder` against its manifest (one clause naming the file), or None if intact.
    With `world` > 1, only the files of this rank's part (the entries it wrote, by rank modulo `world`;
    an entry without a rank by its position) are read: see `RunDir.damage` for the whole verdict."""
    found = _damage_in_part(folder, rank, world)
    return None if found is None else found[1]


def _damage_in_part(folder: Path, rank: int, world: int) -> tuple[int, str] | None:
    """(position in the manifest, problem) of the first problem in this rank's part of `folder`."""
    try:
        files = read_json(folder / MANIFEST)["files"]
        entries = [(name, int(entry["bytes"]), str(entry["sha256"]), entry.get("rank", i))
                   for i, (name, entry) in enumerate(files.items())]
    except FileNotFoundError:
        return -1, f"{MANIFEST} is missing"
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return -1, f"{MANIFEST} is unreadable"
    for i, (name, size, digest, owner) in enumerate(entries):
        if int(owner) % world != rank:
            continue
        path = folder / name
        if not path.is_file():
            return i, f"{name} is missing"
        if path.stat().st_size != size:
            return i, f"{name} has {path.stat().st_size} bytes where the manifest records {size}"
        if file_digest(path).sha256 != digest:
            return i, f"{name} does not match the sha256 its manifest records"
    return None


def verify_folder(folder: str | os.PathLike) -> None:
    """Raises CheckpointDamaged if a checkpoint or exported model folder differs from its manifest."""
    folder = Path(folder)
    problem = damage(folder)
    if problem is not None:
        raise CheckpointDamaged(f"{str(folder)!r} is damaged: {problem}. Its files were changed after they were "
                                "written (disk or copy error); use another copy of it.")


# ------------------------------------------------------------------------------------ collectives

def failed_anywhere(error: BaseException | None) -> bool:
    """Collective: whether any rank's write failed, so that every rank stops at the same point."""
    flag = torch.tensor([float(error is not None)])
    dist.all_reduce(flag)
    return bool(flag.item())


def write_failed(what: Path, error: BaseException | None, kept: str) -> CheckpointWriteFailed:
    cause = (f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}" if error is not None
             else "another rank's write failed")
    return CheckpointWriteFailed(
        f"Could not write {str(what)!r} ({cause}): the disk may be full or a file-size limit reached. The partly "
        f"written folder was removed; {kept} Free space (or raise the limit), then continue with the same command "
        "and --resume=true.")


class _Rank0Failed(RuntimeError):
    """What the other ranks raise when rank 0's part of a collective decision failed unexpectedly."""


def _from_rank0(compute: Callable[[], Any]) -> Any:
    """Rank 0's `compute()` on every rank (its view of the folder decides); a ConfigError it raises is
    raised on every rank, and any other error on rank 0 stops the other ranks too (none waits for it)."""
    answer: list[Any] = [None]
    failed: Exception | None = None
    if dist.get_rank() == 0:
        try:
            answer = [compute()]
        except ConfigError as err:
            answer = [err]
        except Exception as err:
            failed, answer = err, [_Rank0Failed(f"rank 0 failed reading the run folder: {type(err).__name__}: {err}")]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if failed is not None:
        raise failed
    if isinstance(answer[0], (ConfigError, _Rank0Failed)):
        raise answer[0]
    return answer[0]


# ------------------------------------------------------------------------------------ checkpoints

def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoints/step<N> under `root`, complete or not, oldest first."""
    matches = [(_TAG.match(folder.name), folder) for folder in (root.iterdir() if root.is_dir() else [])]
    return sorted((int(match.group(1)), folder) for match, folder in matches if match)


def _complete(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under `root` (its manifest written), oldest first."""
    return [(step, folder) for step, folder in _step_folders(root) if (folder / MANIFEST).is_file()]


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, and the damaged newer ones it passed over (resume=true)."""

    folder: Path | None
    damaged: list[tuple[Path, str]] = field(default_factory=list)


def _named_checkpoint(resume: str) -> list[Path]:
    """The checkpoint a `--resume=PATH` names (or the newest under it), then its complete siblings, newest
    first: the ones to suggest if it is damaged."""
    path = Path(resume)
    if (path / MANIFEST).is_file() or (path / STATE_FILE).is_file():
        folder = path
    else:
        found = [f for root in (path / CHECKPOINT_DIR, path) for _, f in _complete(root)[-1:]]
        if not found:
            raise ConfigError(f"resume = {str(resume)!r} holds no complete checkpoint: give a checkpoint folder "
                              f"(checkpoints/step<N> with {MANIFEST}), the checkpoints folder or a run's output_dir, "
                              "or resume=true to continue from the newest checkpoint in output_dir.")
        folder = found[0]
    return [folder] + [f for _, f in reversed(_complete(folder.parent)) if f != folder]


def _run_held(out: Path) -> list[str]:
    """What out holds of a run: its complete checkpoints and its final model (a best/ alone is what a run
    killed before its first checkpoint leaves)."""
    held = [f"checkpoints up to step {found[-1][0]}" for found in [_complete(out / CHECKPOINT_DIR)] if found]
    return held + (["final/"] if (out / "final").is_dir() else [])


def replaced_runs(output_dir: str | os.PathLike) -> list[Path]:
    """The runs `RunDir._set_aside_earlier_run` moved into replaced-run*/ whose replacement never checkpointed."""
    out = Path(output_dir)
    return sorted(p for p in (out.iterdir() if out.is_dir() else []) if p.is_dir() and _REPLACED.match(p.name))


def earlier_run(output_dir: str | os.PathLike) -> list[str]:
    """What output_dir holds of another run that a fresh run must not replace unasked: its complete
    checkpoints, its final model, and an earlier run set aside by an --overwrite=true run that never
    reached its first checkpoint. Empty for a new folder."""
    out = Path(output_dir)
    return _run_held(out) + [f"{folder.name}/, a run set aside by an --overwrite=true run that was stopped before "
                             "its first checkpoint (move its files back into output_dir to keep it)"
                             for folder in replaced_runs(out)]


# ------------------------------------------------------------------------------------ the claim

CLAIM_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


class RunFolderClaimed(ConfigError):
    """output_dir is held by a run that is still alive; fsam-train exits with status 2."""


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), which tells a pid reused by a younger
    process from the one that claimed; None where /proc does not say."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _elastic_attempt() -> tuple[str, int] | None:
    """(rendezvous id, restart count) under torchrun with a named rendezvous; None otherwise (the standalone
    rendezvous id "none" is shared by unrelated jobs)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id in ("", "none"):
        return None
    try:
        return run_id, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return None


def _alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    current = _process_start(pid)
    return started is None or current is None or current == started


class RunClaim:
    """Rank 0's claim on a run folder: `acquire` or `RunFolderClaimed`, then `release` (idempotent)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / CLAIM_FILE
        self.token = uuid.uuid4().hex
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": _process_start(os.getpid()),
                       "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       "command": " ".join(sys.argv), "token": self.token, "elastic": _elastic_attempt()}
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire
    def acquire(self) -> str | None:
        """Creates the claim; returns a message when it took over a stale one, raises RunFolderClaimed when
        a live run holds the folder, ConfigError when the folder cannot be created or written."""
        self._make_folder()
        took_over = None
        for _ in range(3):  # a stale claim removed by us (or by a concurrent launch) lets the next try succeed
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                reason = self._stale(holder)
                if reason is None:
                    raise RunFolderClaimed(self._refusal(holder)) from None
                self._remove_stale(holder)
                took_over = (f"output_dir = {str(self.folder)!r} was claimed by a run that is gone "
                             f"({self._describe(holder)}; {reason}); this run takes the folder over.")
                continue
            except OSError as err:
                raise ConfigError(f"output_dir = {str(self.folder)!r} cannot be written ({err.strerror}: "
                                  f"{err.filename}). Pass an --output_dir this user can write to.") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.record, f)
            self._heartbeat = threading.Thread(target=self._beat, name="fsam-run-claim", daemon=True)
            self._heartbeat.start()
            return took_over
        raise RunFolderClaimed(self._refusal(self._read_holder()))

    def _make_folder(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            blocker = next((p for p in [self.folder, *self.folder.parents] if p.exists() and not p.is_dir()), None)
            where = f"{str(blocker)!r} is a file, not a folder" if blocker else "a part of the path is not a folder"
            raise ConfigError(f"output_dir = {str(self.folder)!r} cannot be created: {where}. Pass another "
                              "--output_dir, or move that file away.") from None
        except OSError as err:
            raise ConfigError(f"output_dir = {str(self.folder)!r} cannot be created ({err.strerror}). Pass an "
                              "--output_dir this user can write to.") from None

    def _read_holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            holder = holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            holder = {}  # being written this instant, or emptied by hand
        try:
            holder["_heartbeat"] = self.path.stat().st_mtime
        except OSError:
            holder["_heartbeat"] = None
        return holder

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        beat = holder.get("_heartbeat")
        if beat is None:
            return "its claim file vanished"
        ours, theirs = _elastic_attempt(), holder.get("elastic")
        if ours and isinstance(theirs, list) and len(theirs) == 2 and theirs[0] == ours[0] and theirs[1] < ours[1]:
            return f"it was restart {theirs[1]} of this elastic job, which is now at restart {ours[1]}"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return None if _alive(holder["pid"], holder.get("process_start")) else "its process no longer exists"
        age = time.time() - beat
        if age > STALE_AFTER_S:
            return f"its claim was last refreshed {age / 60:.0f} minutes ago"
        return None

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        # rename first: of two launches taking over the same stale claim, only one rename succeeds
        aside = self.path.with_name(f"{CLAIM_FILE}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {}
        if isinstance(moved, dict) and moved.get("token") and moved.get("token") != holder.get("token"):
            os.rename(aside, self.path)  # a live run claimed between our read and the rename: give it back
            return
        aside.unlink(missing_ok=True)

    def _describe(self, holder: dict[str, Any]) -> str:
        if not holder.get("host"):
            return "holder unknown: the claim file is empty or being written"
        return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"

    def _refusal(self, holder: dict[str, Any]) -> str:
        command = f" with `{holder['command']}`" if holder.get("command") else ""
        return (f"output_dir = {str(self.folder)!r} is in use by another run ({self._describe(holder)}{command}). "
                "Two runs in one folder would overwrite each other's checkpoints and exports. Wait for that run "
                "to end, or pass another --output_dir. If that run is gone (its node lost), delete "
                f"{str(self.path)!r}; a claim whose process is gone on this host, or whose heartbeat is older "
                f"than {STALE_AFTER_S / 60:.0f} minutes, is taken over by the next launch.")

    # ------------------------------------------------------------------ hold and release
    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the claim was removed by hand; the run goes on, its folder unprotected

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
            if self._read_holder().get("token") == self.token:
                self.path.unlink(missing_ok=True)


class _Held:
    """What `claim_output_dir` hands every rank: rank 0's claim, or nothing on the other ranks."""

    def __init__(self, claim: RunClaim | None) -> None:
        self.claim = claim

    def __enter__(self) -> _Held:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.claim is not None:
            self.claim.release()


def claim_output_dir(output_dir: str | os.PathLike, rank: int) -> _Held:
    """Collective: rank 0 claims `output_dir` and every rank gets the answer (`_from_rank0`); use as a context
    manager around the run. Raises RunFolderClaimed (or ConfigError for a folder that cannot be made) on every
    rank."""
    claim = RunClaim(output_dir) if rank == 0 else None
    took_over = _from_rank0(lambda: claim.acquire())
    if claim is not None and took_over:
        print(f"warning: {took_over}", file=sys.stderr, flush=True)
    return _Held(claim)


# ------------------------------------------------------------------------------------ the owner

class RunDir:
    """The run folder of one run (every rank holds one): opened by `RunDir.open`, which claims it and
    decides where the run starts; `start` then lets the run change what the folder holds, once the
    whole run has been checked and built. Nothing in it is deleted, cut or replaced before that; an
    earlier run that --overwrite=true replaces is set aside until this run's first checkpoint is on disk,
    and put back if the run fails before."""

    def __init__(self, output_dir: str | os.PathLike, run_config: dict[str, Any]) -> None:
        self.root = Path(output_dir)
        self.run_config = run_config
        """The run's configuration (`config_to_dict`), written into each checkpoint and export."""
        self.output_dir = str(output_dir)
        """As the run's configuration gives it, for messages."""
        self.point = ResumePoint(None)
        self.replaced: Path | None = None
        """Where the earlier run that this --overwrite=true run replaces waits (rank 0 only)."""
        self.replacing = False
        """An earlier run set aside waits for this run's first checkpoint to be removed (every rank)."""
        self.saved = False
        """This run has written a checkpoint: an earlier run it replaced is gone for good."""
        self.notes: list[str] = []
        """What `start` did, for the run's console."""

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINT_DIR

    def step_folder(self, step: int) -> Path:
        return self.checkpoints / f"step{step}"

    @property
    def metrics_file(self) -> Path:
        return self.root / METRICS_FILE

    # ---------------------------------------------------------------- opening
    @classmethod
    @contextmanager
    def open(cls, output_dir: str | os.PathLike, resume: bool | str, overwrite: bool, run_config: dict[str, Any],
             rank: int) -> Iterator[RunDir]:
        """Collective: claims output_dir for the run's life (a second launch into it stops at once), finds
        the checkpoint to resume from (`--resume`; verified against its manifest, each rank reading its part),
        refuses to start afresh over another run unless --overwrite=true, and checks that a resumed run
        continues the same run. Nothing is written but the claim. If the run fails before its first
        checkpoint, the earlier run it was replacing comes back."""
        with claim_output_dir(output_dir, rank):
            run_dir = cls(output_dir, run_config)
            run_dir.point = run_dir._resume_point(resume)
            if run_dir.point.folder is not None or not overwrite:
                _from_rank0(lambda: run_dir._refuse_another_run(resume))
            try:
                yield run_dir
            except BaseException:
                run_dir._put_back_replaced()
                raise

    def _resume_point(self, resume: bool | str) -> ResumePoint:
        """The checkpoint `--resume` names, verified: true = the newest intact one in output_dir (none if
        there is none yet, so a resubmitted job starts fresh; damaged newer ones are reported in `damaged`);
        a path = that checkpoint, or the newest under it, which must be intact."""
        if resume is False:
            return ResumePoint(None)
        if resume is True:
            folders = _from_rank0(lambda: [f for _, f in reversed(_complete(self.checkpoints))])
            damaged = []
            for folder in folders:
                problem = self.damage(folder)
                if problem is None:
                    return ResumePoint(folder, damaged)
                damaged.append((folder, problem))
            if damaged:
                raise CheckpointDamaged(f"Cannot resume from {str(self.checkpoints)!r}: every checkpoint in it is "
                                        "damaged (" + "; ".join(f"{f.name}: {p}" for f, p in damaged) + "). Restore "
                                        "them from a copy, or start afresh with --resume=false --overwrite=true.")
            return ResumePoint(None)
        folder, *siblings = _from_rank0(lambda: _named_checkpoint(resume))
        problem = self.damage(folder)
        if problem is not None:
            intact = next((f for f in siblings if self.damage(f) is None), None)
            fix = (f"Resume from the newest intact checkpoint with --resume={intact}" if intact
                   else "No other intact checkpoint is next to it; restore it from a copy or start afresh")
            raise CheckpointDamaged(f"Checkpoint {str(folder)!r} is damaged: {problem}, so resuming from it would "
                                    f"load corrupt state. {fix}.")
        return ResumePoint(folder)

    @staticmethod
    def damage(folder: Path) -> str | None:
        """Collective: what is wrong with `folder` against its manifest, or None if intact. Each rank reads
        the files of its part; the first problem in the manifest's order is the answer on every rank."""
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = _damage_in_part(folder, rank, world)
        found: list[Any] = [mine]
        if world > 1:
            found = [None] * world
            dist.all_gather_object(found, mine)
        problems = sorted(f for f in found if f is not None)
        return problems[0][1] if problems else None

    def _refuse_another_run(self, resume: bool | str) -> None:
        """Raises ConfigError when the run would not continue its own run: resumed, when this run sets a
        run-defining setting (see `fsam_ds.trainer.run_identity`) differently from the checkpoint's run (the
        other settings are applied on resume); started afresh, when output_dir holds another run, whose
        differing settings the message lists."""
        checkpoint = self.point.folder
        if checkpoint is not None:
            try:
                saved = read_json(checkpoint / RUN_CONFIG_FILE)
            except (OSError, ValueError) as err:
                raise CheckpointDamaged(f"Cannot resume from {str(checkpoint)!r}: its {RUN_CONFIG_FILE} cannot be read "
                                        f"({type(err).__name__}), so whether this command continues the same run "
                                        "cannot be checked. Resume from another checkpoint, or start afresh in "
                                        "another output_dir.") from None
            differences = run_differences(saved, self.run_config)
            if differences:
                raise ConfigError(f"Cannot resume from {str(checkpoint)!r}: this command changes settings that "
                                  f"define the run ({'; '.join(differences)}). A resumed run must continue the same "
                                  "run, so these are never applied midway. Resume with the checkpoint's values (its "
                                  f"{RUN_CONFIG_FILE}), or start a new run in another output_dir. Settings that may "
                                  f"change on resume: {', '.join(SAFE_TO_CHANGE_ON_RESUME)} (a trailing dot: the "
                                  "whole section).")
            return
        held = earlier_run(self.root)
        if not held:
            return
        config_file, differences = self.root / CONFIG_FILE, []
        if config_file.is_file():
            try:
                differences = run_differences(read_json(config_file), self.run_config)
            except (ValueError, AttributeError):
                differences = [f"its {CONFIG_FILE} is unreadable"]
        differ = f" Its settings differ from this run's: {'; '.join(differences)}." if differences else ""
        raise ConfigError(f"output_dir = {self.output_dir!r} holds another run ({', '.join(held)}) and this run "
                          f"starts afresh (resume = {resume}), which would replace it.{differ} Pass "
                          "--resume=true to continue that run, --overwrite=true to replace it, or another "
                          "--output_dir (the default one, runs/{task}-{sam_type}-s{seed}-{config_hash}, differs "
                          "for every setting that can change the result).")

    # ---------------------------------------------------------------- the start
    def start(self, sam_engine: EngineStepper, order: dict[str, int], total_steps: int,
              frozen_base: bool = False) -> tuple[TrainerState, dict[str, Any] | None]:
        """Collective, once the run is built and checked: the trainer state (and this rank's RNG state) the
        run starts from, loaded from the resume point or fresh; then the folder is taken over: damaged
        checkpoints passed over are set aside; a fresh run sets aside (--overwrite=true) or clears what an
        earlier run left; a resumed run drops the checkpoints and metrics after its step."""
        checkpoint = self.point.folder
        state, rng = TrainerState(total_steps=total_steps, data=order), None
        if checkpoint is not None:
            state, rng = load_checkpoint(sam_engine, checkpoint, order, total_steps, frozen_base=frozen_base)
        if dist.get_rank() == 0:  # everything is checked: from here on the run may change what output_dir holds
            for folder, problem in self.point.damaged:
                print(f"warning: checkpoint {folder} is damaged ({problem}); resuming from the newest intact one, "
                      f"{checkpoint}. The damaged one is kept as {_set_aside(folder)}.", file=sys.stderr, flush=True)
            if checkpoint is None:
                self.replaced = self._set_aside_earlier_run()  # --overwrite=true: kept until the first checkpoint
                self._clear()  # what is left: leftovers of a killed attempt
            else:
                self._discard_after(state.step)
                trim_metrics(self.metrics_file, state.step, keep_eval=not state.eval_pending)
            # the configuration as given, for a person and for the next launch into this folder to compare
            write_json(self.root / CONFIG_FILE, self.run_config)
        # runs set aside earlier (by this run, or by an --overwrite=true run killed before its first
        # checkpoint) go once this run has a checkpoint; a fresh run gets here with them only under
        # --overwrite=true
        replacing = [dist.get_rank() == 0 and checkpoint is None and bool(replaced_runs(self.root))]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(replacing, src=0)  # every rank keeps step with rank 0's collectives
        self.replacing = replacing[0]
        if checkpoint is not None:
            self.notes.append(f"resumed from {checkpoint} at step {state.step} (epoch {state.epoch})")
        if self.replaced is not None:
            self.notes.append(f"the earlier run in {self.root} is set aside in {self.replaced} until this run's "
                              "first checkpoint")
        return state, rng

    def _discard_after(self, step: int) -> None:
        """Removes the checkpoints of steps after `step` (a run resumed from an older checkpoint replaces
        that future); rank 0 only."""
        for n, folder in _step_folders(self.checkpoints):
            if n > step:
                shutil.rmtree(folder, ignore_errors=True)

    def _clear(self) -> None:
        """Removes what a run writes (its checkpoints, exported models, metrics.jsonl, config.json) when a run
        starts afresh; rank 0 only, after the whole new run has been checked and built, and after an earlier
        run worth keeping was set aside."""
        for name in (CHECKPOINT_DIR, *EXPORTS):
            shutil.rmtree(self.root / name, ignore_errors=True)
        for name in RUN_FILES:  # wandb-run-id among them: the new run is a new wandb run
            (self.root / name).unlink(missing_ok=True)

    def _set_aside_earlier_run(self) -> Path | None:
        """--overwrite=true: moves the earlier run in output_dir (if it holds one) into replaced-run/
        (replaced-run.1, ... if taken), where it stays until the new run's first checkpoint is on disk or the
        new run fails and puts it back; rank 0 only."""
        if not _run_held(self.root):
            return None
        target, suffix = self.root / REPLACED, 1
        while target.exists():
            target, suffix = self.root / f"{REPLACED}.{suffix}", suffix + 1
        target.mkdir()
        for name in (CHECKPOINT_DIR, *EXPORTS, *RUN_FILES):
            if (self.root / name).exists():
                os.replace(self.root / name, target / name)
        return target

    def _put_back_replaced(self) -> None:
        """Undoes `_set_aside_earlier_run` for a new run that failed before its first checkpoint: the new
        run's files go, the earlier run's come back; rank 0 only."""
        if self.replaced is None or self.saved:
            return
        self._clear()
        for item in self.replaced.iterdir():
            os.replace(item, self.root / item.name)
        self.replaced.rmdir()
        print(f"fsam-train: this run stopped before its first checkpoint, so the earlier run it was replacing "
              f"(--overwrite=true) is back in {self.root}.", file=sys.stderr, flush=True)

    # ---------------------------------------------------------------- checkpoints
    def save(self, sam_engine: EngineStepper, state: TrainerState, keep: int, frozen_base: bool = False) -> Path:
        """Collective: `save_checkpoint` into checkpoints/step<N>; the first one also removes the earlier run
        an --overwrite=true run set aside, since this run can now be resumed instead."""
        folder = save_checkpoint(sam_engine, self.root, state, keep, self.run_config, frozen_base=frozen_base)
        self.saved = True
        if self.replacing:
            if dist.get_rank() == 0:
                for aside in replaced_runs(self.root):
                    shutil.rmtree(aside, ignore_errors=True)
            self.replacing = False
        return folder

    def export(self, name: str, engine: Any, tokenizer: Any, info: dict, adapters: bool = False,
               merged: Any = None) -> Path:
        """Collective: output_dir/`name` (best, final), a model folder `fsam_ds.trainer.export` writes."""
        from fsam_ds.trainer.export import export_model  # the writer uses this module's files and manifests

        return export_model(engine, tokenizer, self.root / name, info, self.run_config, adapters=adapters,
                            merged=merged)


def _set_aside(folder: Path) -> Path:
    """Renames a damaged checkpoint to damaged-step<N> (kept for inspection, never pruned); rank 0 only."""
    target = folder.with_name(f"damaged-{folder.name}")
    suffix = 1
    while target.exists():
        target, suffix = folder.with_name(f"damaged-{folder.name}.{suffix}"), suffix + 1
    os.replace(folder, target)
    return target


def save_checkpoint(sam_engine: EngineStepper, output_dir: str | os.PathLike, state: TrainerState, keep: int,
                    run_config: dict[str, Any], frozen_base: bool = False) -> Path:
    """Collective: every rank writes its shard and RNG state, hashing each file right after writing it; rank 0
    writes the trainer state and the run's configuration, merges the ranks' entries into the manifest that
    marks the checkpoint complete (written last), then prunes. `frozen_base` (LoRA): the frozen weights
    are left out, since the resumed run loads them from its model again.

    A write that fails on any rank (a full disk, a file-size limit) stops every rank with
    CheckpointWriteFailed: the folder, which has no manifest and would never be resumed from, is removed,
    and the message names the newest complete checkpoint. A rank that fails inside DeepSpeed's save while
    another waits in one of its collectives cannot be told apart from a slow rank; on a shared file system
    a full disk fails every rank's write."""
    root = Path(output_dir) / CHECKPOINT_DIR
    tag = f"step{state.step}"
    folder = root / tag
    rank, world = dist.get_rank(), dist.get_world_size()
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (folder / MANIFEST).unlink(missing_ok=True)  # an older attempt at this step is not complete
    dist.barrier()
    error: BaseException | None = None
    written = WrittenFiles()
    try:
        written.save(rng_state(), folder / f"rng_state_rank{rank}.pt")
        sam_engine.save_checkpoint(root, tag=tag, client_state={"trainer": asdict(state)},
                                   exclude_frozen_parameters=frozen_base, written=written)
    except (OSError, RuntimeError) as err:  # torch.save reports a short write as a RuntimeError
        error = err
    failed = failed_anywhere(error)  # also: every rank's files are on disk before the folder is marked complete
    entries = _entries(written, folder, rank)
    gathered: list[Any] = [entries]
    if world > 1 and not failed:
        gathered = [None] * world
        dist.all_gather_object(gathered, entries)
    if rank == 0 and not failed:
        try:
            write_json(folder / STATE_FILE, asdict(state))
            write_json(folder / RUN_CONFIG_FILE, run_config)
            write_manifest(folder, {name: entry for part in gathered for name, entry in part.items()})
        except OSError as err:
            error = err
    if failed_anywhere(error if rank == 0 else None) or failed:
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        newest = _complete(root)
        kept = (f"the newest complete checkpoint is {newest[-1][1]}." if newest else
                "no earlier checkpoint exists, so a relaunch starts from the beginning.")
        raise write_failed(folder, error, kept)
    if rank == 0:
        _prune(root, keep)
    dist.barrier()
    return folder


def _entries(written: WrittenFiles, folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """This rank's manifest entries: the files it wrote into `folder`, with their digests and its rank."""
    base, out = folder.resolve(), {}
    for path, digest in written.files.items():
        path = path.resolve()
        if base in path.parents:
            out[path.relative_to(base).as_posix()] = {"bytes": digest.bytes, "sha256": digest.sha256, "rank": rank}
    return out


def _prune(root: Path, keep: int) -> None:
    """Removes all but the `keep` newest complete checkpoints, and the leftovers of saves cut short."""
    kept = {folder for _, folder in _complete(root)[-keep:]}
    for _, folder in _step_folders(root):
        if folder not in kept:
            shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(sam_engine: EngineStepper, folder: Path, expected: dict[str, int], total_steps: int,
                    frozen_base: bool = False) -> tuple[TrainerState, dict[str, Any]]:
    """Restores engine and SAM state; returns the trainer state and this rank's RNG state (to be set
    right before training continues). Every check runs before the first collective, on every rank.
    `frozen_base`: the checkpoint lacks the frozen weights (`save_checkpoint`), which the model has."""
    state = TrainerState.from_dict(read_json(folder / STATE_FILE))
    changed = [f"{key} {state.data.get(key)} -> {expected[key]}" for key in DATA_ORDER_KEYS
               if state.data.get(key) != expected[key]]
    if changed:
        raise ConfigError(f"Cannot resume from {str(folder)!r}: {', '.join(changed)}. These settings decide "
                          "which examples each step sees (and how ZeRO shards the state), so the resumed run "
                          "would not continue the same run. Resume with the checkpoint's values (see its "
                          f"{STATE_FILE}).")
    rng_file = folder / f"rng_state_rank{dist.get_rank()}.pt"
    if not rng_file.is_file():
        raise ConfigError(f"Checkpoint {str(folder)!r} has no {rng_file.name}; it was written by another number "
                          "of ranks. Resume with the checkpoint's world size.")
    sam_engine.load_checkpoint(folder.parent, tag=folder.name, load_module_strict=not frozen_base)
    if state.total_steps != total_steps:
        if dist.get_rank() == 0:
            print(f"warning: the checkpoint was written by a run of {state.total_steps} steps, this one has "
                  f"{total_steps}; the learning-rate schedule changes from step {state.step} on.", flush=True)
        state.total_steps = total_steps
    return state, torch.load(rng_file, weights_only=False)
