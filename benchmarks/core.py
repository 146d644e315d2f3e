"""`fsam-bench`: step time, memory and communication of the SAM family.

    fsam-bench core [--json FILE]                    # one process: ours vs pytorch-optimizer's SAM
    fsam-bench zero --stages 1 2 3 --steps 30        # 2 DeepSpeed ZeRO ranks over gloo (CPU)

How things are measured (the rules are printed with the results, too):

* time: wall clock of whole optimizer steps (both passes). The methods run in the same process
  and alternate step by step, with the order rotated each repetition, so drift and background
  load fall on all of them alike; the figure is the median over repetitions.
* optimizer memory (`core`): the tensors the optimizer object holds between its two passes,
  found by walking the object graph from the optimizer and summing the storages' bytes, minus
  what a plain AdamW holds (parameters, gradients, AdamW's own state entries).
* heap (`core` and `zero`): glibc's `mallinfo2()` (uordblks + hblkhd: bytes handed out by
  malloc, including large mmap'ed blocks, and not freed yet), sampled at fixed points of a step.
  It is a second, coarser view: it sees transients, but only where it is sampled.
* collective bytes (`zero`): the functions of `torch.distributed` are wrapped before DeepSpeed
  builds its communication backend (which keeps references to some of them from then on); see
  `CollectiveCounter` for the counting rule.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import json
import statistics
import sys
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MiB = float(1 << 20)

# ====================================================================== heap (glibc mallinfo2)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.lru_cache(maxsize=None)
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's mallinfo2 (glibc >= 2.33); None elsewhere (musl, macOS), where heap figures are omitted."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    function.restype = _MallInfo2
    function.argtypes = []
    return function


def heap_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back, over all arenas: uordblks + hblkhd.

    torch's CPU allocator takes its memory from malloc (large blocks through mmap, which hblkhd
    counts), so tensors show up here as soon as they are allocated and leave when freed.
    """
    function = _mallinfo2()
    if function is None:
        return None
    info = function()
    return int(info.uordblks + info.hblkhd)


class HeapPeak:
    """High-water mark of `heap_in_use()` over the samples taken since `start()`."""

    def __init__(self) -> None:
        self.enabled = False
        self.baseline: int | None = None
        self.peak: int | None = None
        self.where = ""  # the label of the sample that set the peak: where memory is tightest

    def start(self) -> int | None:
        self.enabled = True
        self.baseline = self.peak = heap_in_use()
        self.where = "start"
        return self.baseline

    def sample(self, where: str = "") -> None:
        if not self.enabled:
            return
        now = heap_in_use()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak, self.where = now, where

    def stop(self) -> tuple[int | None, int | None]:
        """(peak, peak - baseline); both None without mallinfo2."""
        self.sample()
        self.enabled = False
        if self.peak is None or self.baseline is None:
            return None, None
        return self.peak, self.peak - self.baseline


# ====================================================================== tensors held by an object

# Objects whose insides never hold an optimizer's tensors; skipping them keeps the walk small and
# stops it from wandering into modules, classes or code.
_LEAF_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device,
               torch.Generator, types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType,
               types.MethodType, nn.Module)


def _children(obj: object) -> Iterable[object]:
    if isinstance(obj, dict):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        return obj
    children: list[object] = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                children.append(getattr(obj, slot))
    return children


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def held_tensor_storages(root: object) -> dict[tuple[int, int], int]:
    """Every tensor storage reachable from `root` through attributes, slots and containers:
    {(data pointer, bytes): bytes}. Views of one storage count once, at the storage's size."""
    found: dict[tuple[int, int], int] = {}
    seen: set[int] = set()
    stack: list[object] = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            key = _storage_key(obj)
            found[key] = key[1]
        elif not isinstance(obj, _LEAF_TYPES):
            stack.extend(_children(obj))
    return found


def held_tensor_bytes(root: object, exclude: Iterable[Tensor] = ()) -> int:
    """Bytes of the tensor storages reachable from `root`, leaving out the storages of `exclude`."""
    excluded = {_storage_key(t) for t in exclude if t is not None}
    return sum(n for key, n in held_tensor_storages(root).items() if key not in excluded)


def base_state_tensors(params: Iterable[Tensor], state: dict, keys: Iterable[str]) -> list[Tensor]:
    """Parameters, their gradients and the optimizer-state entries named `keys` (what a plain base
    optimizer holds too): the tensors excluded from a SAM optimizer's extra bytes."""
    keys = set(keys)
    out: list[Tensor] = []
    for p in params:
        out.append(p)
        if p.grad is not None:
            out.append(p.grad)
        out.extend(v for k, v in state.get(p, {}).items() if k in keys and isinstance(v, Tensor))
    return out


# ====================================================================== collective bytes

# Which argument's bytes a call counts. The rule is "the payload one rank contributes, at full
# size": the input for reductions, broadcasts and all-to-all, and for all-gathers the output
# (the gathered whole, world_size x the input), since that is what every rank ends up receiving.
COLLECTIVE_PAYLOAD: dict[str, str] = {
    "all_reduce": "tensor",
    "all_reduce_coalesced": "tensors",
    "all_gather": "tensor_list",
    "all_gather_into_tensor": "output_tensor",
    "all_gather_single": "output_tensor",
    "_all_gather_base": "output_tensor",
    "all_gather_coalesced": "output_tensor_lists",
    "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input",
    "reduce_scatter_single": "input",
    "_reduce_scatter_base": "input",
    "broadcast": "tensor",
    "reduce": "tensor",
    "all_to_all_single": "input",
    "all_to_all": "input_tensor_list",
}


def payload_bytes(value: object) -> int:
    """Bytes of a tensor, or of every tensor in a (nested) list of them."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    return 0


@dataclass
class CollectiveTotals:
    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    def add(self, name: str, nbytes: int) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        self.bytes[name] = self.bytes.get(name, 0) + nbytes

    def as_dict(self) -> dict:
        return {"bytes": self.total_bytes, "calls": self.total_calls, "by_function": {
            name: {"calls": self.calls[name], "bytes": self.bytes[name]} for name in sorted(self.calls)}}


class CollectiveCounter:
    """Counts the calls and payload bytes of `torch.distributed` collectives by wrapping them.

    The wrappers replace the functions on `torch.distributed` and `torch.distributed.distributed_c10d`.
    DeepSpeed looks most of them up on the module at call time, but its backend keeps its own
    reference to the all-gather and reduce-scatter functions from its construction: install the
    counter before `deepspeed.init_distributed`. Only the outermost wrapped call counts, so a
    deprecated alias that forwards to its successor (`_all_gather_base` -> `all_gather_single`) is
    one call. Each call also calls `on_call(name, bytes)`, e.g. to sample the heap there.
    """

    def __init__(self, on_call: Callable[[str, int], None] | None = None) -> None:
        self.on_call = on_call
        self.totals = CollectiveTotals()
        self.active = True
        self._originals: dict[str, Callable] = {}
        self._depth = threading.local()

    def _wrap(self, name: str, original: Callable) -> Callable:
        signature = inspect.signature(original)
        argument = COLLECTIVE_PAYLOAD[name]

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self._depth, "value", 0)
            if depth == 0 and self.active:
                bound = signature.bind_partial(*args, **kwargs).arguments
                nbytes = payload_bytes(bound.get(argument))
                self.totals.add(name, nbytes)
                if self.on_call is not None:
                    self.on_call(name, nbytes)
            self._depth.value = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                self._depth.value = depth

        return counted

    def install(self) -> "CollectiveCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        if self._originals:
            return self
        for name in COLLECTIVE_PAYLOAD:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original
            wrapped = self._wrap(name, original)
            setattr(dist, name, wrapped)
            if getattr(c10d, name, None) is original:
                setattr(c10d, name, wrapped)
        return self

    def uninstall(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for name, original in self._originals.items():
            setattr(dist, name, original)
            if hasattr(c10d, name):
                setattr(c10d, name, original)
        self._originals = {}

    def take(self) -> CollectiveTotals:
        """The totals since the last `take()`, and starts counting afresh."""
        totals, self.totals = self.totals, CollectiveTotals()
        return totals

    def __enter__(self) -> "CollectiveCounter":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


# ====================================================================== phase profile


class PhaseProfile:
    """Wall time (and, through `note_bytes`, collective bytes) per named phase of a step.

    Phases nest; time is inclusive (a phase's time contains its children's), bytes go to the
    innermost open phase.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self.accounted = 0.0  # time inside outermost phases: the step total minus this is "other"
        self._open: list[str] = []

    def wrap(self, obj: object, attribute: str, phase: str | None = None) -> None:
        """Replaces `obj.attribute` (a bound method) with a timed version on that instance only."""
        original = getattr(obj, attribute)
        setattr(obj, attribute, self.timed(original, phase or attribute))

    def timed(self, function: Callable, phase: str) -> Callable:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self.phase(phase):
                return function(*args, **kwargs)
        return run

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._open.append(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            self._open.pop()
            if not self._open:
                self.accounted += elapsed

    def current(self) -> str:
        """The innermost open part ("other" outside every part)."""
        return self._open[-1] if self._open else "other"

    def note_bytes(self, nbytes: int) -> None:
        name = self.current()
        self.bytes[name] = self.bytes.get(name, 0) + nbytes

    def take(self) -> dict[str, Any]:
        """This step's figures, and a fresh start for the next."""
        out = {"seconds": dict(self.seconds), "bytes": dict(self.bytes), "accounted": self.accounted}
        self.seconds, self.bytes, self.accounted = {}, {}, 0.0
        return out


def median_profile(profiles: Sequence[dict], totals: Sequence[float]) -> dict[str, dict[str, float]]:
    """Median ms and collective bytes per part over steps, plus "other": the step time outside every
    outermost part (Python glue, checks, the gaps between the wrapped calls)."""
    phases = sorted({p for prof in profiles for key in ("seconds", "bytes") for p in prof[key]})
    out = {p: {"ms": median([prof["seconds"].get(p, 0.0) for prof in profiles]) * 1e3,
               "bytes": median([prof["bytes"].get(p, 0) for prof in profiles])} for p in phases}
    out["other"] = {"ms": median([t - prof["accounted"] for prof, t in zip(profiles, totals)]) * 1e3,
                    "bytes": median([prof["bytes"].get("other", 0) for prof in profiles])}
    out["step total"] = {"ms": median(totals) * 1e3,
                         "bytes": median([sum(prof["bytes"].values()) for prof in profiles])}
    return out


# ====================================================================== small numeric helpers


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None or value != value else f"{value:{spec}}{unit}"


def verdict(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return "met" if value <= target else "MISSED"


def rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    """`items` rotated by `round_index` and reversed on odd rounds, so that every method runs early
    and late and after every other one about equally often."""
    shift = round_index % max(1, len(items))
    out = list(items[shift:]) + list(items[:shift])
    return out[::-1] if round_index % 2 else out


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, numbers right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ====================================================================== the model


def tiny_bert(hidden: int, layers: int, heads: int, vocab: int, seq: int, seed: int = 0) -> nn.Module:
    """A `BertForSequenceClassification` built from a config (no download), dropout off so that
    every method computes the same thing on the same batch."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, max_position_embeddings=seq, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def random_batches(count: int, batch: int, seq: int, vocab: int, seed: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (batch, seq), generator=generator),
             "attention_mask": torch.ones(batch, seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch,), generator=generator)} for _ in range(count)]


def per_example_loss(model: Callable, batch: dict[str, Tensor]) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ====================================================================== fsam-bench core

LR = 1e-4  # both benchmarks' AdamW
WEIGHT_DECAY = 0.01
MEMORY_TYPES = ("sam", "fisher-sam", "esam", "gsam", "fisher-gsam")
TIMED_CORE = ("adamw", "pytorch-optimizer-sam", "sam", "fisher-sam")
REBUILD = "@rebuild"  # suffix of a method that rebuilds its Fisher mask every step
MASK_INTERVAL = 100  # the paper's default; rebuild costs are amortised over it


class Probe:
    """Collects, during the memory steps, the optimizer's extra tensor bytes between its passes and
    heap samples around every forward, backward and step; does nothing while `enabled` is False."""

    def __init__(self, base_keys: Iterable[str] = ()) -> None:
        self.enabled = False
        self.base_keys = set(base_keys)
        self.heap = HeapPeak()
        self.extra_bytes: list[int] = []
        self.perturbation_bytes: list[int] = []

    def between_passes(self, method: "CoreMethod") -> None:
        if not self.enabled:
            return
        params = list(method.model.parameters())
        exclude = base_state_tensors(params, method.optimizer.state, self.base_keys)
        self.extra_bytes.append(held_tensor_bytes(method.optimizer, exclude))
        shards = getattr(method.optimizer, "shards", None)
        if shards is not None:
            self.perturbation_bytes.append(shards.perturbation_nbytes())

    def sample(self) -> None:
        self.heap.sample()


@dataclass
class CoreMethod:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[["CoreMethod", dict, Probe], None]
    profile: PhaseProfile = field(default_factory=PhaseProfile)


def _forward_backward(method: CoreMethod, batch: dict, probe: Probe) -> Tensor:
    with method.profile.phase("forward"):
        loss = per_example_loss(method.model, batch).mean()
    probe.sample()
    with method.profile.phase("backward"):
        loss.backward()
    probe.sample()
    return loss


def _step_adamw(method: CoreMethod, batch: dict, probe: Probe) -> None:
    method.optimizer.zero_grad()
    _forward_backward(method, batch, probe)
    method.optimizer.step()
    probe.sample()


def _step_ours(method: CoreMethod, batch: dict, probe: Probe) -> None:
    """`SAMOptimizer.step(closure)`: the closure's second call runs at w + e."""
    calls = 0

    def closure() -> Tensor:
        nonlocal calls
        if calls:
            probe.between_passes(method)
        calls += 1
        return _forward_backward(method, batch, probe)

    method.optimizer.step(closure)
    probe.sample()


def _step_ours_batch(method: CoreMethod, batch: dict, probe: Probe) -> None:
    """`SAMOptimizer.step_batch`, which ESAM's example selection needs (per-example losses)."""
    calls = 0

    def losses(b: dict) -> Tensor:
        nonlocal calls
        if calls:
            probe.between_passes(method)
        calls += 1
        with method.profile.phase("forward"):
            out = per_example_loss(method.model, b)
        probe.sample()
        return out

    method.optimizer.step_batch(batch, losses)
    probe.sample()


def _step_reference(method: CoreMethod, batch: dict, probe: Probe) -> None:
    """pytorch-optimizer's convention: the caller computes g at w, then step(closure) runs the
    closure once more at w + e (the closure clears the gradients itself)."""
    inside_step = False

    def closure() -> Tensor:
        if inside_step:
            probe.between_passes(method)
        method.optimizer.zero_grad()
        return _forward_backward(method, batch, probe)

    closure()
    inside_step = True
    method.optimizer.step(closure)
    method.optimizer.zero_grad()
    probe.sample()


def _instrument_core(method: CoreMethod) -> None:
    """Times the optimizer's parts on this instance (the wrappers shadow the bound methods)."""
    opt, profile = method.optimizer, method.profile
    base = getattr(opt, "base_optimizer", opt)
    profile.wrap(base, "step", "base_step")
    profile.wrap(opt, "zero_grad")
    if base is opt:
        return
    profile.wrap(opt, "first_step")
    profile.wrap(opt, "second_step")
    if hasattr(opt, "core"):  # ours: the parts inside the two phases
        for obj, attribute in [(opt.core, "first_pass"), (opt.core, "_rebuild_mask"), (opt.core, "second_pass"),
                               (opt.shards, "apply_perturbation"), (opt.shards, "remove_perturbation")]:
            profile.wrap(obj, attribute, attribute.lstrip("_"))


def build_core_method(name: str, model_args: dict, **sam_overrides: Any) -> CoreMethod:
    """`name`: adamw, pytorch-optimizer-sam, or one of our sam types (optionally "type@label")."""
    model = tiny_bert(**model_args)
    model.train()
    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=LR,
                                                             weight_decay=WEIGHT_DECAY)
        step = _step_adamw
    elif name == "pytorch-optimizer-sam":
        from pytorch_optimizer import SAM

        optimizer = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=LR, weight_decay=WEIGHT_DECAY)
        step = _step_reference
    else:
        from fsam_ds.sam.config import SAMConfig
        from fsam_ds.sam.optim import SAMOptimizer

        sam_type = name.split("@")[0]
        settings: dict[str, Any] = dict(sam_type=sam_type, rho=0.05, keep_ratio=0.1, mask_interval=MASK_INTERVAL)
        settings.update(sam_overrides)
        optimizer = SAMOptimizer(model.named_parameters(), torch.optim.AdamW, SAMConfig(**settings), lr=LR,
                                 weight_decay=WEIGHT_DECAY)
        step = _step_ours_batch if sam_type.endswith("esam") else _step_ours
    method = CoreMethod(name, model, optimizer, step)
    _instrument_core(method)
    return method


def time_interleaved(methods: Sequence[CoreMethod], batches: Sequence[dict], reps: int,
                     warmup: int) -> dict[str, dict]:
    """Seconds per step and the parts' profile of each method; one step of each per repetition,
    the order rotated."""
    probe = Probe()
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    profiles: dict[str, list[dict]] = {m.name: [] for m in methods}
    for rep in range(warmup + reps):
        batch = batches[rep % len(batches)]
        for method in rotated(methods, rep):
            method.profile.take()
            start = time.perf_counter()
            method.step(method, batch, probe)
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                times[method.name].append(elapsed)
                profiles[method.name].append(method.profile.take())
    return {name: {"median": median(times[name]), "all": times[name],
                   "profile": median_profile(profiles[name], times[name])} for name in times}


def measure_memory(method: CoreMethod, batches: Sequence[dict], steps: int, base_keys: set[str]) -> dict:
    """Runs `steps` probed steps; extra bytes are the largest seen between the passes, the heap figure
    the median over steps of the step's sampled peak above the heap at its start."""
    probe = Probe(base_keys)
    peaks: list[int] = []
    for i in range(steps):
        probe.enabled = True
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
    timed = [build_core_method(name, model_args) for name in TIMED_CORE]
    # a second fisher-sam that rebuilds its mask every step gives the rebuild step's cost through the
    # public configuration, without moving the first one's step counter
    timed.append(build_core_method("fisher-sam" + REBUILD, model_args, mask_interval=1))
    steps = time_interleaved(timed, batches, args.reps, args.warmup)

    adamw = timed[0]
    base_keys, adamw_bytes = adamw_state(adamw)
    n = count_parameters(adamw.model)
    memory = {name: measure_memory(method, batches, args.memory_steps, base_keys)
              for name, method in [("adamw", adamw), ("pytorch-optimizer-sam", timed[1])]}
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
        "sam_over_pytorch_optimizer_sam": ratio(s["sam"], s["pytorch-optimizer-sam"]),
        "fisher_sam_over_pytorch_optimizer_sam": ratio(amortised, s["pytorch-optimizer-sam"]),
        "sam_over_adamw": ratio(s["sam"], s["adamw"]),
    }


def format_core_report(result: dict) -> str:
    m, s, r = result["model"], result["steps"], result["ratios"]
    ref, adamw = s["pytorch-optimizer-sam"]["median"], s["adamw"]["median"]
    head = (f"fsam-bench core: BertForSequenceClassification hidden {m['hidden']}, {m['layers']} layers, "
            f"{m['heads']} heads, vocab {m['vocab']}, seq {m['seq']}, batch {m['batch']} "
            f"({m['parameters'] / 1e6:.2f} M parameters), {result['threads']} threads; "
            f"median of {result['reps']} interleaved repetitions")
    labels = [("AdamW (torch)", "adamw"), ("SAM (pytorch-optimizer)", "pytorch-optimizer-sam"),
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
            "after every forward, backward and step, above the heap at the step's start.")
    return table(["memory", "extra B/param", "perturbation B/param", "heap step peak MiB"], rows) + "\n" + note


# parts of a step, outermost first; an indented name runs inside the one above it
CORE_PARTS = ["forward", "backward", "zero_grad", "first_step", "  first_pass", "    rebuild_mask",
              "    apply_perturbation", "second_step", "  second_pass", "  remove_perturbation", "  base_step",
              "other", "step total"]


def format_core_profile(result: dict) -> str:
    names = list(result["steps"])
    rows = []
    for part in CORE_PARTS:
        key = part.strip()
        cells = [result["steps"][n]["profile"].get(key) for n in names]
        if key == "base_step":  # AdamW's own step is outermost
            rows.append(["base_step (optimizer.step)"] + [fmt(c and c["ms"], ".1f") for c in cells])
        elif any(c is not None for c in cells):
            rows.append([part] + ["-" if c is None else fmt(c["ms"], ".1f") for c in cells])
    return ("profile (median ms per step; an indented part is included in the part above it)\n"
            + table(["part"] + names, rows))


# ====================================================================== command line


def add_model_arguments(parser: argparse.ArgumentParser, *, hidden: int, layers: int, heads: int, vocab: int,
                        seq: int = 64) -> None:
    """The shape of the `tiny_bert` a benchmark builds, with that benchmark's defaults."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--seq", type=int, default=seq)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsam-bench", description="Step time, memory and communication "
                                     "benchmarks of the SAM family.")
    sub = parser.add_subparsers(dest="command", required=True)
    core = sub.add_parser("core", help="one process: ours vs pytorch-optimizer's SAM, on CPU")
    add_model_arguments(core, hidden=256, layers=4, heads=4, vocab=2000)
    core.add_argument("--batch", type=int, default=16)
    core.add_argument("--reps", type=int, default=20, help="timed repetitions (one step of every method each)")
    core.add_argument("--warmup", type=int, default=2)
    core.add_argument("--memory-steps", type=int, default=2, help="probed steps per method for the memory table")
    core.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    core.add_argument("--json", metavar="FILE", help="also write the results as JSON")

    from benchmarks.zero import add_arguments

    add_arguments(sub.add_parser("zero", help="DeepSpeed ZeRO stages on local gloo ranks (CPU)"))
    return parser


def _write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "core":
        result = run_core(args)
        print(format_core_report(result))
        _write_json(args.json, result)
        return 0
    from benchmarks.zero import format_zero_report, run_zero

    result = run_zero(args)
    print(format_zero_report(result))
    _write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
