"""One rank of `python -m benchmarks scale`: fsam-train's own `main`, with its memory sampled by phase.

    torchrun --nproc_per_node 2 -m benchmarks.scale_rank --out DIR [--whole-load] -- --task=sst2 ...

Everything after `--` goes to `fsam_ds.cli.train.main` unchanged. A `BackgroundPeak` samples anonymous
RSS, total RSS and the heap (`benchmarks.measure`) from the start of this process; the run's phases
are marked by wrapping two names of `fsam_ds.trainer.loop`, which calls them once each:

* setup: imports, the process group, tokenizer and data;
* load: `load_model` (its start, after a garbage collection, is the rank's baseline; the code the load
  runs is imported just before, see `import_model_code`);
* initialize: from the loaded model to the first step (activation checkpointing, `deepspeed.initialize`);
* train: `train_loop`, every step; the CPU time of each step (`time.process_time()` around the engine's
  `train_step`: it leaves out the time other processes hold the cores, which on a busy machine
  moves wall-clock step times by more than the differences measured). Within it, the step's own
  phases (the engine's `observer`: forward, backward, first_pass, second_pass, restore, step, ...)
  are marked, so each has its peak over all steps (`step_phases`) and its wall seconds in each step
  (`step_phase_seconds`); and after every step the
  tensors the rank holds for the model are counted by what they are for (`held`: the weights'
  partitions, DeepSpeed's fp32 master, the gradient partitions, the optimizer's state);
* finish: the final evaluation and export, and the process group's teardown.

`--whole-load` makes `load_model` load the whole model on every rank (no `zero.Init`), as the trainer
did at ZeRO-3 before it loaded partitioned; nothing else changes. Writes DIR/rank<RANK>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from benchmarks.measure import BackgroundPeak

BETWEEN_PHASES = "between phases"
"""The mark of a step's time outside the engine's phases (data, logging) and of the loop's own work."""


class MarkedPhases:
    """A step observer (`fsam_ds.sam.driver.StepObserver`) that marks each phase in a `BackgroundPeak`
    (a nested phase hands the mark back to the phase around it when it ends) and times it: `seconds`
    holds one {phase: wall seconds} per step begun with `new_step` (a nested phase also counts in the
    phase around it)."""

    def __init__(self, memory: BackgroundPeak) -> None:
        self.memory = memory
        self.stack: list[str] = []
        self.seconds: list[dict[str, float]] = []

    def new_step(self) -> None:
        self.seconds.append({})

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.stack.append(name)
        self.memory.mark(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.seconds:
                step = self.seconds[-1]
                step[name] = step.get(name, 0.0) + time.perf_counter() - start
            self.stack.pop()
            self.memory.mark(self.stack[-1] if self.stack else BETWEEN_PHASES)


def held_by_role(engine: Any) -> dict[str, int]:
    """Bytes of the tensors this rank holds for the model between steps, by what they are for: the parts
    of DeepSpeed's ZeRO-3 optimizer (private attributes of 0.19.x; a part it does not find counts as 0).
    A storage counts once, in the first role that reaches it. Cheap (no walk over every object), so it
    runs after every step and the last one's counts are kept."""
    import torch

    zero = engine.optimizer
    masters = list(getattr(zero, "fp32_partitioned_groups_flat", []))
    state = getattr(getattr(zero, "optimizer", None), "state", {})
    roles = {
        "weights": list(getattr(zero, "fp16_partitioned_groups_flat", []) or []),
        "fp32 master": masters,
        "gradients": [getattr(zero, "grad_partitions_flat_buffer", None), *(m.grad for m in masters)],
        "optimizer state": [t for entry in state.values() for t in entry.values()],
    }
    seen: set[int] = set()
    held = {}
    for role, tensors in roles.items():
        held[role] = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                held[role] += storage.nbytes()
    return held


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("benchmarks.scale_rank: put the trainer's arguments after `--`")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale_rank")
    parser.add_argument("--out", required=True, help="folder for rank<RANK>.json")
    parser.add_argument("--whole-load", action="store_true", help="load the whole model on every rank")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between memory samples")
    return parser.parse_args(argv[:split]), argv[split + 1:]


def import_model_code(cfg, objective) -> None:  # noqa: ANN001 - the trainer's TrainConfig and Objective
    """Imports the code the load runs (the model's module, transformers' DeepSpeed integration, accelerate)
    by building the model once on the meta device, which allocates nothing: libraries belong to the
    baseline, and would otherwise add some hundred MiB to the load of any model, however small."""
    import importlib.util

    import torch
    from transformers import AutoConfig

    import transformers.integrations.deepspeed  # noqa: F401

    if importlib.util.find_spec("accelerate") is not None:
        import accelerate  # noqa: F401
    config = AutoConfig.from_pretrained(cfg.model, **objective.model_kwargs())
    with torch.device("meta"):
        objective.model_class().from_config(config)


def main(argv: list[str]) -> None:
    options, trainer_argv = parse(argv)
    with BackgroundPeak(options.interval) as memory:
        memory.enter("setup")
        import fsam_ds.cli.train as cli
        import fsam_ds.trainer.build as build
        import fsam_ds.trainer.loop as loop

        load_model, train_loop = build.load_model, loop.train_loop
        step_cpu_seconds: list[float] = []
        held: dict[str, int] = {}
        observer = MarkedPhases(memory)

        def load_model_measured(cfg, objective, ds_config=None):  # noqa: ANN001, ANN202 - the trainer's signature
            import_model_code(cfg, objective)
            memory.enter("load")
            model = load_model(cfg, objective, None if options.whole_load else ds_config)
            memory.enter("initialize")
            return model

        def train_loop_measured(run, rng):  # noqa: ANN001, ANN202
            memory.enter("train")
            train_step = run.sam_engine.train_step

            def train_step_timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                observer.new_step()
                start = time.process_time()
                out = train_step(*args, **kwargs)
                step_cpu_seconds.append(time.process_time() - start)
                held.update(held_by_role(run.sam_engine.engine))
                return out

            run.sam_engine.train_step = train_step_timed  # this engine only: an attribute over its method
            run.sam_engine.observer = observer
            memory.mark(BETWEEN_PHASES)
            train_loop(run, rng)
            memory.mark(None)
            memory.enter("finish")

        build.load_model, loop.train_loop = load_model_measured, train_loop_measured  # where build_run, train call them
        code = cli.main(trainer_argv)
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "exit_code": code, "phases": memory.phases, "peak": memory.peak,
              "step_phases": memory.marks, "held": held, "step_cpu_seconds": step_cpu_seconds,
              "step_phase_seconds": observer.seconds}
    out = Path(options.out) / f"rank{rank}.json"
    out.with_suffix(".part").write_text(json.dumps(result, indent=1))
    os.replace(out.with_suffix(".part"), out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as fsam-train does: gloo can abort at interpreter exit after a good run


if __name__ == "__main__":
    main(sys.argv[1:])
