"""One run per output folder (`fsam_ds.trainer.run_dir`): the claim's rules without training; the
launches that meet a claim are in tests/test_run_safety.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from fsam_ds.sam.config import ConfigError
from fsam_ds.trainer import run_dir
from fsam_ds.trainer.run_dir import CLAIM_FILE, RunClaim, RunFolderClaimed


def _write_claim(folder, **record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CLAIM_FILE).write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", "token": "t", **record}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_claim_is_exclusive_and_released(tmp_path):
    first = RunClaim(tmp_path / "run")
    assert first.acquire() is None
    with pytest.raises(RunFolderClaimed) as refused:
        RunClaim(tmp_path / "run").acquire()
    message = str(refused.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in message
    assert "is in use by another run" in message and "another --output_dir" in message
    first.release()
    assert not (tmp_path / "run" / CLAIM_FILE).exists()
    second = RunClaim(tmp_path / "run")
    assert second.acquire() is None  # free again
    second.release()


def test_a_claim_whose_process_is_gone_is_taken_over(tmp_path):
    _write_claim(tmp_path, host=socket.gethostname(), pid=_dead_pid())
    claim = RunClaim(tmp_path)
    message = claim.acquire()
    assert message is not None and "its process no longer exists" in message and "takes the folder over" in message
    assert json.loads((tmp_path / CLAIM_FILE).read_text())["token"] == claim.token
    claim.release()


def test_a_reused_pid_does_not_keep_a_dead_claim_alive(tmp_path):
    """The pid is alive (this process) but younger than the claim says: another process got the number."""
    start = run_dir._process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc here")
    _write_claim(tmp_path, host=socket.gethostname(), pid=os.getpid(), process_start=start - 1)
    claim = RunClaim(tmp_path)
    assert "its process no longer exists" in claim.acquire()
    claim.release()
    _write_claim(tmp_path, host=socket.gethostname(), pid=os.getpid(), process_start=start)  # the same process
    with pytest.raises(RunFolderClaimed):
        RunClaim(tmp_path).acquire()


def test_another_hosts_claim_is_stale_only_when_its_heartbeat_is_old(tmp_path):
    _write_claim(tmp_path, host="node-17", pid=4242)
    with pytest.raises(RunFolderClaimed, match="host node-17, pid 4242"):
        RunClaim(tmp_path).acquire()
    old = time.time() - run_dir.STALE_AFTER_S - 60
    os.utime(tmp_path / CLAIM_FILE, (old, old))
    claim = RunClaim(tmp_path)
    assert "last refreshed 11 minutes ago" in claim.acquire()
    claim.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(run_dir, "HEARTBEAT_S", 0.05)
    claim = RunClaim(tmp_path)
    claim.acquire()
    old = time.time() - 3600
    os.utime(tmp_path / CLAIM_FILE, (old, old))
    time.sleep(0.5)
    assert time.time() - (tmp_path / CLAIM_FILE).stat().st_mtime < 5
    claim.release()


def test_a_folder_under_a_file_is_refused_with_the_file_named(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=f"'{blocker}' is a file, not a folder"):
        RunClaim(blocker / "run1").acquire()


def test_an_earlier_attempt_of_the_same_elastic_job_is_taken_over_at_once(tmp_path, monkeypatch):
    """torchrun restarted the workers (rank 0 maybe on another node): the claim of restart 0 of the same
    rendezvous is the stopped attempt's; another job's, or the same restart's, is not."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    _write_claim(tmp_path, host="node-3", pid=99, elastic=["job-8", 0])
    with pytest.raises(RunFolderClaimed):
        RunClaim(tmp_path).acquire()
    _write_claim(tmp_path, host="node-3", pid=99, elastic=["job-7", 1])
    with pytest.raises(RunFolderClaimed):
        RunClaim(tmp_path).acquire()
    _write_claim(tmp_path, host="node-3", pid=99, elastic=["job-7", 0])
    claim = RunClaim(tmp_path)
    assert "it was restart 0 of this elastic job, which is now at restart 1" in claim.acquire()
    claim.release()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # the standalone rendezvous: no job identity
    _write_claim(tmp_path, host="node-3", pid=99, elastic=["none", 0])
    with pytest.raises(RunFolderClaimed):
        RunClaim(tmp_path).acquire()
