"""Launcher command lines for fsam_ds.train: deepspeed, torchrun, hostfile (multi-node) and SLURM.

The builders are pure: they return a LaunchCommand (argv + the environment variables to add), so
the exact command can be printed, tested and run. The CLI at the bottom prints or runs one:

    python -m fsam_ds.cli.launch deepspeed --nproc 2 -- --config launch/configs/rte.yaml --seed=1
    python -m fsam_ds.cli.launch torchrun --nproc 2 --dry-run -- --config launch/configs/rte.yaml
    python -m fsam_ds.cli.launch hostfile --hostfile launch/hostfile --master_addr 10.0.0.1 --node_rank 0 -- ...
    srun --ntasks-per-node=1 python -m fsam_ds.cli.launch slurm --launcher torchrun -- ...
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from fsam_ds.sam.config import ConfigError, is_int

TRAIN_MODULE = "fsam_ds.train"
DEFAULT_PORT = 29500
LAUNCHERS = ("deepspeed", "torchrun")


class HostfileError(ConfigError):
    """A hostfile line or a node rank is invalid; the message names the line and the fix."""


@dataclass(frozen=True)
class LaunchCommand:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables set on top of the caller's environment."""

    def shell(self) -> str:
        """The command as one shell line, e.g. 'OMP_NUM_THREADS=4 deepspeed --num_gpus 2 ...'."""
        prefix = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join(prefix + [shlex.join(self.argv)])

    def full_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), **self.env}


def omp_threads_per_rank(nproc: int, cpus: int | None = None) -> int:
    """CPU threads per rank so that the ranks of one node do not oversubscribe its cores."""
    return max(1, (cpus or os.cpu_count() or 1) // max(1, nproc))


def _thread_env(omp_threads: int | None) -> dict[str, str]:
    # The deepspeed launcher never sets OMP_NUM_THREADS (torchrun sets 1 only for nproc > 1), so
    # without it every rank starts one thread per core and a stage-3 step runs several times slower.
    return {} if omp_threads is None else {"OMP_NUM_THREADS": str(_positive("omp_threads", omp_threads))}


def deepspeed_command(nproc: int, train_args: Sequence[str], *, master_port: int = DEFAULT_PORT,
                      omp_threads: int | None = 1, module: str = TRAIN_MODULE,
                      exe: str = "deepspeed") -> LaunchCommand:
    """One node, `nproc` ranks. --num_gpus is always given: on a CPU machine the launcher would
    otherwise start one rank per NUMA node."""
    argv = [exe, "--num_gpus", str(_positive("nproc", nproc)), "--master_port", str(_port(master_port)),
            "--module", module, *train_args]
    return LaunchCommand(argv, _thread_env(omp_threads))


def torchrun_command(nproc: int, train_args: Sequence[str], *, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str | None = None, master_port: int | None = None,
                     omp_threads: int | None = 1, module: str = TRAIN_MODULE,
                     exe: str = "torchrun") -> LaunchCommand:
    """torchrun with a static rendezvous. One node without a port uses --standalone (a free port)."""
    argv = [exe]
    if _positive("nnodes", nnodes) > 1:
        if not master_addr:
            raise ConfigError(f"torchrun with nnodes={nnodes} needs master_addr (the address of node 0).")
        _check_rank(node_rank, nnodes)
        argv += ["--nnodes", str(nnodes), "--node_rank", str(node_rank)]
    argv += ["--nproc_per_node", str(_positive("nproc", nproc))]
    if nnodes == 1 and master_port is None:
        argv.append("--standalone")
    else:
        argv += ["--master_addr", master_addr or "127.0.0.1", "--master_port", str(_port(master_port or DEFAULT_PORT))]
    argv += ["-m", module, *train_args]
    return LaunchCommand(argv, _thread_env(omp_threads))


def hostfile_command(hostfile: str | Path, train_args: Sequence[str], *, master_addr: str,
                     master_port: int = DEFAULT_PORT, node_rank: int | None = None, nproc: int | None = None,
                     omp_threads: int | None = 1, module: str = TRAIN_MODULE,
                     exe: str = "deepspeed") -> LaunchCommand:
    """deepspeed over the hosts of a hostfile.

    node_rank=None: one launcher on node 0 reaches the others by passwordless ssh (pdsh); only
    variables listed in .deepspeed_env travel to the other nodes. node_rank=R: --no_ssh, one
    launcher per node, each started with its own rank (how SLURM or a scheduler runs it).
    """
    if not master_addr:
        raise ConfigError("hostfile launch needs master_addr (the address of the first host); "
                          "the ssh lookup DeepSpeed would do otherwise fails under --no_ssh.")
    argv = [exe, "--hostfile", str(hostfile), "--master_addr", master_addr, "--master_port", str(_port(master_port))]
    if node_rank is not None:
        _check_rank(node_rank, None)
        argv += ["--no_ssh", "--node_rank", str(node_rank)]
    if nproc is not None:
        argv += ["--num_gpus", str(_positive("nproc", nproc))]
    argv += ["--module", module, *train_args]
    return LaunchCommand(argv, _thread_env(omp_threads))


# ---------------------------------------------------------------- hostfiles


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """'HOST slots=N' lines -> {host: slots}, in file order. '#' starts a comment."""
    hosts: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if match is None:
            raise HostfileError(f"{source} line {number}: {raw.strip()!r} is not 'HOST slots=N'. Write one host "
                                "per line with its number of processes, e.g. 'worker-0 slots=8'.")
        host, slots = match.group(1), int(match.group(2))
        if slots < 1:
            raise HostfileError(f"{source} line {number}: {host} has slots={slots}; it must be >= 1. "
                                "Remove the line to leave the host out.")
        if host in hosts:
            raise HostfileError(f"{source} line {number}: host {host!r} is listed twice. Keep one line "
                                "per host and put its total process count in slots=.")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"{source} lists no hosts. Add lines such as 'worker-0 slots=8'.")
    return hosts


def load_hostfile(path: str | Path) -> dict[str, int]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise HostfileError(f"hostfile {str(path)!r} cannot be read ({err.strerror}).") from err
    return parse_hostfile(text, source=f"hostfile {str(path)!r}")


def hostfile_text(hosts: Sequence[str], slots: int) -> str:
    return "".join(f"{host} slots={_positive('slots', slots)}\n" for host in hosts)


# ---------------------------------------------------------------- SLURM


@dataclass(frozen=True)
class SlurmNode:
    """What one node of a SLURM allocation needs to start its launcher."""

    nnodes: int
    node_rank: int
    nproc: int
    job_id: str
    nodelist: str


def slurm_node(env: Mapping[str, str], nproc: int | None = None) -> SlurmNode:
    """Read the node's place in the job from SLURM's variables (run inside `srun`, one task per node).

    Processes per node: `nproc`, else SLURM_GPUS_ON_NODE, else SLURM_NTASKS_PER_NODE, else 1.
    """
    def need(name: str) -> str:
        value = env.get(name)
        if not value:
            raise ConfigError(f"{name} is not set: this is not running inside a SLURM job step. Start it "
                              "with 'srun --ntasks-per-node=1 ...' from an sbatch script.")
        return value

    nnodes, node_rank = _leading_int(need("SLURM_NNODES")), _leading_int(need("SLURM_NODEID"))
    if nproc is None:
        found = [env.get(name) for name in ("SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE") if env.get(name)]
        nproc = _leading_int(found[0]) if found else 1
    _check_rank(node_rank, nnodes)
    return SlurmNode(nnodes=nnodes, node_rank=node_rank, nproc=_positive("nproc", nproc),
                     job_id=env.get("SLURM_JOB_ID", "fsam"), nodelist=need("SLURM_JOB_NODELIST"))


def slurm_hosts(nodelist: str, run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[str]:
    """Expand a SLURM nodelist ('gpu[01-04]') with `scontrol show hostnames`; the first is the master."""
    try:
        out = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise ConfigError(f"'scontrol show hostnames {nodelist}' failed ({err}). Set MASTER_ADDR to the "
                          "first node's address to skip the lookup.") from err
    hosts = out.stdout.split()
    if not hosts:
        raise ConfigError(f"'scontrol show hostnames {nodelist}' printed no hosts.")
    return hosts


def slurm_command(node: SlurmNode, train_args: Sequence[str], *, master_addr: str,
                  master_port: int = DEFAULT_PORT, launcher: str = "torchrun", hostfile: str | Path | None = None,
                  omp_threads: int | None = 1, module: str = TRAIN_MODULE, exe: str | None = None) -> LaunchCommand:
    """The launcher that one node of the allocation runs.

    torchrun: c10d rendezvous at master_addr:master_port keyed by the job id (ranks are handed out
    at the rendezvous, so no node rank is passed). deepspeed: --no_ssh with the node's SLURM_NODEID
    and a hostfile listing every node of the job with nproc slots.
    """
    if launcher == "torchrun":
        argv = [exe or "torchrun", "--nnodes", str(node.nnodes), "--nproc_per_node", str(node.nproc),
                "--rdzv_id", node.job_id, "--rdzv_backend", "c10d",
                "--rdzv_endpoint", f"{master_addr}:{_port(master_port)}", "-m", module, *train_args]
        return LaunchCommand(argv, _thread_env(omp_threads))
    if launcher == "deepspeed":
        if hostfile is None:
            raise ConfigError("deepspeed under SLURM needs a hostfile of the job's nodes "
                              "(write it with hostfile_text(slurm_hosts(...), nproc)).")
        return hostfile_command(hostfile, train_args, master_addr=master_addr, master_port=master_port,
                                node_rank=node.node_rank, omp_threads=omp_threads, module=module,
                                exe=exe or "deepspeed")
    raise ConfigError(f"launcher is {launcher!r}; it must be one of {', '.join(LAUNCHERS)}.")


# ---------------------------------------------------------------- checks


def _positive(name: str, value: int) -> int:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name} is {value!r}; it must be an integer >= 1.")
    return value


def _port(port: int) -> int:
    if not is_int(port) or not 1 <= port <= 65535:
        raise ConfigError(f"master_port is {port!r}; it must be an integer in 1..65535.")
    return port


def _check_rank(node_rank: int, nnodes: int | None) -> None:
    if not is_int(node_rank) or node_rank < 0:
        raise HostfileError(f"node_rank is {node_rank!r}; it must be an integer >= 0.")
    if nnodes is not None and node_rank >= nnodes:
        raise HostfileError(f"node_rank is {node_rank} but there are only {nnodes} nodes (ranks 0..{nnodes - 1}).")


def check_node_rank(hosts: Mapping[str, int], node_rank: int) -> None:
    """A --no_ssh node rank must index a line of the hostfile."""
    _check_rank(node_rank, None)
    if node_rank >= len(hosts):
        raise HostfileError(f"node_rank is {node_rank} but the hostfile lists {len(hosts)} hosts "
                            f"({', '.join(hosts)}); node ranks are 0..{len(hosts) - 1}, in file order.")


def _leading_int(text: str) -> int:
    # SLURM writes per-node counts such as "4(x2)"; the leading number is this node's count.
    match = re.match(r"\s*(\d+)", text)
    if match is None:
        raise ConfigError(f"cannot read a count from SLURM value {text!r}.")
    return int(match.group(1))


def launcher_exe(name: str) -> str:
    """`deepspeed`/`torchrun` from this interpreter's environment if it has one, else the name
    (found on PATH), so that `.venv/bin/python -m fsam_ds.cli.launch` works without activating the venv."""
    sibling = Path(sys.executable).with_name(name)
    return str(sibling) if sibling.exists() else name


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fsam_ds.cli.launch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--module", default=TRAIN_MODULE, help="python module each rank runs")
    common.add_argument("--omp-threads", type=int, default=None,
                        help="OMP_NUM_THREADS per rank (default: $OMP_NUM_THREADS, else cores / ranks)")
    common.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    common.add_argument("--master_port", type=int, default=None)
    common.add_argument("--nproc", type=int, default=None, help="processes per node")
    modes = {
        "deepspeed": "one node, deepspeed launcher",
        "torchrun": "torchrun, one node or static multi-node",
        "hostfile": "deepspeed over a hostfile (ssh, or one launcher per node with --node_rank)",
        "slurm": "one launcher per node of a SLURM job (run under srun --ntasks-per-node=1)",
    }
    subs = {name: sub.add_parser(name, parents=[common], help=text) for name, text in modes.items()}
    subs["torchrun"].add_argument("--nnodes", type=int, default=1)
    subs["torchrun"].add_argument("--node_rank", type=int, default=0)
    subs["torchrun"].add_argument("--master_addr", default=None)
    subs["hostfile"].add_argument("--hostfile", required=True)
    subs["hostfile"].add_argument("--master_addr", required=True)
    subs["hostfile"].add_argument("--node_rank", type=int, default=None, help="run without ssh as this node")
    subs["slurm"].add_argument("--launcher", choices=LAUNCHERS, default="torchrun")
    subs["slurm"].add_argument("--hostfile-out", default=None, help="where the deepspeed hostfile is written")
    return parser


def build_from_cli(args: argparse.Namespace, train_args: list[str],
                   env: Mapping[str, str] | None = None) -> LaunchCommand:
    env = os.environ if env is None else env
    mode = args.mode
    nproc = args.nproc
    if mode == "slurm":
        node = slurm_node(env, nproc)
        nproc = node.nproc
    elif mode == "hostfile":
        hosts = load_hostfile(args.hostfile)
        if args.node_rank is not None:
            check_node_rank(hosts, args.node_rank)
    elif nproc is None:
        import torch  # here, so that the other modes print their command without loading torch

        nproc = max(1, torch.cuda.device_count())
    # without --nproc a hostfile node runs as many ranks as its line has slots
    local_ranks = list(hosts.values())[args.node_rank or 0] if nproc is None else nproc
    inherited = env.get("OMP_NUM_THREADS", "")
    omp = args.omp_threads or (int(inherited) if inherited.isdigit() else None) or omp_threads_per_rank(local_ranks)
    common = dict(omp_threads=omp, module=args.module)
    if mode == "deepspeed":
        return deepspeed_command(nproc, train_args, master_port=args.master_port or DEFAULT_PORT,
                                 exe=launcher_exe("deepspeed"), **common)
    if mode == "torchrun":
        return torchrun_command(nproc, train_args, nnodes=args.nnodes, node_rank=args.node_rank,
                                master_addr=args.master_addr, master_port=args.master_port,
                                exe=launcher_exe("torchrun"), **common)
    if mode == "hostfile":
        return hostfile_command(args.hostfile, train_args, master_addr=args.master_addr,
                                master_port=args.master_port or DEFAULT_PORT, node_rank=args.node_rank,
                                nproc=nproc, exe=launcher_exe("deepspeed"), **common)
    master_addr = env.get("MASTER_ADDR") or slurm_hosts(node.nodelist)[0]
    hostfile = None
    if args.launcher == "deepspeed":
        # Every node writes the same file locally, so no shared filesystem is assumed.
        hostfile = Path(args.hostfile_out or Path(tempfile.gettempdir()) / f"fsam_hostfile_{node.job_id}")
        hostfile.write_text(hostfile_text(slurm_hosts(node.nodelist), node.nproc))
    port = args.master_port or int(env.get("MASTER_PORT", DEFAULT_PORT))
    return slurm_command(node, train_args, master_addr=master_addr, master_port=port, launcher=args.launcher,
                         hostfile=hostfile, exe=launcher_exe(args.launcher), **common)


def split_train_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split at the first '--': launcher options before it, training arguments after it."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    return argv[:cut], argv[cut + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    ours, train_args = split_train_args(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(ours)
    try:
        command = build_from_cli(args, train_args)
    except ValueError as err:  # ConfigError, or a malformed number in the environment
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(command.shell(), flush=True)
    if args.dry_run:
        return 0
    # exec, so that signals from the scheduler (SIGTERM at the time limit) reach the launcher itself.
    os.execvpe(command.argv[0], command.argv, command.full_env())


if __name__ == "__main__":
    sys.exit(main())
