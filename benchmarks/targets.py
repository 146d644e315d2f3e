"""The acceptance targets of the benchmarks: each a ratio against plain DeepSpeed AdamW from the same
run (or, for `scale`, against the fp32 model), an upper limit, and the methods and ZeRO stages (or
scale settings) it applies to. `python -m benchmarks zero|scale` prints every one that applies with
its measured value and verdict."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.measure import fmt, table


@dataclass(frozen=True)
class Target:
    ratio: str
    """Key of the ratio in a method's stage summary (`benchmarks.zero.summarise_stage`)."""
    label: str
    limit: float
    """The ratio meets the target when it is at most this."""
    methods: tuple[str, ...]
    stages: tuple[int, ...]


TARGETS: tuple[Target, ...] = (
    Target("step_ratio", "step / AdamW", 2.05, ("fisher-sam", "fisher-esam"), (2, 3)),
    Target("collective_ratio", "collective bytes / AdamW", 2.05, ("fisher-sam", "fisher-esam"), (0, 1, 2, 3)),
    Target("memory_ratio", "peak memory / AdamW", 1.05, ("fisher-sam",), (3,)),
)


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "n/a"
    return "met" if value <= limit else "MISSED"


def check(stage: int, ratios: dict[str, dict[str, float | None]]) -> dict[str, dict]:
    """{"<method> <label>": {"value", "limit", "verdict"}} for the targets that apply at `stage`;
    `ratios[method][target.ratio]` is the measured value."""
    return {f"{method} {t.label}": {"value": ratios[method][t.ratio], "limit": t.limit,
                                     "verdict": verdict(ratios[method][t.ratio], t.limit)}
            for t in TARGETS if stage in t.stages for method in t.methods if method in ratios}


def describe() -> str:
    """The targets in one line, for the report's legend."""
    parts = [f"{t.label} <= {t.limit} for {' and '.join(t.methods)} at stage{'s' * (len(t.stages) > 1)} "
             f"{', '.join(map(str, t.stages))}" for t in TARGETS]
    return "Targets: " + "; ".join(parts) + "."


def format_verdicts(checked: dict[str, dict[str, dict]], key: str = "stage") -> str:
    """`checked`: stage (or `key`, e.g. a scale setting) -> check(...) result."""
    rows = [[where, name, fmt(t["value"], ".3f"), fmt(t["limit"]), t["verdict"]]
            for where, targets in checked.items() for name, t in targets.items()]
    return table([key, "target", "measured", "limit", "verdict"], rows)


# ====================================================================== python -m benchmarks scale


@dataclass(frozen=True)
class ScaleTarget:
    ratio: str
    """Key of the ratio in a setting's summary (`benchmarks.scale.summarise_setting`)."""
    label: str
    limit: float
    optimizers: tuple[str, ...]
    settings: tuple[str, ...]


_WITH_CHECKPOINTING = ("checkpointing", "offload-optimizer", "offload-param")
_ALL_SETTINGS = ("zero3", "zero-init", *_WITH_CHECKPOINTING)
SCALE_TARGETS: tuple[ScaleTarget, ...] = (
    ScaleTarget("load_ratio", "load peak / fp32 model", 0.6, ("adamw", "fisher-sam"), ("zero-init",)),
    ScaleTarget("run_ratio", "run peak above baseline / fp32 model", 2.5, ("adamw", "fisher-sam"), ("zero-init",)),
    # the same in heap bytes (what the tensors hold), which glibc's retention of freed memory does not inflate
    ScaleTarget("run_heap_ratio", "run heap peak above baseline / fp32 model", 2.5, ("adamw", "fisher-sam"),
                ("zero-init",)),
    # the final evaluation and export hold no more than a training step: the export streams one shard at a time
    ScaleTarget("finish_ratio", "finish heap peak / training heap peak", 1.0, ("adamw", "fisher-sam"),
                _ALL_SETTINGS),
    ScaleTarget("memory_ratio", "run peak / AdamW", 1.05, ("fisher-sam",), _ALL_SETTINGS),
    ScaleTarget("memory_heap_ratio", "run heap peak / AdamW", 1.05, ("fisher-sam",), _ALL_SETTINGS),
    ScaleTarget("step_ratio", "step / AdamW", 2.05, ("fisher-sam",), _WITH_CHECKPOINTING),
    # the same target in CPU seconds per step, which other processes on a shared machine do not inflate
    ScaleTarget("step_cpu_ratio", "step CPU / AdamW", 2.05, ("fisher-sam",), _WITH_CHECKPOINTING),
)


def check_scale(setting: str, ratios: dict[str, dict[str, float | None]]) -> dict[str, dict]:
    """{"<optimizer> <label>": {"value", "limit", "verdict"}} for the targets that apply to `setting`."""
    return {f"{name} {t.label}": {"value": ratios[name][t.ratio], "limit": t.limit,
                                   "verdict": verdict(ratios[name][t.ratio], t.limit)}
            for t in SCALE_TARGETS if setting in t.settings for name in t.optimizers if name in ratios}


def describe_scale() -> str:
    parts = [f"{t.label} <= {t.limit} for {' and '.join(t.optimizers)} ({', '.join(t.settings)})"
             for t in SCALE_TARGETS]
    return "Targets: " + "; ".join(parts) + "."

