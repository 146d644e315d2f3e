"""Launcher command lines, hostfiles, the launch/ scripts (run against fake launchers) and the recipe YAMLs."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from fsam_ds.cli import launch
from fsam_ds.sam.config import ConfigError
from fsam_ds.cli.launch import (HostfileError, LaunchCommand, SlurmNode, check_node_rank, deepspeed_command,
                            hostfile_command, hostfile_text, parse_hostfile, slurm_command, slurm_hosts, slurm_node,
                            torchrun_command)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TRAIN = ["--config", "c.yaml", "--sam.rho=0.05"]
SCRIPTS = ["deepspeed_single_node.sh", "torchrun.sh", "multinode_hostfile.sh", "local_two_nodes.sh",
           "_common.sh", "slurm.sbatch"]


# ---------------------------------------------------------------- builders


def test_deepspeed_single_node():
    cmd = deepspeed_command(2, TRAIN, omp_threads=4)
    assert cmd.argv == ["deepspeed", "--num_gpus", "2", "--master_port", "29500", "--module", "fsam_ds.train",
                        *TRAIN]
    assert cmd.env == {"OMP_NUM_THREADS": "4"}
    assert cmd.shell() == ("OMP_NUM_THREADS=4 deepspeed --num_gpus 2 --master_port 29500 --module fsam_ds.train "
                           "--config c.yaml --sam.rho=0.05")


def test_torchrun_single_node_standalone_or_fixed_port():
    assert torchrun_command(4, TRAIN).argv == ["torchrun", "--nproc_per_node", "4", "--standalone",
                                              "-m", "fsam_ds.train", *TRAIN]
    assert torchrun_command(2, [], master_port=29600, omp_threads=None).argv == [
        "torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "29600",
        "-m", "fsam_ds.train"]
    assert torchrun_command(2, [], omp_threads=None).env == {}


def test_torchrun_static_multinode():
    cmd = torchrun_command(8, TRAIN, nnodes=2, node_rank=1, master_addr="10.0.0.1", master_port=29501)
    assert cmd.argv == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
                        "--master_addr", "10.0.0.1", "--master_port", "29501", "-m", "fsam_ds.train", *TRAIN]
    with pytest.raises(ConfigError, match="master_addr"):
        torchrun_command(8, TRAIN, nnodes=2, node_rank=0)
    with pytest.raises(HostfileError, match="node_rank is 2 but there are only 2 nodes"):
        torchrun_command(8, TRAIN, nnodes=2, node_rank=2, master_addr="a")


def test_hostfile_ssh_and_no_ssh():
    ssh = hostfile_command("hf", TRAIN, master_addr="worker-0", master_port=29502)
    assert ssh.argv == ["deepspeed", "--hostfile", "hf", "--master_addr", "worker-0", "--master_port", "29502",
                        "--module", "fsam_ds.train", *TRAIN]
    per_node = hostfile_command("hf", TRAIN, master_addr="10.0.0.1", node_rank=1, nproc=4)
    assert per_node.argv == ["deepspeed", "--hostfile", "hf", "--master_addr", "10.0.0.1", "--master_port", "29500",
                             "--no_ssh", "--node_rank", "1", "--num_gpus", "4", "--module", "fsam_ds.train", *TRAIN]
    with pytest.raises(ConfigError, match="master_addr"):
        hostfile_command("hf", TRAIN, master_addr="")


@pytest.mark.parametrize("call,needle", [
    (lambda: deepspeed_command(0, []), "nproc is 0"),
    (lambda: deepspeed_command(2, [], master_port=70000), "master_port is 70000"),
    (lambda: deepspeed_command(2, [], omp_threads=0), "omp_threads is 0"),
    (lambda: hostfile_command("hf", [], master_addr="a", node_rank=-1), "node_rank is -1"),
])
def test_builder_argument_errors(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()


def test_omp_threads_per_rank():
    assert launch.omp_threads_per_rank(2, cpus=16) == 8
    assert launch.omp_threads_per_rank(4, cpus=2) == 1


def test_shell_quotes_arguments():
    cmd = LaunchCommand(["torchrun", "--run_name=a b", "x'y"], {"OMP_NUM_THREADS": "2"})
    assert cmd.shell() == "OMP_NUM_THREADS=2 torchrun '--run_name=a b' 'x'\"'\"'y'"
    assert cmd.full_env({"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "2"}


# ---------------------------------------------------------------- SLURM

SLURM_ENV = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}


def test_slurm_node_reads_the_environment():
    assert slurm_node(SLURM_ENV) == SlurmNode(nnodes=2, node_rank=1, nproc=8, job_id="4242", nodelist="gpu[07-08]")
    no_gpus = {k: v for k, v in SLURM_ENV.items() if k != "SLURM_GPUS_ON_NODE"}
    assert slurm_node({**no_gpus, "SLURM_NTASKS_PER_NODE": "4(x2)"}).nproc == 4
    assert slurm_node(SLURM_ENV, nproc=2).nproc == 2
    assert slurm_node({k: v for k, v in no_gpus.items() if k != "SLURM_NTASKS_PER_NODE"}).nproc == 1


@pytest.mark.parametrize("env,needle", [
    ({k: v for k, v in SLURM_ENV.items() if k != "SLURM_NODEID"}, "SLURM_NODEID is not set"),
    ({**SLURM_ENV, "SLURM_NODEID": "2"}, "node_rank is 2 but there are only 2 nodes"),
    ({**SLURM_ENV, "SLURM_NNODES": "two"}, "cannot read a count from SLURM value 'two'"),
])
def test_slurm_node_errors(env, needle):
    with pytest.raises(ConfigError, match=needle):
        slurm_node(env)


def test_slurm_torchrun_uses_c10d_rendezvous_on_the_first_host():
    cmd = slurm_command(slurm_node(SLURM_ENV), TRAIN, master_addr="gpu07", master_port=29503, omp_threads=8)
    assert cmd.argv == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8", "--rdzv_id", "4242",
                        "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu07:29503", "-m", "fsam_ds.train", *TRAIN]
    assert cmd.env == {"OMP_NUM_THREADS": "8"}


def test_slurm_deepspeed_runs_one_no_ssh_launcher_per_node():
    cmd = slurm_command(slurm_node(SLURM_ENV), TRAIN, master_addr="gpu07", launcher="deepspeed", hostfile="/tmp/hf")
    assert cmd.argv == ["deepspeed", "--hostfile", "/tmp/hf", "--master_addr", "gpu07", "--master_port", "29500",
                        "--no_ssh", "--node_rank", "1", "--module", "fsam_ds.train", *TRAIN]
    with pytest.raises(ConfigError, match="needs a hostfile"):
        slurm_command(slurm_node(SLURM_ENV), TRAIN, master_addr="gpu07", launcher="deepspeed")
    with pytest.raises(ConfigError, match="launcher is 'mpirun'"):
        slurm_command(slurm_node(SLURM_ENV), TRAIN, master_addr="gpu07", launcher="mpirun")


def test_slurm_hosts_asks_scontrol():
    calls = []

    def fake_run(argv, **kwargs):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="gpu07\ngpu08\n", stderr="")

    assert slurm_hosts("gpu[07-08]", run=fake_run) == ["gpu07", "gpu08"]
    assert calls == [["scontrol", "show", "hostnames", "gpu[07-08]"]]
    assert hostfile_text(["gpu07", "gpu08"], 8) == "gpu07 slots=8\ngpu08 slots=8\n"

    def missing(argv, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "scontrol")

    with pytest.raises(ConfigError, match="Set MASTER_ADDR"):
        slurm_hosts("gpu[07-08]", run=missing)


# ---------------------------------------------------------------- hostfiles


def test_parse_hostfile_keeps_order_and_skips_comments():
    text = "# cluster\nworker-1 slots=4  # fast\n\n  worker-0 slots=2\n"
    assert list(parse_hostfile(text).items()) == [("worker-1", 4), ("worker-0", 2)]


@pytest.mark.parametrize("text,needle", [
    ("worker-0 slots=4\nworker-1 4\n", "line 2: 'worker-1 4' is not 'HOST slots=N'"),
    ("worker-0 slots=four\n", "line 1: 'worker-0 slots=four'"),
    ("worker-0 slots=4 extra\n", "is not 'HOST slots=N'"),
    ("worker-0 slots=0\n", "worker-0 has slots=0; it must be >= 1"),
    ("a slots=1\nb slots=1\na slots=2\n", "line 3: host 'a' is listed twice"),
    ("# nothing\n\n", "lists no hosts"),
])
def test_parse_hostfile_errors(text, needle):
    with pytest.raises(HostfileError) as info:
        parse_hostfile(text)
    assert needle in str(info.value)


def test_node_rank_must_index_the_hostfile():
    hosts = parse_hostfile("a slots=1\nb slots=1\n")
    check_node_rank(hosts, 1)
    with pytest.raises(HostfileError, match=r"node_rank is 2 but the hostfile lists 2 hosts \(a, b\)"):
        check_node_rank(hosts, 2)


def test_example_hostfile_parses():
    assert parse_hostfile((LAUNCH / "hostfile").read_text()) == {"worker-0": 8, "worker-1": 8}


# ---------------------------------------------------------------- CLI


def test_cli_dry_run_prints_the_command(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.main(["deepspeed", "--nproc", "2", "--omp-threads", "3", "--dry-run", "--", "--seed=1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("OMP_NUM_THREADS=3 ") and line.endswith(
        "deepspeed --num_gpus 2 --master_port 29500 --module fsam_ds.train --seed=1")


def test_cli_hostfile_validates_node_rank(tmp_path, capsys):
    hostfile = tmp_path / "hf"
    hostfile.write_text("a slots=2\nb slots=2\n")
    common = ["hostfile", "--hostfile", str(hostfile), "--master_addr", "a", "--dry-run"]
    assert launch.main([*common, "--node_rank", "1", "--", "--seed=1"]) == 0
    assert "--no_ssh --node_rank 1 --module fsam_ds.train --seed=1" in capsys.readouterr().out
    assert launch.main([*common, "--node_rank", "5"]) == 2
    assert "node_rank is 5 but the hostfile lists 2 hosts" in capsys.readouterr().err


def test_cli_slurm_reads_env_and_writes_hostfile(tmp_path, capsys, monkeypatch):
    for key, value in {**SLURM_ENV, "MASTER_ADDR": "gpu07"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(launch, "slurm_hosts", lambda nodelist: ["gpu07", "gpu08"])
    out = tmp_path / "hf"
    assert launch.main(["slurm", "--launcher", "deepspeed", "--hostfile-out", str(out), "--dry-run", "--", "-x"]) == 0
    assert f"--hostfile {out} --master_addr gpu07 --master_port 29500 --no_ssh --node_rank 1" in capsys.readouterr().out
    assert out.read_text() == "gpu07 slots=8\ngpu08 slots=8\n"


# ---------------------------------------------------------------- shell scripts


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses(name):
    subprocess.run(["bash", "-n", str(LAUNCH / name)], check=True)


def test_slurm_script_has_rendezvous_lines():
    text = (LAUNCH / "slurm.sbatch").read_text()
    for needle in ['MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
                   "srun --nodes=\"$SLURM_NNODES\" --ntasks-per-node=1",
                   'torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "$NPROC"',
                   '--rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT"',
                   'deepspeed --hostfile "$HOSTFILE" --no_ssh --node_rank "$SLURM_NODEID"',
                   "${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}",
                   "#SBATCH --ntasks-per-node=1"]:
        assert needle in text, needle


FAKE_LAUNCHER = """#!/usr/bin/env bash
# Records how it was called: one line per call, node id and OMP first.
echo "${SLURM_NODEID:--} OMP=${OMP_NUM_THREADS:-unset} $(basename "$0") $*" >> "$FAKE_LOG"
if [[ -n "${FAIL_IF:-}" && "$*" == *"$FAIL_IF"* ]]; then exit 3; fi
if [[ -n "${SLEEP_IF:-}" && "$*" == *"$SLEEP_IF"* ]]; then exec sleep 60; fi
"""

FAKE_SRUN = """#!/usr/bin/env bash
# Runs the step command once per node, as srun --ntasks-per-node=1 would, with SLURM_NODEID set.
echo "srun $1 $2 $3" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
for (( node = 0; node < SLURM_NNODES; node++ )); do SLURM_NODEID=$node "$@" || exit $?; done
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$1 $2 $3" == "show hostnames gpu[07-08]" ]] && printf 'gpu07\\ngpu08\\n'
"""


def _executable(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def fakes(tmp_path):
    """A PATH whose deepspeed/torchrun/srun/scontrol only record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("deepspeed", "torchrun"):
        _executable(bin_dir / name, FAKE_LAUNCHER)
    _executable(bin_dir / "srun", FAKE_SRUN)
    _executable(bin_dir / "scontrol", FAKE_SCONTROL)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMP_", "MASTER_", "NPROC", "NODE_"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_LOG=str(log), TMPDIR=str(tmp_path))

    def run(script, *args, expect=0, **extra):
        proc = subprocess.run(["bash", str(LAUNCH / script), *args], env={**env, **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == expect, proc.stderr
        return sorted(log.read_text().splitlines()) if log.exists() else []

    return run


def test_deepspeed_single_node_script(fakes):
    calls = fakes("deepspeed_single_node.sh", "--config", "x.yaml", "--seed=2", NPROC="2", OMP_NUM_THREADS="3")
    assert calls == ["- OMP=3 deepspeed --num_gpus 2 --master_port 29500 --module fsam_ds.train --config x.yaml "
                     "--seed=2"]


def test_single_node_scripts_default_to_rte_recipe_and_set_threads(fakes):
    calls = fakes("torchrun.sh", NPROC="1")
    expected_threads = len(os.sched_getaffinity(0))  # what `nproc` reports
    assert calls == [f"- OMP={expected_threads} torchrun --standalone --nproc_per_node 1 -m fsam_ds.train "
                     f"--config {LAUNCH}/configs/rte.yaml"]


def test_torchrun_script_static_multinode(fakes):
    calls = fakes("torchrun.sh", "--seed=1", NPROC="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1",
                  OMP_NUM_THREADS="2")
    assert calls == ["- OMP=2 torchrun --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500 "
                     "--nproc_per_node 4 -m fsam_ds.train --seed=1"]
    fakes("torchrun.sh", NNODES="2", NODE_RANK="1", expect=1)  # no MASTER_ADDR


def test_multinode_hostfile_script(fakes, tmp_path):
    hostfile = tmp_path / "hf"
    hostfile.write_text("# two nodes\nnode-a slots=2\nnode-b slots=2\n")
    calls = fakes("multinode_hostfile.sh", "--seed=1", HOSTFILE=str(hostfile), NODE_RANK="1", OMP_NUM_THREADS="5")
    assert calls == [f"- OMP=5 deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 --no_ssh "
                     "--node_rank 1 --module fsam_ds.train --seed=1"]


def test_local_two_nodes_torchrun(fakes):
    calls = fakes("local_two_nodes.sh", "--seed=1", MASTER_PORT="29999")
    assert calls == [f"- OMP=1 torchrun --nnodes 2 --node_rank {rank} --nproc_per_node 1 --master_addr 127.0.0.1 "
                     "--master_port 29999 -m fsam_ds.train --seed=1" for rank in (0, 1)]


def test_local_two_nodes_deepspeed(fakes):
    calls = fakes("local_two_nodes.sh", "--seed=1", LAUNCHER="deepspeed", NPROC="2")
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        assert call.startswith("- OMP=1 deepspeed --hostfile ")
        assert call.endswith(f"--no_ssh --node_rank {rank} --master_addr 127.0.0.1 --master_port 29511 "
                             "--module fsam_ds.train --seed=1")


def test_local_two_nodes_stops_the_peer_of_a_failed_node(fakes):
    start = time.monotonic()
    fakes("local_two_nodes.sh", "--seed=1", FAIL_IF="--node_rank 1", SLEEP_IF="--node_rank 0", expect=1)
    assert time.monotonic() - start < 30  # node 0 sleeps 60 s unless it is killed


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_slurm_script_under_fake_slurm(fakes, tmp_path, launcher):
    calls = fakes("slurm.sbatch", "--config", "x.yaml", LAUNCHER=launcher, SLURM_NNODES="2",
                  SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="77", SLURM_GPUS_ON_NODE="4",
                  SLURM_CPUS_ON_NODE="32")
    assert calls[-1] == "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1"
    if launcher == "torchrun":
        assert calls[:2] == [f"{node} OMP=8 torchrun --nnodes 2 --nproc_per_node 4 --rdzv_id 77 --rdzv_backend c10d "
                             "--rdzv_endpoint gpu07:29500 -m fsam_ds.train --config x.yaml" for node in (0, 1)]
    else:
        hostfile = tmp_path / "fsam_hostfile_77"
        assert calls[:2] == [f"{node} OMP=8 deepspeed --hostfile {hostfile} --no_ssh --node_rank {node} "
                             "--master_addr gpu07 --master_port 29500 --module fsam_ds.train --config x.yaml"
                             for node in (0, 1)]
        assert parse_hostfile(hostfile.read_text()) == {"gpu07": 4, "gpu08": 4}


# ---------------------------------------------------------------- recipe configs

# The paper's RoBERTa-large GLUE scripts: task -> (peak lr, batch, total updates).
RECIPE = {"cola": (1e-5, 32, 2668), "mrpc": (1e-5, 32, 1148), "rte": (2e-5, 32, 1018),
          "stsb": (2e-5, 32, 1799), "sst2": (1e-5, 64, 10467)}


@pytest.mark.parametrize("task", list(RECIPE))
def test_recipe_config_matches_the_paper(task):
    cfg = yaml.safe_load((LAUNCH / "configs" / f"{task}.yaml").read_text())
    lr, batch, updates = RECIPE[task]
    assert cfg["task"] == task and "roberta-large" in cfg["model"]
    assert cfg["optim"]["lr"] == lr and isinstance(cfg["optim"]["lr"], float)
    assert cfg["optim"]["max_steps"] == updates
    assert cfg["data"]["micro_batch_size"] * cfg["data"]["grad_accum"] == batch
    assert cfg["optim"] == {"lr": lr, "weight_decay": 0.01, "betas": [0.9, 0.98], "eps": 1e-6,
                                 "warmup_ratio": 0.06, "max_steps": updates, "grad_clip": 0.0}
    assert cfg["sam"] == {"sam_type": "fisher-sam", "rho": 0.05, "keep_ratio": 0.1, "mask_interval": 100}
    assert cfg["precision"] == "fp32" and cfg["zero_stage"] in (0, 1, 2, 3)


@pytest.mark.parametrize("recipe", ["xsum", "conll2014"])
def test_generation_recipes_load_as_seq2seq_fisher_sam_on_bart_large(recipe):
    from fsam_ds.trainer.run_config import load_config

    cfg = load_config(["--config", str(LAUNCH / "configs" / f"{recipe}.yaml")])  # every key known and in range
    assert (cfg.task, cfg.model, cfg.sam.sam_type) == ("seq2seq", "facebook/bart-large", "fisher-sam")
    assert (cfg.sam.rho, cfg.sam.keep_ratio, cfg.sam.mask_interval) == (0.05, 0.1, 100)
    assert cfg.eval.generate_examples > 0 and cfg.data.train_file and cfg.data.dev_file


def test_no_machine_paths_in_launch_files():
    for path in [*LAUNCH.rglob("*"), *(ROOT / "ds_configs").iterdir()]:
        if path.is_file():
            text = path.read_text()
            assert "/work/" not in text and "/home/" not in text, path


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_common_helpers_pick_one_process_without_gpus(tmp_path):
    out = subprocess.run(["bash", "-c", f'source "{LAUNCH}/_common.sh"; PATH=/nonexistent fsam_default_nproc; '
                                        "fsam_threads_per_rank 1000000"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]
