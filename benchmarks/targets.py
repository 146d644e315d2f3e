"""The acceptance targets of the benchmarks: each a ratio against plain DeepSpeed AdamW from the same
run, an upper limit, and the methods and ZeRO stages it applies to. `python -m benchmarks zero`
prints every one that applies with its measured value and verdict."""

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


def format_verdicts(checked: dict[str, dict[str, dict]]) -> str:
    """`checked`: stage -> check(...) result."""
    rows = [[stage, name, fmt(t["value"], ".3f"), fmt(t["limit"]), t["verdict"]]
            for stage, targets in checked.items() for name, t in targets.items()]
    return table(["stage", "target", "measured", "limit", "verdict"], rows)
