"""`python -m benchmarks core`: step time, optimizer memory and a phase profile of the SAM family in
one process, against torch's AdamW and pytorch-optimizer's SAM (the dev extra installs it).

* time: wall clock of whole optimizer steps (both passes). The methods run in the same process
  and alternate step by step, with the order rotated each repetition, so drift and background
  load fall on all of them alike; the figure is the median over repetitions.
* optimizer memory: the tensors the optimizer object holds between its two passes (at the first
  forward after the "first_pass" phase), found by walking the object graph from the optimizer,
  minus what a plain AdamW holds (parameters, gradients, AdamW's own state entries).
* heap: the step's mallinfo2 peak, sampled at the edges of every phase, above the heap at its start.
* profile: time per phase, as the optimizer reports it to its observer (`PhaseProfile`); the two
  baselines' steps report the same phase names from here.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from benchmarks.measure import (LR, MASK_INTERVAL, REBUILD, WEIGHT_DECAY, MiB, HeapPeak, PhaseProfile,
                                add_model_arguments, base_state_tensors, count_parameters, fmt,
                                held_tensor_bytes, median, median_profile, per_example_loss, profile_rows,
                                random_batches, ratio, rotated, table, tiny_bert)
from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.driver import StepObserver
from fsam_ds.sam.optim import SAMOptimizer

MEMORY_TYPES = ("sam", "fisher-sam", "esam", "gsam", "fisher-gsam")
TIMED = ("adamw", "pytorch-optimizer-sam", "sam", "fisher-sam")
REFERENCE = "pytorch-optimizer-sam"

Step = Callable[["CoreMethod", dict, StepObserver], None]


@dataclass
class CoreMethod:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Step
    profile: PhaseProfile = field(default_factory=PhaseProfile)


def _forward_backward(method: CoreMethod, batch: dict, observer: StepObserver) -> None:
    with observer.phase("forward"):
        loss = per_example_loss(method.model, batch).mean()
    with observer.phase("backward"):
        loss.backward()


def _step_adamw(method: CoreMethod, batch: dict, observer: StepObserver) -> None:
    with observer.phase("zero_grads"):
        method.optimizer.zero_grad()
    _forward_backward(method, batch, observer)
    with observer.phase("step"):
        method.optimizer.step()


def _step_reference(method: CoreMethod, batch: dict, observer: StepObserver) -> None:
    """pytorch-optimizer's two-phase API, as its step(closure) runs it; its second_step restores the
    weights and steps the base optimizer, reported together as "step"."""
    optimizer: Any = method.optimizer
    with observer.phase("zero_grads"):
        optimizer.zero_grad()
    _forward_backward(method, batch, observer)
    with observer.phase("first_pass"):
        optimizer.first_step(zero_grad=True)
    _forward_backward(method, batch, observer)
    with observer.phase("step"):
        optimizer.second_step(zero_grad=True)


def _step_ours(method: CoreMethod, batch: dict, observer: StepObserver) -> None:
    """`SAMOptimizer.step_batch`, which every type supports (ESAM needs per-example losses)."""
    optimizer: Any = method.optimizer
    optimizer.observer = observer
    optimizer.step_batch(batch, lambda b: per_example_loss(method.model, b))


def _reference_sam(params: Iterable[Tensor]) -> torch.optim.Optimizer:
    try:
        from pytorch_optimizer import SAM
    except ImportError:
        raise SystemExit("benchmarks core: the reference method needs pytorch-optimizer, which the dev extra "
                         "installs: pip install -e '.[dev]' (or pip install 'pytorch-optimizer>=3.9').") from None
    return SAM(params, torch.optim.AdamW, rho=0.05, lr=LR, weight_decay=WEIGHT_DECAY)


def build_core_method(name: str, model_args: dict, **sam_overrides: Any) -> CoreMethod:
    """`name`: adamw, pytorch-optimizer-sam, or one of our sam types (optionally "type@label")."""
    model = tiny_bert(**model_args)
    model.train()
    if name == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        return CoreMethod(name, model, optimizer, _step_adamw)
    if name == REFERENCE:
        return CoreMethod(name, model, _reference_sam(model.parameters()), _step_reference)
    settings: dict[str, Any] = dict(sam_type=name.split("@")[0], rho=0.05, keep_ratio=0.1,
                                    mask_interval=MASK_INTERVAL)
    settings.update(sam_overrides)
    optimizer = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, SAMConfig(**settings), lr=LR,
                             weight_decay=WEIGHT_DECAY)
    return CoreMethod(name, model, optimizer, _step_ours)


def time_interleaved(methods: Sequence[CoreMethod], batches: Sequence[dict], reps: int,
                     warmup: int) -> dict[str, dict]:
    """Seconds per step and the phase profile of each method; one step of each per repetition,
    the order rotated."""
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    profiles: dict[str, list[dict]] = {m.name: [] for m in methods}
    for rep in range(warmup + reps):
        batch = batches[rep % len(batches)]
        for method in rotated(methods, rep):
            method.profile.take()
            start = time.perf_counter()
            method.step(method, batch, method.profile)
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[method.name].append(elapsed)
                profiles[method.name].append(method.profile.take())
    return {name: {"median": median(times[name]), "all": times[name],
                   "profile": median_profile(profiles[name], times[name])} for name in times}


class MemoryProbe(PhaseProfile):
    """The observer of the memory steps: samples the heap at every phase edge and, at the first forward
    after "first_pass" (the weights are at w + e), the bytes of the tensors the optimizer holds beyond
    the parameters, gradients and the base optimizer's state entries named `base_keys`."""

    def __init__(self, method: CoreMethod, base_keys: Iterable[str]) -> None:
        super().__init__(HeapPeak())
        self.method, self.base_keys = method, set(base_keys)
        self.extra_bytes: list[int] = []
        self.perturbation_bytes: list[int] = []
        self.perturbed = False

    def between_passes(self) -> None:
        optimizer: Any = self.method.optimizer
        exclude = base_state_tensors(self.method.model.parameters(), optimizer.state, self.base_keys)
        self.extra_bytes.append(held_tensor_bytes(optimizer, exclude))
        if isinstance(optimizer, SAMOptimizer):
            self.perturbation_bytes.append(optimizer.shards.perturbation_nbytes())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name == "forward" and self.perturbed:
            self.perturbed = False
            self.between_passes()
        with super().phase(name):
            yield
        self.perturbed = self.perturbed or name == "first_pass"


def measure_memory(method: CoreMethod, batches: Sequence[dict], steps: int, base_keys: set[str]) -> dict:
    """Runs `steps` probed steps; extra bytes are the largest seen between the passes, the heap figure
    the median over steps of the step's sampled peak above the heap at its start."""
    probe = MemoryProbe(method, base_keys)
    peaks: list[int] = []
    for i in range(steps):
        probe.heap.start()
        method.step(method, batches[i % len(batches)], probe)
        _, above = probe.heap.stop()
        if above is not None:
            peaks.append(above)
    n = count_parameters(method.model)
    extra = max(probe.extra_bytes) if probe.extra_bytes else 0
    perturbation = max(probe.perturbation_bytes) if probe.perturbation_bytes else None
    return {"extra_bytes": extra, "extra_bytes_per_param": extra / n,
            "perturbation_bytes_per_param": None if perturbation is None else perturbation / n,
            "heap_step_peak_above_start": median(peaks) if peaks else None}


def adamw_state(method: CoreMethod) -> tuple[set[str], int]:
    """The state entries a plain AdamW creates, and their bytes (the base every SAM type also pays)."""
    keys = {k for s in method.optimizer.state.values() for k in s}
    held = held_tensor_bytes(method.optimizer, base_state_tensors(method.model.parameters(), {}, ()))
    return keys, held


def run_core(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model_args = dict(hidden=args.hidden, layers=args.layers, heads=args.heads, vocab=args.vocab, seq=args.seq)
    batches = random_batches(4, args.batch, args.seq, args.vocab, seed=1)
    timed = [build_core_method(name, model_args) for name in TIMED]
    # a second fisher-sam that rebuilds its mask every step gives the rebuild step's cost through the
    # public configuration, without moving the first one's step counter
    timed.append(build_core_method("fisher-sam" + REBUILD, model_args, mask_interval=1))
    steps = time_interleaved(timed, batches, args.reps, args.warmup)

    adamw = timed[0]
    base_keys, adamw_bytes = adamw_state(adamw)
    n = count_parameters(adamw.model)
    memory = {m.name: measure_memory(m, batches, args.memory_steps, base_keys) for m in timed[:2]}
    for sam_type in MEMORY_TYPES:
        method = next((m for m in timed if m.name == sam_type), None) or build_core_method(sam_type, model_args)
        memory[sam_type] = measure_memory(method, batches, args.memory_steps, base_keys)
    accumulated = build_core_method("fisher-sam@accumulated", model_args, fisher_estimator="accumulated")
    memory["fisher-sam, accumulated Fisher"] = measure_memory(accumulated, batches, args.memory_steps, base_keys)
    result = {"model": {**model_args, "batch": args.batch, "parameters": n},
              "threads": torch.get_num_threads(), "reps": args.reps, "warmup": args.warmup,
              "mask_interval": MASK_INTERVAL,
              "steps": steps, "adamw_state_bytes_per_param": adamw_bytes / n, "memory": memory}
    result["ratios"] = core_ratios(result)
    return result


def core_ratios(result: dict) -> dict[str, float | None]:
    s = {name: v["median"] for name, v in result["steps"].items()}
    amortised = s["fisher-sam"] + (s["fisher-sam" + REBUILD] - s["fisher-sam"]) / result["mask_interval"]
    return {
        "fisher_sam_amortised_seconds": amortised,
        "sam_over_pytorch_optimizer_sam": ratio(s["sam"], s[REFERENCE]),
        "fisher_sam_over_pytorch_optimizer_sam": ratio(amortised, s[REFERENCE]),
        "sam_over_adamw": ratio(s["sam"], s["adamw"]),
    }


# ====================================================================== printing


def format_core_report(result: dict) -> str:
    m, s, r = result["model"], result["steps"], result["ratios"]
    ref, adamw = s[REFERENCE]["median"], s["adamw"]["median"]
    head = (f"benchmarks core: BertForSequenceClassification hidden {m['hidden']}, {m['layers']} layers, "
            f"{m['heads']} heads, vocab {m['vocab']}, seq {m['seq']}, batch {m['batch']} "
            f"({m['parameters'] / 1e6:.2f} M parameters), {result['threads']} threads; "
            f"median of {result['reps']} interleaved repetitions")
    labels = [("AdamW (torch)", "adamw"), ("SAM (pytorch-optimizer)", REFERENCE),
              ("sam (ours)", "sam"), ("fisher-sam (ours), normal step", "fisher-sam"),
              ("fisher-sam (ours), rebuild step", "fisher-sam" + REBUILD)]
    rows = [[label, fmt(s[key]["median"] * 1e3, ".1f"), fmt(ratio(s[key]["median"], ref)),
             fmt(ratio(s[key]["median"], adamw))] for label, key in labels]
    amortised = r["fisher_sam_amortised_seconds"]
    rows.append([f"fisher-sam (ours), amortised over {result['mask_interval']}", fmt(amortised * 1e3, ".1f"),
                 fmt(ratio(amortised, ref)), fmt(ratio(amortised, adamw))])
    timing = table(["step", "median ms", "/ pytorch-opt SAM", "/ AdamW"], rows)
    summary = (f"ratios: sam / pytorch-optimizer SAM = {fmt(r['sam_over_pytorch_optimizer_sam'])}; "
               f"fisher-sam (amortised) / pytorch-optimizer SAM = {fmt(r['fisher_sam_over_pytorch_optimizer_sam'])}; "
               f"sam / AdamW = {fmt(r['sam_over_adamw'])}")
    return "\n\n".join([head, timing, summary, format_core_memory(result), format_core_profile(result)])


def format_core_memory(result: dict) -> str:
    rows = []
    for name, v in result["memory"].items():
        heap = v["heap_step_peak_above_start"]
        rows.append([name, fmt(v["extra_bytes_per_param"], ".3f"), fmt(v["perturbation_bytes_per_param"], ".3f"),
                     fmt(None if heap is None else heap / MiB, ".1f")])
    note = ("extra B/param: bytes of the tensors the optimizer holds between its two passes (walking the optimizer "
            "object), beyond the parameters, gradients and AdamW's own state "
            f"({result['adamw_state_bytes_per_param']:.2f} B/param); perturbation: the part that is the stored "
            "perturbation (TensorShards.perturbation_nbytes). heap: median over steps of the mallinfo2 peak, sampled "
            "at the edges of every phase, above the heap at the step's start.")
    return table(["memory", "extra B/param", "perturbation B/param", "heap step peak MiB"], rows) + "\n" + note


# phases of a step, outermost first; an indented name runs inside the one above it
CORE_PARTS = ["zero_grads", "forward", "backward", "first_pass", "  rebuild_mask", "  apply_perturbation",
              "select_examples", "second_pass", "restore", "step", "other", "step total"]


def format_core_profile(result: dict) -> str:
    profiles = {name: v["profile"] for name, v in result["steps"].items()}
    rows = profile_rows(profiles, CORE_PARTS, lambda c: fmt(c["ms"], ".1f"))
    return ("profile (median ms per step; an indented phase is included in the one above it; pytorch-optimizer's "
            "restore is part of its step)\n" + table(["phase", *profiles], rows))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, hidden=256, layers=4, heads=4, vocab=2000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (one step of every method each)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=2, help="probed steps per method for the memory table")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
