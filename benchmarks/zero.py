"""`python -m benchmarks zero`: DeepSpeed AdamW vs fisher-sam vs fisher-esam on ZeRO stages, local gloo ranks.

    python -m benchmarks zero --stages 1 2 3 --steps 30 [--dtype bf16] [--json FILE]
    python -m benchmarks zero --backend nccl --world-size 1 ...   # on GPUs: rank r on GPU r

The ranks are spawned here (no launcher needed) with one thread each. Per stage, every rank
builds one engine per method from the same tiny BERT config, then runs the methods' steps
alternately, with a barrier before each step. Per method:

* step time: per step the slower rank's time, then the median over steps;
* mask rebuild: a second engine of the fisher type with mask_interval = 1 (every step rebuilds);
  (rebuild step - normal step) / 100 is the amortised cost, shown as a fraction of the AdamW step;
* memory: heap (mallinfo2) sampled at the edges of every phase and at every collective during the
  warm-up steps after the engine is built; peak minus the heap before the model and engine were
  built (and, in the JSON, minus the heap after `initialize`, and the total);
* on GPUs (`--backend nccl`) also the device's peak (`torch.cuda.max_memory_allocated`) over the same
  span, above the device memory in use before the build: the heap is then host memory only;
* collective bytes per step: `benchmarks.measure.CollectiveCounter`, per rank, median over steps;
* a profile: time and collective bytes per phase of the step, as the engine reports its phases to
  its observer (`SAMEngine` and the AdamW baseline `PlainEngine` take `observer=`).
The targets (`benchmarks.targets.TARGETS`) are printed with their verdicts.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks import targets
from benchmarks.measure import (LR, MASK_INTERVAL, REBUILD, WEIGHT_DECAY, MiB, CollectiveCounter, HeapPeak,
                                PhaseProfile, add_model_arguments, count_parameters, fmt, heap_in_use, median,
                                causal_lm_loss, llama_decoder, median_profile, per_example_loss, profile_rows,
                                random_batches, ratio, rotated, table, tiny_bert)
from benchmarks.ranks import run_local_ranks
from fsam_ds.zero.distributed import init_distributed

METHODS = ("adamw", "fisher-sam", "fisher-esam")
MODEL_SHAPE = ("hidden", "layers", "heads", "vocab", "seq")
MODELS = {"bert": (tiny_bert, per_example_loss), "llama": (llama_decoder, causal_lm_loss)}
"""options["model"] -> (builder from MODEL_SHAPE, per-example loss); bert unless told."""
LORA = "lora/"
"""Prefix of a method name that trains LoRA adapters (peft's default targets) on the frozen model."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fsam_ds.zero.ds_config import STAGE3_PERSISTENCE_THRESHOLD

    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method and stage")
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps per engine before timing (memory is sampled there)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    add_model_arguments(parser, hidden=128, layers=2, heads=2, vocab=1000)
    parser.add_argument("--micro-batch", type=int, default=8, help="examples per rank and step")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                        help="gloo: CPU ranks; nccl: one rank per GPU (world size <= visible GPUs), steps timed "
                             "to the device's completion")
    parser.add_argument("--persistence-threshold", type=int, default=None,
                        help="ZeRO-3 stage3_param_persistence_threshold (default: 10 x hidden, the Hugging Face "
                             f"\"auto\" rule; the shipped configs say {STAGE3_PERSISTENCE_THRESHOLD}, which would "
                             "keep every matrix of this small model but the embeddings whole on every rank)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds before the ranks are killed")
    parser.add_argument("--verbose", action="store_true", help="keep DeepSpeed's log output")


def ds_config(stage: int, dtype: str, micro_batch: int, world_size: int, hidden: int,
              persistence_threshold: int | None) -> dict:
    """The shipped config for the stage and dtype, resolved, with two changes: clipping off
    (DeepSpeed clips at 1.0 by default) and bucket sizes from the model (the Hugging Face "auto"
    rule, hidden^2 elements). DeepSpeed's default buckets (5e8 elements, 1.9 GiB in fp32) would
    be a constant far larger than this model and hide every other difference in memory."""
    from fsam_ds.zero.ds_config import build_ds_config, resolve_ds_config

    config = build_ds_config(dtype, stage)
    config["zero_optimization"]["reduce_bucket_size"] = "auto"
    if stage == 3:
        config["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
        config["zero_optimization"]["stage3_param_persistence_threshold"] = (
            "auto" if persistence_threshold is None else persistence_threshold)
    config = resolve_ds_config(config, precision=dtype, zero_stage=stage, micro_batch_size=micro_batch, grad_accum=1,
                               world_size=world_size, grad_clip=0.0, hidden_size=hidden)
    config["zero_optimization"]["allgather_bucket_size"] = config["zero_optimization"]["reduce_bucket_size"]
    config["steps_per_print"] = 10 ** 9
    return config


# ====================================================================== one rank


@dataclass
class ZeroMethod:
    name: str
    stepper: Any  # fsam_ds.zero.engine.SAMEngine, or PlainEngine for DeepSpeed's own AdamW step
    profile: PhaseProfile
    loss: Any = per_example_loss
    times: list[float] = field(default_factory=list)
    collectives: list[dict] = field(default_factory=list)
    profiles: list[dict] = field(default_factory=list)
    memory: dict = field(default_factory=dict)

    sharpness_aware: list[bool] = field(default_factory=list)

    def step(self, batch: dict) -> None:
        out = self.stepper.train_step([batch], self.loss)
        self.sharpness_aware.append(bool(out.stats.sharpness_aware))


class RankBench:
    """Everything one rank does; the collective counter must exist before DeepSpeed's backend."""

    def __init__(self, rank: int, world: int, options: dict) -> None:
        self.rank, self.world, self.o = rank, world, options
        self.heap = HeapPeak()
        self.current: ZeroMethod | None = None
        self.counter = CollectiveCounter(on_call=self._on_collective).install()
        self.counter.active = False

    def _on_collective(self, name: str, nbytes: int) -> None:
        if self.current is None:
            self.heap.sample(name)
            return
        self.heap.sample(f"{name} in {self.current.profile.current()}")
        self.current.profile.note_bytes(nbytes)

    # ---------------------------------------------------------------- building
    def build(self, name: str, stage: int) -> ZeroMethod:
        from fsam_ds.sam.config import SAMConfig
        from fsam_ds.zero.engine import initialize, initialize_plain

        o = self.o
        builder, loss = MODELS[o.get("model", "bert")]
        model = builder(*(o[k] for k in MODEL_SHAPE))
        if name.startswith(LORA):
            import peft

            task = "CAUSAL_LM" if o.get("model") == "llama" else "SEQ_CLS"
            model = peft.get_peft_model(model, peft.LoraConfig(task_type=task, r=o.get("lora_r", 16), lora_alpha=32))
        config = ds_config(stage, o["dtype"], o["micro_batch"], self.world, o["hidden"], o["persistence_threshold"])
        # a client torch optimizer: DeepSpeed's own AdamW would JIT-compile fused_adam first
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                                      weight_decay=WEIGHT_DECAY)
        profile = PhaseProfile(self.heap)
        sam_type, _, variant = name.removeprefix(LORA).partition("@")
        if sam_type == "adamw":
            return ZeroMethod(name, initialize_plain(model, config, optimizer=optimizer, observer=profile), profile,
                              loss)
        interval = 1 if name.endswith(REBUILD) else MASK_INTERVAL
        sam = SAMConfig(sam_type=sam_type, rho=0.05, keep_ratio=0.1, mask_interval=interval, **schedule_of(variant))
        untimed = self.o["warmup"] + 1
        planned = untimed + self.o["steps"]  # every step this engine takes
        kind, fraction = sam.schedule_rule
        if kind == "late" and fraction > 0:
            # sized so that the switch falls a fraction f into the timed steps, which then mix both kinds as
            # the whole run would
            planned = math.ceil(untimed / fraction + self.o["steps"])
        return ZeroMethod(name, initialize(model, config, sam, optimizer=optimizer, observer=profile,
                                           planned_steps=planned), profile, loss)

    # ---------------------------------------------------------------- running
    def _run_step(self, method: ZeroMethod, batch: dict) -> tuple[float, dict, dict]:
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        dist.barrier()
        self.counter.take()
        self.counter.active = True
        self.current = method
        start = time.perf_counter()
        method.step(batch)
        get_accelerator().synchronize()  # a GPU step has ended when its kernels have (a no-op on the CPU)
        elapsed = time.perf_counter() - start
        self.current = None
        self.counter.active = False
        return elapsed, self.counter.take().as_dict(), method.profile.take()

    def build_and_warm(self, name: str, stage: int, batches: list[dict]) -> ZeroMethod:
        """Builds the method's model and engine and runs the warm-up steps, sampling the heap."""
        gc.collect()
        on_gpu = self.o["backend"] == "nccl"
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
            device_before_build = torch.cuda.memory_allocated()
        before_build = heap_in_use()
        method = self.build(name, stage)
        gc.collect()
        after_init = self.heap.start()
        for i in range(self.o["warmup"]):
            self._run_step(method, batches[i % len(batches)])
        peak, _ = self.heap.stop()
        method.memory = {"peak": peak, "peak_at": self.heap.where, "before_build": before_build,
                         "after_initialize": after_init,
                         "peak_above_before_build": _minus(peak, before_build),
                         "peak_above_after_initialize": _minus(peak, after_init)}
        if on_gpu:
            method.memory["cuda_peak_above_before_build"] = torch.cuda.max_memory_allocated() - device_before_build
        return method

    def _prime(self, stage: int, batches: list[dict]) -> None:
        """Builds, steps and drops one throwaway engine: DeepSpeed and torch allocate some things once
        per process (caches, communication state), which would otherwise count against the first method."""
        method = self.build("adamw", stage)
        for i in range(2):
            self._run_step(method, batches[i % len(batches)])
        _destroy(method)
        del method
        gc.collect()

    def run_stage(self, stage: int) -> dict:
        o = self.o
        from deepspeed.accelerator import get_accelerator

        device = get_accelerator().current_device_name()
        batches = [{k: v.to(device) for k, v in batch.items()}
                   for batch in random_batches(4, o["micro_batch"], o["seq"], o["vocab"], seed=100 + self.rank)]
        names = o.get("methods") or list(METHODS) + [f"{m}{REBUILD}" for m in METHODS if m != "adamw"]
        self._prime(stage, batches)
        methods = [self.build_and_warm(name, stage, batches) for name in names]
        for rep in range(1 + o["steps"]):  # one untimed round settles the alternation
            for method in rotated(methods, rep):
                elapsed, collectives, profile = self._run_step(method, batches[rep % len(batches)])
                if rep:
                    method.times.append(elapsed)
                    method.collectives.append(collectives)
                    method.profiles.append(profile)
        out = {m.name: {"times": m.times, "collectives": m.collectives, "profiles": m.profiles, "memory": m.memory,
                        "sharpness_aware": m.sharpness_aware[-o["steps"]:]}
               for m in methods}
        for m in methods:
            _destroy(m)
        del methods
        gc.collect()
        return out

    def run(self) -> dict:
        return {str(stage): self.run_stage(stage) for stage in self.o["stages"]}


def schedule_of(variant: str) -> dict[str, Any]:
    """SAMConfig fields for a method name's part after "@": a schedule ("every:5", "late:0.2"), "looksam:k"
    (every:k with LookSAM's reuse), or nothing ("" and "rebuild")."""
    if variant.startswith("looksam:"):
        return {"schedule": f"every:{variant.split(':')[1]}", "reuse": "looksam"}
    return {"schedule": variant} if ":" in variant else {}


def _destroy(method: ZeroMethod) -> None:
    """Removes the engine's hooks (ZeRO-3 registers them on the module) so the next engine runs alone."""
    method.stepper.engine.destroy()


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def _quiet() -> None:
    """DeepSpeed logs every engine's configuration at INFO; torch warns on each deprecated alias."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def _rank_bench(rank: int, world: int, options: dict) -> dict:
    bench = RankBench(rank, world, options)  # wraps torch.distributed before DeepSpeed binds to it
    if not options["verbose"]:
        _quiet()
    init_distributed(options["backend"])
    return bench.run()


def spawn_ranks(options: dict, world: int, timeout: float) -> list[dict]:
    return run_local_ranks(_rank_bench, world, options, timeout=timeout, init=None, backend=options["backend"])


# ====================================================================== summary


def _slowest_rank_times(per_rank: list[list[float]]) -> list[float]:
    """A synchronous step lasts as long as its slowest rank."""
    return [max(step) for step in zip(*per_rank)]


def summarise_method(per_rank: list[dict]) -> dict:
    times = _slowest_rank_times([r["times"] for r in per_rank])
    bytes_per_rank = [median([c["bytes"] for c in r["collectives"]]) for r in per_rank]
    calls_per_rank = [median([c["calls"] for c in r["collectives"]]) for r in per_rank]
    return {
        "step_ms": median(times) * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        # ranks move the same amount in data-parallel steps; the larger is shown if they differ
        "collective_bytes": max(bytes_per_rank),
        "collective_calls": max(calls_per_rank),
        "collective_by_function_rank0": (per_rank[0]["collectives"][-1]["by_function"]
                                         if per_rank[0]["collectives"] else {}),
        "memory_per_rank": [r["memory"] for r in per_rank],
        "peak_above_before_build": _max_or_none([r["memory"]["peak_above_before_build"] for r in per_rank]),
        "peak_above_after_initialize": _max_or_none([r["memory"]["peak_above_after_initialize"] for r in per_rank]),
        "peak_total": _max_or_none([r["memory"]["peak"] for r in per_rank]),
        "cuda_peak_above_before_build": _max_or_none([r["memory"].get("cuda_peak_above_before_build")
                                                      for r in per_rank]),
        "profile_rank0": median_profile(per_rank[0]["profiles"], per_rank[0]["times"]),
    }


def _max_or_none(values: list[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def summarise_stage(stage: int, per_rank: list[dict]) -> dict:
    methods = {name: summarise_method([r[name] for r in per_rank]) for name in per_rank[0]}
    adamw = methods["adamw"]
    out: dict[str, Any] = {"methods": methods}
    for name in METHODS[1:]:
        m, rebuild = methods[name], methods[name + REBUILD]
        extra = (rebuild["step_ms"] - m["step_ms"]) / MASK_INTERVAL
        out[name] = {
            "step_ratio": ratio(m["step_ms"], adamw["step_ms"]),
            "rebuild_ms_amortised": extra,
            "rebuild_fraction_of_adamw": ratio(extra, adamw["step_ms"]),
            "memory_ratio": ratio(m["peak_above_before_build"], adamw["peak_above_before_build"]),
            "memory_ratio_after_initialize": ratio(m["peak_above_after_initialize"],
                                                   adamw["peak_above_after_initialize"]),
            "memory_ratio_total": ratio(m["peak_total"], adamw["peak_total"]),
            "cuda_memory_ratio": ratio(m["cuda_peak_above_before_build"], adamw["cuda_peak_above_before_build"]),
            "collective_ratio": ratio(m["collective_bytes"], adamw["collective_bytes"]),
        }
    out["targets"] = targets.check(stage, out)
    return out


def run_zero(args: argparse.Namespace) -> dict:
    options = {k: getattr(args, k) for k in ("stages", "steps", "warmup", "dtype", "hidden", "layers", "heads", "vocab",
                                               "seq", "micro_batch", "persistence_threshold", "verbose", "backend")}
    started = time.perf_counter()
    per_rank = spawn_ranks(options, args.world_size, args.timeout)
    stages = {s: summarise_stage(int(s), [r[s] for r in per_rank]) for s in per_rank[0]}
    zero = {s: ds_config(int(s), args.dtype, args.micro_batch, args.world_size, args.hidden,
                         args.persistence_threshold)["zero_optimization"] for s in stages}
    return {"config": {**options, "world_size": args.world_size, "mask_interval": MASK_INTERVAL,
                       "parameters": count_parameters(tiny_bert(*(options[k] for k in MODEL_SHAPE))),
                       "zero_optimization": zero},
            "stages": stages, "wall_seconds": time.perf_counter() - started}


# ====================================================================== printing


def _mib(nbytes: float | None) -> float | None:
    return None if nbytes is None else nbytes / MiB


def format_zero_report(result: dict) -> str:
    c = result["config"]
    head = (f"benchmarks zero: {c['world_size']} {c.get('backend', 'gloo')} ranks (1 thread each), "
            f"tiny BERT hidden {c['hidden']}, {c['layers']} layers, vocab {c['vocab']}, seq {c['seq']} ({c['parameters'] / 1e6:.2f} M parameters), "
            f"micro-batch {c['micro_batch']} per rank, {c['dtype']}; median of {c['steps']} interleaved steps\n"
            + _format_zero_config(c["zero_optimization"]))
    header = ["stage", "AdamW ms", "fsam ms", "fesam ms", "fsam/AdamW", "fesam/AdamW", f"rebuild/{MASK_INTERVAL}",
              "mem AdamW MiB", "mem fsam MiB", "mem ratio", "AdamW coll MiB", "fsam coll", "fesam coll"]
    rows = []
    for stage, s in result["stages"].items():
        m = s["methods"]
        rows.append([stage, fmt(m["adamw"]["step_ms"], ".1f"), fmt(m["fisher-sam"]["step_ms"], ".1f"),
                     fmt(m["fisher-esam"]["step_ms"], ".1f"), fmt(s["fisher-sam"]["step_ratio"]),
                     fmt(s["fisher-esam"]["step_ratio"]),
                     fmt(_percent(s["fisher-sam"]["rebuild_fraction_of_adamw"]), ".2f", "%"),
                     fmt(_mib(m["adamw"]["peak_above_before_build"]), ".1f"),
                     fmt(_mib(m["fisher-sam"]["peak_above_before_build"]), ".1f"),
                     fmt(s["fisher-sam"]["memory_ratio"], ".3f"),
                     fmt(_mib(m["adamw"]["collective_bytes"]), ".2f"), fmt(s["fisher-sam"]["collective_ratio"], ".3f"),
                     fmt(s["fisher-esam"]["collective_ratio"], ".3f")])
    legend = (f"fsam = fisher-sam, fesam = fisher-esam (keep_ratio 0.1, mask_interval {MASK_INTERVAL}). "
              f"{targets.describe()}\n"
              f"rebuild/{MASK_INTERVAL}: (rebuild step - normal step) / {MASK_INTERVAL} as % of the AdamW step. "
              "mem: per-rank heap peak (mallinfo2, sampled) above the heap before model and engine were built, "
              "the larger rank. coll: collective bytes per step and rank (inputs; all-gathers: outputs), "
              "AdamW in MiB, SAM types as ratio.")
    verdicts = targets.format_verdicts({stage: s["targets"] for stage, s in result["stages"].items()})
    return "\n".join([head, "", table(header, rows), legend, "", verdicts, "",
                      _format_memory_views(result), "", _format_profiles(result)])


def _format_zero_config(zero: dict[str, dict]) -> str:
    any_stage = next(iter(zero.values()))
    line = (f"DeepSpeed: client torch AdamW, gradient clipping off, reduce/allgather buckets "
            f"{any_stage['reduce_bucket_size']} elements (hidden^2, the Hugging Face \"auto\" rule)")
    stage3 = zero.get("3")
    if stage3 is not None:
        line += (f"; stage 3: prefetch bucket {stage3['stage3_prefetch_bucket_size']}, "
                 f"persistence threshold {stage3['stage3_param_persistence_threshold']}")
    return line


def _percent(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _format_memory_views(result: dict) -> str:
    rows = []
    for stage, s in result["stages"].items():
        for name in METHODS:
            m = s["methods"][name]
            rows.append([stage, name, fmt(_mib(m["peak_total"]), ".1f"), fmt(_mib(m["peak_above_before_build"]), ".2f"),
                         fmt(_mib(m["peak_above_after_initialize"]), ".2f"),
                         fmt(_mib(m.get("cuda_peak_above_before_build")), ".2f"),
                         m["memory_per_rank"][0].get("peak_at", "")])
    return ("memory per rank (larger rank), MiB: total heap peak; peak above the heap before the model and engine "
            "were built; peak above the heap after initialize (before the first step); GPU: the device's peak "
            "above its use before the build (n/a on gloo)\n"
            + table(["stage", "method", "total peak", "above pre-build", "above pre-training", "GPU above pre-build",
                     "peak sampled at (rank 0)"], rows))


# phases of a step, outermost first; an indented name runs inside the one above it
ZERO_PARTS = ["forward", "backward", "first_pass", "  rebuild_mask", "  apply_perturbation", "zero_grads",
              "select_examples", "second_pass", "restore", "step", "other", "step total"]


def _format_profiles(result: dict) -> str:
    blocks = []
    for stage, s in result["stages"].items():
        profiles = {name: m["profile_rank0"] for name, m in s["methods"].items()}
        rows = profile_rows(profiles, ZERO_PARTS, lambda c: f"{c['ms']:.1f} ms {c['bytes'] / MiB:.2f} MiB")
        blocks.append(f"profile, stage {stage}: rank 0, median per step of time and collective bytes; an indented "
                      "phase is included in the one above it, bytes go to the innermost phase\n"
                      + table(["phase", *profiles], rows))
    return "\n\n".join(blocks)
