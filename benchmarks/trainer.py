"""`python -m benchmarks trainer`: fisher-sam inside Hugging Face's Trainer against the same Trainer with AdamW.

    python -m benchmarks trainer --stages 2 3 --steps 40 [--json FILE]

Per ZeRO stage, on local gloo ranks, the same tiny BERT, batches and shipped DeepSpeed config ("auto"
values filled by the Trainer) run four ways:

* the Trainer path: `transformers.Trainer` (AdamW) and `fsam_ds.hf.SAMTrainer` (fisher-sam), each
  `train()`-ed twice in the order AdamW, fisher-sam, fisher-sam, AdamW (a Trainer's steps cannot be
  interleaved with another's); a callback times each optimizer step (a barrier, then from the Trainer's
  `on_step_begin` to its `on_step_end`) after the warm-up steps;
* fsam-train's engine path, exactly as `python -m benchmarks zero` measures it (`RankBench`: DeepSpeed's
  AdamW step and `SAMEngine.train_step`, interleaved step by step).

Step time: per step the slower rank's, median over the timed steps. Memory: the heap peak (sampled at
every collective, at the step's edges and, for fisher-sam, at its phases) from the first step to the end
of training, above the heap before the model was built. Collective bytes per step: median. Targets (the
issue's): the Trainer path's fisher-sam/AdamW step ratio <= 2.05 and memory ratio <= 1.05, and its step
ratio within 3 % of the engine path's.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from typing import Any

from benchmarks.measure import (LR, MASK_INTERVAL, WEIGHT_DECAY, MiB, PhaseProfile, count_parameters, fmt,
                                heap_in_use, median, random_batches, ranks_heading, ratio, table, tiny_bert)
from benchmarks.ranks import accelerate_on_gloo
from benchmarks.zero import MODEL_SHAPE, RankBench, _quiet, _slowest_rank_times, add_arguments as add_zero_arguments
from benchmarks.zero import summarise_method
from fsam_ds.zero.distributed import init_distributed

METHODS = ("adamw", "fisher-sam")
TRAINER_ORDER = ("adamw", "fisher-sam", "fisher-sam", "adamw")
STEP_TARGET, MEMORY_TARGET, AGREEMENT_TARGET = 2.05, 1.05, 0.03


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_zero_arguments(parser)
    parser.set_defaults(stages=[2, 3], steps=40)  # 20 steps left the ratios 7 % apart between runs


class TrainerRankBench(RankBench):
    """`RankBench` (the engine path) plus the same methods through the Trainer on the same batches."""

    def trainer_run(self, name: str, stage: int, batches: list[dict], output_dir: str) -> dict:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        from fsam_ds.hf import SAMTrainer
        from fsam_ds.sam.config import SAMConfig
        from fsam_ds.zero.ds_config import build_ds_config

        o, bench = self.o, self
        rows = [{k: v[i] for k, v in batch.items()} for batch in batches for i in range(o["micro_batch"])]
        steps = o["warmup"] + o["steps"]
        # every rank holds the same list; the Trainer's sampler gives each rank its share of each step
        dataset = [rows[i % len(rows)] for i in range(steps * o["micro_batch"] * self.world)]
        record: dict[str, Any] = {"times": [], "collectives": [], "memory": {}}

        class StepClock(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                import torch.distributed as dist

                if state.global_step == 0:
                    bench.heap.start()
                    bench.counter.active = True
                if sam is not None and trainer_ref.sam_engine is not None:  # built by the first SAM step
                    trainer_ref.sam_engine.observer = self.profile
                dist.barrier()
                bench.counter.take()
                self.started = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                elapsed = time.perf_counter() - self.started
                collectives = bench.counter.take().as_dict()
                bench.heap.sample("step end")
                if state.global_step > o["warmup"]:
                    record["times"].append(elapsed)
                    record["collectives"].append(collectives)

        clock = StepClock()
        clock.profile = PhaseProfile(self.heap)
        gc.collect()
        before_build = heap_in_use()
        model = tiny_bert(*(o[k] for k in MODEL_SHAPE))
        config = build_ds_config(o["dtype"], stage)
        config["zero_optimization"]["reduce_bucket_size"] = "auto"  # as benchmarks zero: hidden^2
        if stage == 3:
            config["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
            config["zero_optimization"]["stage3_param_persistence_threshold"] = (
                "auto" if o["persistence_threshold"] is None else o["persistence_threshold"])
        config["zero_force_ds_cpu_optimizer"] = False  # the Trainer's torch AdamW, as the engine path's
        args = TrainingArguments(
            output_dir=output_dir, deepspeed=config, per_device_train_batch_size=o["micro_batch"], max_steps=steps,
            learning_rate=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=0.0, lr_scheduler_type="constant",
            optim="adamw_torch", report_to=[], save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True,
            dataloader_pin_memory=False, bf16=o["dtype"] == "bf16", use_cpu=o["backend"] == "gloo")
        sam = None if name == "adamw" else SAMConfig(sam_type=name, rho=0.05, keep_ratio=0.1,
                                                     mask_interval=MASK_INTERVAL)
        trainer_ref = (Trainer(model=model, args=args, train_dataset=dataset, callbacks=[clock]) if sam is None else
                       SAMTrainer(model=model, args=args, train_dataset=dataset, callbacks=[clock], sam=sam))
        trainer_ref.train()
        peak, _ = self.heap.stop()
        self.counter.active = False
        record["memory"] = {"peak": peak, "before_build": before_build,
                            "peak_above_before_build": None if peak is None or before_build is None
                            else peak - before_build}
        trainer_ref.model_wrapped.destroy()
        del trainer_ref, model
        gc.collect()
        return record

    def run_stage(self, stage: int) -> dict:
        from deepspeed.accelerator import get_accelerator

        out = {"engine": super().run_stage(stage)}
        device = get_accelerator().current_device_name()
        batches = [{k: v.to(device) for k, v in batch.items()}
                   for batch in random_batches(4, self.o["micro_batch"], self.o["seq"], self.o["vocab"],
                                               seed=100 + self.rank)]
        runs: dict[str, list[dict]] = {name: [] for name in METHODS}
        with tempfile.TemporaryDirectory() as output_dir:
            for name in TRAINER_ORDER:
                runs[name].append(self.trainer_run(name, stage, batches, output_dir))
        out["trainer"] = {name: {"times": [t for r in rs for t in r["times"]],
                                 "collectives": [c for r in rs for c in r["collectives"]],
                                 "memory": max((r["memory"] for r in rs),
                                               key=lambda m: m["peak_above_before_build"] or 0)}
                          for name, rs in runs.items()}
        return out


def _trainer_rank_bench(rank: int, world: int, options: dict) -> dict:
    bench = TrainerRankBench(rank, world, options)  # wraps torch.distributed before DeepSpeed binds to it
    if not options["verbose"]:
        _quiet()
        import transformers

        transformers.logging.set_verbosity_error()
    init_distributed(options["backend"])
    if options["backend"] == "gloo":
        accelerate_on_gloo()
    return bench.run()


def summarise_path(per_rank: list[dict]) -> dict:
    """Step time (median of the slower rank's), collective bytes (median, the larger rank's), memory."""
    times = _slowest_rank_times([r["times"] for r in per_rank])
    collective = max(median([c["bytes"] for c in r["collectives"]]) for r in per_rank)
    memory = [r["memory"]["peak_above_before_build"] for r in per_rank]
    return {"step_ms": median(times) * 1e3, "collective_bytes": collective,
            "peak_above_before_build": max(m for m in memory if m is not None) if any(memory) else None}


def run_trainer(args: argparse.Namespace) -> dict:
    from benchmarks.ranks import run_local_ranks

    options = {k: getattr(args, k) for k in ("stages", "steps", "warmup", "dtype", "hidden", "layers", "heads", "vocab",
                                               "seq", "micro_batch", "persistence_threshold", "verbose", "backend")}
    options["methods"] = list(METHODS)
    started = time.perf_counter()
    per_rank = run_local_ranks(_trainer_rank_bench, args.world_size, options, timeout=args.timeout, init=None,
                               backend=options["backend"])
    stages = {}
    for stage in per_rank[0]:
        paths = {"trainer": {name: summarise_path([r[stage]["trainer"][name] for r in per_rank]) for name in METHODS},
                 "engine": {name: summarise_method([r[stage]["engine"][name] for r in per_rank])
                            for name in METHODS}}
        stages[stage] = {"paths": paths, "verdicts": verdicts(int(stage), paths)}
    return {"config": {**options, "world_size": args.world_size,
                       "parameters": count_parameters(tiny_bert(*(options[k] for k in MODEL_SHAPE)))},
            "stages": stages, "wall_seconds": time.perf_counter() - started}


def ratios(methods: dict[str, dict]) -> dict[str, float | None]:
    sam, adamw = methods["fisher-sam"], methods["adamw"]
    return {"step": ratio(sam["step_ms"], adamw["step_ms"]),
            "memory": ratio(sam["peak_above_before_build"], adamw["peak_above_before_build"]),
            "collective": ratio(sam["collective_bytes"], adamw["collective_bytes"])}


def verdicts(stage: int, paths: dict[str, dict]) -> list[str]:
    trainer, engine = ratios(paths["trainer"]), ratios(paths["engine"])

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    out = [f"stage {stage} Trainer fisher-sam/AdamW step {fmt(trainer['step'])} <= {STEP_TARGET}: "
           f"{verdict(trainer['step'] is not None and trainer['step'] <= STEP_TARGET)}"]
    if trainer["memory"] is not None:
        out.append(f"stage {stage} Trainer fisher-sam/AdamW memory {fmt(trainer['memory'], '.3f')} <= "
                   f"{MEMORY_TARGET}: {verdict(trainer['memory'] <= MEMORY_TARGET)}")
    if trainer["step"] is not None and engine["step"] is not None:
        gap = trainer["step"] / engine["step"] - 1
        out.append(f"stage {stage} Trainer step ratio vs fsam-train's engine path ({fmt(engine['step'])}): "
                   f"{gap:+.1%}, within {AGREEMENT_TARGET:.0%}: {verdict(abs(gap) <= AGREEMENT_TARGET)}")
    return out


def format_trainer_report(result: dict) -> str:
    head = ranks_heading("trainer", result["config"], f"median of {result['config']['steps']} steps per run")
    header = ["stage", "path", "method", "step ms", "x AdamW", "coll MiB", "x AdamW", "mem MiB", "x AdamW"]
    rows = []
    for stage, s in result["stages"].items():
        for path, methods in s["paths"].items():
            adamw = methods["adamw"]
            for name, m in methods.items():
                rows.append([stage, path, name, fmt(m["step_ms"], ".1f"), fmt(ratio(m["step_ms"], adamw["step_ms"])),
                             fmt(m["collective_bytes"] / MiB, ".2f"),
                             fmt(ratio(m["collective_bytes"], adamw["collective_bytes"]), ".3f"),
                             fmt((m["peak_above_before_build"] or 0) / MiB, ".1f"),
                             fmt(ratio(m["peak_above_before_build"], adamw["peak_above_before_build"]), ".3f")])
    lines = [v for s in result["stages"].values() for v in s["verdicts"]]
    return "\n".join([head, "", table(header, rows), "", *lines])


