"""One run per output folder: an exclusive claim on output_dir, held by rank 0 for the run's life.

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
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch.distributed as dist

from fsam_ds.sam.config import ConfigError

__all__ = ["CLAIM_FILE", "HEARTBEAT_S", "STALE_AFTER_S", "RunClaim", "RunFolderClaimed", "claim_output_dir"]

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
    """Collective: rank 0 claims `output_dir` and every rank gets the answer; use as a context manager
    around the run. Raises RunFolderClaimed (or ConfigError for a folder that cannot be made) on every rank."""
    answer: list[Any] = [None]
    claim = RunClaim(output_dir) if rank == 0 else None
    if claim is not None:
        try:
            took_over = claim.acquire()
            if took_over:
                print(f"warning: {took_over}", file=sys.stderr, flush=True)
        except ConfigError as err:
            answer = [err]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if isinstance(answer[0], ConfigError):
        raise answer[0]
    return _Held(claim)
