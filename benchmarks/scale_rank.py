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
  moves wall-clock step times by more than the differences measured);
* finish: the final evaluation and export, and the process group's teardown.

`--whole-load` makes `load_model` load the whole model on every rank (no `zero.Init`), as the trainer
did at ZeRO-3 before it loaded partitioned; nothing else changes. Writes DIR/rank<RANK>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.measure import BackgroundPeak


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
        import fsam_ds.trainer.loop as loop

        load_model, train_loop = loop.load_model, loop.train_loop
        step_cpu_seconds: list[float] = []

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
                start = time.process_time()
                out = train_step(*args, **kwargs)
                step_cpu_seconds.append(time.process_time() - start)
                return out

            run.sam_engine.train_step = train_step_timed  # this engine only: an attribute over its method
            train_loop(run, rng)
            memory.enter("finish")

        loop.load_model, loop.train_loop = load_model_measured, train_loop_measured
        code = cli.main(trainer_argv)
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "exit_code": code, "phases": memory.phases, "peak": memory.peak,
              "step_cpu_seconds": step_cpu_seconds}
    out = Path(options.out) / f"rank{rank}.json"
    out.with_suffix(".part").write_text(json.dumps(result, indent=1))
    os.replace(out.with_suffix(".part"), out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as fsam-train does: gloo can abort at interpreter exit after a good run


if __name__ == "__main__":
    main(sys.argv[1:])
