"""`python -m benchmarks lora`: LoRA against full fine-tuning, DeepSpeed's AdamW against fisher-sam, on ZeRO stages.

    python -m benchmarks lora --stages 2 3 --steps 5 [--json FILE]

The ranks, batches and measurements of `python -m benchmarks zero` (its `RankBench`), on a Llama-class
decoder built from a config (`measure.llama_decoder`; by default hidden 512, 8 layers, 8 heads, vocab
32000: 58M parameters, 232 MB in fp32) trained as a causal LM (each example's mean next-token loss).
Four methods: full fine-tuning with AdamW and with fisher-sam (keep_ratio 0.1), and the same two on LoRA
adapters (peft's default targets for Llama, q_proj and v_proj; r = --lora-r) on the frozen model. Per
method and stage: the median step time of the slower rank and the per-rank heap peak of the warm-up
steps above the heap before the model and engine were built (the larger rank), as in `benchmarks zero`.
Targets (the issue's): LoRA fisher-sam / LoRA AdamW memory <= 1.02 and step <= 2.05.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.measure import MiB, count_parameters, fmt, llama_decoder, ratio, table
from benchmarks.zero import LORA, MODEL_SHAPE, add_arguments as add_zero_arguments, spawn_ranks, summarise_method

METHODS = ("adamw", "fisher-sam", f"{LORA}adamw", f"{LORA}fisher-sam")
TARGETS = {"memory": 1.02, "step": 2.05}  # LoRA fisher-sam / LoRA AdamW


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_zero_arguments(parser)
    parser.add_argument("--lora-r", type=int, default=16, help="the adapters' rank")
    parser.set_defaults(stages=[2, 3], steps=5, warmup=2, hidden=512, layers=8, heads=8, vocab=32000, micro_batch=4)


def verdicts(stage: str, methods: dict[str, dict]) -> list[str]:
    sam, adamw = methods[f"{LORA}fisher-sam"], methods[f"{LORA}adamw"]
    figures = {"memory": ratio(sam["peak_above_before_build"], adamw["peak_above_before_build"]),
               "step": ratio(sam["step_ms"], adamw["step_ms"])}
    return [f"stage {stage} LoRA fisher-sam / LoRA AdamW {what}: {fmt(value, '.3f')} <= {TARGETS[what]}: "
            f"{'met' if value is not None and value <= TARGETS[what] else 'MISSED'}" for what, value in figures.items()]


def run_lora(args: argparse.Namespace) -> dict:
    options = {k: getattr(args, k) for k in ("stages", "steps", "warmup", "dtype", "hidden", "layers", "heads", "vocab",
                                               "seq", "micro_batch", "persistence_threshold", "verbose", "backend",
                                               "lora_r")}
    options.update(methods=list(METHODS), model="llama")
    started = time.perf_counter()
    per_rank = spawn_ranks(options, args.world_size, args.timeout)
    stages = {}
    for stage in per_rank[0]:
        methods = {name: summarise_method([r[stage][name] for r in per_rank]) for name in METHODS}
        stages[stage] = {"methods": methods, "verdicts": verdicts(stage, methods)}
    parameters = count_parameters(llama_decoder(*(options[k] for k in MODEL_SHAPE)))
    return {"config": {**options, "world_size": args.world_size, "parameters": parameters},
            "stages": stages, "wall_seconds": time.perf_counter() - started}


def format_lora_report(result: dict) -> str:
    c = result["config"]
    head = (f"benchmarks lora: {c['world_size']} {c['backend']} ranks, Llama decoder hidden {c['hidden']}, "
            f"{c['layers']} layers, vocab {c['vocab']} ({c['parameters'] / 1e6:.1f} M parameters, "
            f"{4 * c['parameters'] / 1e6:.0f} MB in fp32), seq {c['seq']}, micro-batch {c['micro_batch']} per rank, "
            f"{c['dtype']}, LoRA r {c['lora_r']}; median of {c['steps']} interleaved steps")
    header = ["stage", "method", "step ms", "x its AdamW", "mem MiB", "x its AdamW", "x full AdamW"]
    rows = []
    for stage, s in result["stages"].items():
        m = s["methods"]
        for name in METHODS:
            own = m[f"{LORA}adamw" if name.startswith(LORA) else "adamw"]
            rows.append([stage, name, fmt(m[name]["step_ms"], ".0f"), fmt(ratio(m[name]["step_ms"], own["step_ms"])),
                         fmt(m[name]["peak_above_before_build"] / MiB, ".0f"),
                         fmt(ratio(m[name]["peak_above_before_build"], own["peak_above_before_build"]), ".3f"),
                         fmt(ratio(m[name]["peak_above_before_build"], m["adamw"]["peak_above_before_build"]), ".3f")])
    lines = [v for s in result["stages"].values() for v in s["verdicts"]]
    return "\n".join([head, "", table(header, rows), "", *lines])
