"""`python -m benchmarks.gpu_check OUT_DIR [--dry-run]`: the GPU readiness check (`scripts/gpu_check.sh`).

Meant to finish in under 10 minutes on one H200-class GPU, in an environment that `bash install.sh
--gpu` set up (nothing is installed here). Every visible GPU is an NCCL rank. Parts, each a
subprocess with its own time limit and log file in OUT_DIR:

1. `pytest -m cuda tests/test_cuda.py`: the equivalence checks against the single-process reference
   at ZeRO 1-3, with optimizer and parameter offload, with activation checkpointing and on the tied
   GPT-2; bf16, and fp16 with DeepSpeed's loss scaler and an overflow injected in either pass
   (each test also killed by pytest-timeout after `TEST_TIMEOUT_S`);
2. `python -m benchmarks zero --backend nccl` at stages 1-3, fp32 and bf16: fisher-sam / AdamW and
   fisher-esam / AdamW step time, GPU memory and collective bytes on a small BERT.

Writes OUT_DIR/summary.json (environment, per-part status and seconds, per-test outcome, ratios) and
prints the same as a table. Exit status 0 only if every part passed and no test was skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 240
# the benchmark's model: large enough that a step is not all kernel launches, small enough for the budget
BENCH_MODEL = ["--hidden", "512", "--layers", "4", "--heads", "8", "--vocab", "8000", "--seq", "128",
               "--micro-batch", "16", "--steps", "20", "--warmup", "3", "--stages", "1", "2", "3"]


@dataclass(frozen=True)
class Part:
    """One subprocess of the check: its command, its time limit and where its result goes."""

    name: str
    argv: list[str]
    limit_s: int
    result: str  # file in OUT_DIR the part writes: junit XML for the tests, JSON for a benchmark


def parts(out: Path, world_size: int | str) -> list[Part]:
    python = sys.executable
    tests = Part("cuda tests", [python, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p",
                                "no:cacheprovider", f"--timeout={TEST_TIMEOUT_S}",
                                f"--junitxml={out / 'cuda_tests.xml'}"], 330, "cuda_tests.xml")
    benches = [Part(f"zero {dtype}", [python, "-m", "benchmarks", "zero", "--backend", "nccl", "--world-size",
                                      str(world_size), "--dtype", dtype, *BENCH_MODEL, "--timeout", "110",
                                      "--json", str(out / f"zero_{dtype}.json")], 120, f"zero_{dtype}.json")
               for dtype in ("fp32", "bf16")]
    return [tests, *benches]


def environment() -> dict:
    import deepspeed
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def run_part(part: Part, out: Path) -> dict:
    """Runs `part` from the repository root, its output in OUT_DIR/<result>.log; status and seconds."""
    log = out / (Path(part.result).stem + ".log")
    started = time.perf_counter()
    with log.open("w") as stream:
        try:
            code = subprocess.run(part.argv, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT,
                                  timeout=part.limit_s).returncode
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {part.limit_s} s"
    seconds = time.perf_counter() - started
    print(f"[{part.name}] {status} in {seconds:.0f} s (log: {log})", flush=True)
    if status != "passed":
        print("".join(log.read_text().splitlines(keepends=True)[-40:]), flush=True)
    return {"status": status, "seconds": round(seconds, 1), "log": log.name}


def read_tests(path: Path) -> dict:
    """Outcome and seconds per test from pytest's junit XML."""
    if not path.exists():
        return {}
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = {"outcome": kinds[0] if kinds else "passed",
                                      "seconds": round(float(case.get("time", 0)), 1)}
    return outcomes


def read_ratios(path: Path) -> dict:
    """Per stage, the SAM types' ratios to AdamW from a `benchmarks zero` JSON."""
    if not path.exists():
        return {}
    stages = json.loads(path.read_text())["stages"]
    keys = ("step_ratio", "cuda_memory_ratio", "collective_ratio")
    return {stage: {name: {key: s[name][key] for key in keys} for name in ("fisher-sam", "fisher-esam")}
            | {"adamw_step_ms": s["methods"]["adamw"]["step_ms"]} for stage, s in stages.items()}


def format_summary(summary: dict) -> str:
    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"GPU check: {summary['world_size']} NCCL rank(s) on {summary['environment'].get('gpus')}",
             f"{'part':<12} {'status':<28} {'seconds':>8}"]
    lines += [f"{name:<12} {p['status']:<28} {p['seconds']:>8.0f}" for name, p in summary["parts"].items()]
    lines += ["", f"{'test':<58} {'outcome':<8} {'seconds':>8}"]
    lines += [f"{name:<58} {t['outcome']:<8} {t['seconds']:>8.1f}" for name, t in summary["tests"].items()]
    lines += ["", f"{'bench':<6} {'stage':<6} {'AdamW ms':>9} {'fsam step':>10} {'fsam GPU mem':>13} "
              f"{'fsam coll':>10} {'fesam step':>11} {'fesam GPU mem':>14}"]
    for dtype, stages in summary["ratios"].items():
        for stage, r in stages.items():
            f, e = r["fisher-sam"], r["fisher-esam"]
            lines.append(f"{dtype:<6} {stage:<6} {r['adamw_step_ms']:>9.2f} {num(f['step_ratio']):>10} "
                         f"{num(f['cuda_memory_ratio']):>13} {num(f['collective_ratio']):>10} "
                         f"{num(e['step_ratio']):>11} {num(e['cuda_memory_ratio']):>14}")
    lines.append(f"total {summary['seconds']:.0f} s: {'PASSED' if summary['passed'] else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for summary.json, the logs and the raw results")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and their limits, run nothing")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    if args.dry_run:
        for part in parts(out, "<visible GPUs>"):
            print(f"[{part.name}] limit {part.limit_s} s, in {REPO}:\n  {' '.join(part.argv)}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: torch.cuda.is_available() is False in this environment; run it on a machine with a "
              "CUDA GPU, in the environment `bash install.sh --gpu` set up (or pass --dry-run to see the commands)",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    world_size = torch.cuda.device_count()
    results = {part.name: run_part(part, out) for part in parts(out, world_size)}
    tests = read_tests(out / "cuda_tests.xml")
    summary = {"world_size": world_size, "environment": environment(), "parts": results, "tests": tests,
               "ratios": {dtype: read_ratios(out / f"zero_{dtype}.json") for dtype in ("fp32", "bf16")},
               "seconds": round(time.perf_counter() - started, 1)}
    summary["passed"] = (all(p["status"] == "passed" for p in results.values()) and bool(tests)
                         and all(t["outcome"] == "passed" for t in tests.values()))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(format_summary(summary))
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
