"""What both benchmark commands measure with, and the model and table helpers they share.

* time per phase of a step: `PhaseProfile`, a `fsam_ds.sam.driver.StepObserver` handed to the
  optimizer or engine (`observer=`), so the library reports its own phases; nothing is patched.
* heap: glibc's `mallinfo2()` (uordblks + hblkhd: bytes handed out by malloc, including large
  mmap'ed blocks, and not freed yet), sampled at the edges of every phase while a `HeapPeak` runs.
  It sees transients, but only where it is sampled.
* tensors an object holds: a walk of the object graph from it (`held_tensor_bytes`).
* collective bytes: the functions of `torch.distributed` are wrapped (`CollectiveCounter`) before
  DeepSpeed builds its communication backend, which keeps references to some of them from then on.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import inspect
import json
import statistics
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MiB = float(1 << 20)
LR = 1e-4  # every method's AdamW
WEIGHT_DECAY = 0.01
MASK_INTERVAL = 100  # the paper's default; a rebuild's cost is amortised over it
REBUILD = "@rebuild"  # suffix of a method that rebuilds its Fisher mask every step (mask_interval 1)

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
    """High-water mark of `heap_in_use()` over the samples taken between `start()` and `stop()`."""

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


def resident_bytes(field: str = "RssAnon") -> int | None:
    """A resident-memory figure of this process from /proc/self/status, in bytes (Linux only; None
    elsewhere): "RssAnon" (anonymous memory), "RssFile" (file pages, such as a memory-mapped
    safetensors checkpoint, which the kernel can drop and re-read at will) or "VmRSS" (both, and shmem)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class BackgroundPeak:
    """Peaks above the start of anonymous RSS, total RSS and `heap_in_use()`, sampled by a thread every
    `interval` seconds while the block runs, for code with no phases to sample at (a model loading):

        with BackgroundPeak() as peak:
            load()
        peak.above_start["RssAnon"], peak.above_start["VmRSS"], peak.above_start["heap"]  # bytes or None

    For a run with named parts, `enter(name)` starts a phase: from then on samples also count towards
    that phase's peak (`phases[name]["peak"]`), and its start (`phases[name]["start"]`, read right
    after a garbage collection) is the memory the phase began with. Phases follow each other; the
    overall peak covers them all.
    """

    FIGURES = ("RssAnon", "VmRSS", "heap")

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start: dict[str, int | None] = {}
        self.peak: dict[str, int] = {}
        self.phases: dict[str, dict[str, dict]] = {}
        self.marks: dict[str, dict[str, int]] = {}
        self._phase_peak: dict[str, int] | None = None
        self._mark_peak: dict[str, int] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _read() -> dict[str, int | None]:
        return {"RssAnon": resident_bytes("RssAnon"), "VmRSS": resident_bytes("VmRSS"), "heap": heap_in_use()}

    def _sample(self) -> None:
        # read once: the phase or mark may change while this thread samples
        phase_peak, mark_peak = self._phase_peak, self._mark_peak
        for name, value in self._read().items():
            if value is not None:
                self.peak[name] = max(self.peak.get(name, 0), value)
                for peak in (phase_peak, mark_peak):
                    if peak is not None:
                        peak[name] = max(peak.get(name, 0), value)

    def mark(self, name: str | None) -> None:
        """Within the current phase, samples from now on also count towards `marks[name]`, the peak over
        every stretch marked `name` (None: no mark). Unlike `enter`, no garbage collection and no start
        reading: for parts that repeat many times, such as the phases of every training step."""
        self._sample()
        self._mark_peak = None if name is None else self.marks.setdefault(name, {})
        self._sample()

    def enter(self, name: str) -> None:
        """Ends the current phase (with a last sample) and starts phase `name`."""
        self._sample()
        gc.collect()
        start = self._read()
        self.phases[name] = {"start": start, "peak": {k: v for k, v in start.items() if v is not None}}
        self._phase_peak = self.phases[name]["peak"]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> BackgroundPeak:
        gc.collect()
        self.start = self._read()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self._phase_peak = self._mark_peak = None

    @property
    def above_start(self) -> dict[str, int | None]:
        return {name: None if self.start.get(name) is None or name not in self.peak
                else self.peak[name] - self.start[name] for name in self.FIGURES}


# ====================================================================== tensors held by an object

# Objects whose insides never hold an optimizer's tensors; skipping them keeps the walk small and
# stops it from wandering into modules, classes or code.
_LEAF_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.dtype, torch.device,
               torch.Generator, types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType,
               types.MethodType, nn.Module)


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


def held_tensor_storages(root: object) -> dict[tuple[int, int], int]:
    """Every tensor storage reachable from `root` through references (attributes, slots, containers):
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
            # the interpreter's own view of what `obj` refers to: no attribute is named or read
            stack.extend(gc.get_referents(obj))
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

    def install(self) -> CollectiveCounter:
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

    def __enter__(self) -> CollectiveCounter:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


# ====================================================================== phases of a step


class PhaseProfile:
    """A `StepObserver`: wall time per named phase and, through `note_bytes`, collective bytes.

    Phases nest; time is inclusive (a phase's time contains its children's), bytes go to the
    innermost open phase. With a `heap`, the heap is sampled at both edges of every phase (while
    that HeapPeak runs).
    """

    def __init__(self, heap: HeapPeak | None = None) -> None:
        self.heap = heap
        self.seconds: dict[str, float] = {}
        self.bytes: dict[str, int] = {}
        self.accounted = 0.0  # time inside outermost phases: the step total minus this is "other"
        self._open: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.heap is not None:
            self.heap.sample(f"before {name}")
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
            if self.heap is not None:
                self.heap.sample(f"after {name}")

    def current(self) -> str:
        """The innermost open phase ("other" outside every phase)."""
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
    """Median ms and collective bytes per phase over steps, plus "other": the step time outside every
    outermost phase (Python glue, checks, the gaps between phases), and "step total"."""
    phases = sorted({p for prof in profiles for key in ("seconds", "bytes") for p in prof[key]})
    out = {p: {"ms": median([prof["seconds"].get(p, 0.0) for prof in profiles]) * 1e3,
               "bytes": median([prof["bytes"].get(p, 0) for prof in profiles])} for p in phases}
    out["other"] = {"ms": median([t - prof["accounted"] for prof, t in zip(profiles, totals)]) * 1e3,
                    "bytes": median([prof["bytes"].get("other", 0) for prof in profiles])}
    out["step total"] = {"ms": median(totals) * 1e3,
                         "bytes": median([sum(prof["bytes"].values()) for prof in profiles])}
    return out


def profile_rows(profiles: dict[str, dict], parts: Sequence[str],
                 cell: Callable[[dict], str]) -> list[list[str]]:
    """One row per part (indented names run inside the one above) of the methods' median profiles,
    leaving out parts no method has."""
    rows = []
    for part in parts:
        cells = [profile.get(part.strip()) for profile in profiles.values()]
        if any(c is not None for c in cells):
            rows.append([part] + ["-" if c is None else cell(c) for c in cells])
    return rows


# ====================================================================== small numeric helpers


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "n/a" if value is None or value != value else f"{value:{spec}}{unit}"


def rotated(items: Sequence[Any], round_index: int) -> list[Any]:
    """`items` rotated by `round_index` and reversed on odd rounds, so that every method runs early
    and late and after every other one about equally often."""
    shift = round_index % max(1, len(items))
    out = list(items[shift:]) + list(items[:shift])
    return out[::-1] if round_index % 2 else out


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ====================================================================== the model and the command line


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


def ranks_heading(command: str, config: dict, timing: str) -> str:
    """The first line of a multi-rank report: ranks, the tiny BERT's shape, the batch, the dtype, `timing`."""
    c = config
    return (f"benchmarks {command}: {c['world_size']} {c['backend']} ranks, tiny BERT hidden {c['hidden']}, "
            f"{c['layers']} layers ({c['parameters'] / 1e6:.2f} M parameters), micro-batch {c['micro_batch']} per "
            f"rank, {c['dtype']}; {timing}")


def llama_decoder(hidden: int, layers: int, heads: int, vocab: int, seq: int, seed: int = 0) -> nn.Module:
    """A `LlamaForCausalLM` built from a config (no download): feed-forward 8/3 x hidden rounded to 64,
    as Llama's; untied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, intermediate_size=64 * round(8 * hidden / 3 / 64),
                         max_position_embeddings=seq, tie_word_embeddings=False, use_cache=False)
    return LlamaForCausalLM(config)


def causal_lm_loss(model: Callable, batch: dict[str, Tensor]) -> Tensor:
    """Each example's mean next-token loss over its tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    tokens = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return tokens.mean(dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_model_arguments(parser: argparse.ArgumentParser, *, hidden: int, layers: int, heads: int, vocab: int,
                        seq: int = 64) -> None:
    """The shape of the `tiny_bert` a benchmark builds, with that benchmark's defaults; and --json."""
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--seq", type=int, default=seq)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def write_json(path: str | None, result: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
