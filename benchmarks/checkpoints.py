"""`python -m benchmarks checkpoints`: what a checkpoint's manifest costs per save and per resume, hashed by
rank 0 after the save (how fsam-train did it before) against each rank hashing what it writes, right after
writing each file, with rank 0 only merging (`fsam_ds.trainer.run_dir`).

    python -m benchmarks checkpoints                          # 2 gloo ranks, a 50M-parameter MLP, ZeRO-2
    python -m benchmarks checkpoints --world-size 2 --hidden 1024 --layers 4 --repeats 1   # a quick one

Per rank: a fisher-sam engine on an MLP of `--layers` square layers of width `--hidden` (fp32), one step,
then `--repeats` rounds of, in this order: DeepSpeed's save with nothing hashed, followed by rank 0 reading
and hashing every file of the folder (the manifest as it was written before); the trainer's save
(`save_checkpoint`: digests taken by the writing rank, merged by rank 0); then the verification on resume, by
rank 0 alone over every file, and split across the ranks (`RunDir.damage`). Every file is in the page cache
when it is read, as it is right after a save. Reported: the median seconds of each, the bytes each rank
hashes, and the manifest's share of the save. With R ranks each rank hashes about 1/R of the optimizer
state it writes (and rank 0 the module weights at ZeRO 0-2), where rank 0 used to hash all of it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.measure import MiB, fmt, median, ratio, table
from benchmarks.ranks import run_local_ranks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048, help="width of each square layer")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")


def _rank_bench(rank: int, world: int, options: dict) -> dict:
    import torch
    import torch.distributed as dist

    import fsam_ds.zero.engine as fe
    from fsam_ds.sam.config import SAMConfig
    from fsam_ds.trainer.run_dir import MANIFEST, RunDir, TrainerState, damage, save_checkpoint, write_manifest

    torch.manual_seed(0)
    width = options["hidden"]
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(options["layers"])])
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": options["stage"]}, "steps_per_print": 10 ** 9}
    sam_engine = fe.initialize(model=model, config=config, sam=SAMConfig(sam_type="fisher-sam"),
                               optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4))
    batch = torch.randn(2, width)
    sam_engine.train_step([batch], lambda engine, b: engine(b).square().mean(dim=1))
    root = Path(options["root"])
    times: dict[str, list[float]] = {"plain_save": [], "hash_after": [], "trainer_save": [],
                                     "verify_rank0": [], "verify_split": []}

    def timed(what: str, action, on_rank0_only: bool = False) -> None:
        dist.barrier()
        started = time.perf_counter()
        if not on_rank0_only or rank == 0:
            action()
        times[what].append(time.perf_counter() - started)
        dist.barrier()

    own_bytes = 0
    for repeat in range(options["repeats"]):
        plain, trainer = root / f"plain{repeat}", root / f"trainer{repeat}"
        timed("plain_save", lambda: sam_engine.save_checkpoint(plain, tag="step1"))
        timed("hash_after", lambda: write_manifest(plain / "step1"), on_rank0_only=True)
        state = TrainerState(step=1, total_steps=2)
        timed("trainer_save", lambda: save_checkpoint(sam_engine, trainer, state, keep=1, run_config={}))
        folder = trainer / "checkpoints" / "step1"
        timed("verify_rank0", lambda: damage(folder), on_rank0_only=True)
        timed("verify_split", lambda: RunDir.damage(folder))
        entries = json.loads((folder / MANIFEST).read_text())["files"]
        own_bytes = sum(e["bytes"] for e in entries.values() if e.get("rank", 0) == rank)
        total_bytes = sum(e["bytes"] for e in entries.values())
        if rank == 0:
            shutil.rmtree(plain, ignore_errors=True)
            shutil.rmtree(trainer, ignore_errors=True)
        dist.barrier()
    return {"seconds": {k: median(v) for k, v in times.items()}, "own_bytes": own_bytes, "total_bytes": total_bytes,
            "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())}  # ZeRO-3: its own size


def run_checkpoints(args: argparse.Namespace) -> dict:
    options = {"hidden": args.hidden, "layers": args.layers, "stage": args.stage, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="fsam-checkpoints-") as root:
        per_rank = run_local_ranks(_rank_bench, args.world_size, {**options, "root": root}, timeout=args.timeout)
    slowest = {what: max(r["seconds"][what] for r in per_rank) for what in per_rank[0]["seconds"]}
    return {"config": {**options, "world_size": args.world_size, "parameters": per_rank[0]["parameters"]},
            "seconds": slowest, "total_bytes": per_rank[0]["total_bytes"],
            "bytes_per_rank": [r["own_bytes"] for r in per_rank]}


def format_checkpoints_report(result: dict) -> str:
    c, s = result["config"], result["seconds"]
    head = (f"benchmarks checkpoints: {c['world_size']} gloo ranks, ZeRO-{c['stage']}, fisher-sam, an MLP of "
            f"{c['layers']} x {c['hidden']}^2 ({c['parameters'] / 1e6:.1f} M parameters), a checkpoint of "
            f"{result['total_bytes'] / MiB:.0f} MiB; median of {c['repeats']} saves, the slower rank")
    before = s["plain_save"] + s["hash_after"]
    rows = [["save, then rank 0 hashes every file (before)", fmt(s["plain_save"]), fmt(s["hash_after"]),
             fmt(before), "1.00"],
            ["save, each rank hashing what it wrote (now)", "", "", fmt(s["trainer_save"]),
             fmt(ratio(s["trainer_save"], before))],
            ["resume check, rank 0 reads every file (before)", "", "", fmt(s["verify_rank0"]), "1.00"],
            ["resume check, each rank its own files (now)", "", "", fmt(s["verify_split"]),
             fmt(ratio(s["verify_split"], s["verify_rank0"]))]]
    hashed = ", ".join(f"rank {r}: {b / MiB:.0f} MiB" for r, b in enumerate(result["bytes_per_rank"]))
    before_bytes = f"before: rank 0 all {result['total_bytes'] / MiB:.0f} MiB"
    return "\n".join([head, "", table(["", "save s", "manifest s", "total s", "x before"], rows), "",
                      f"bytes each rank hashes now: {hashed} ({before_bytes})"])
