"""fsam-train: fine-tune a sequence(-pair) classifier, a causal LM (prompt -> completion) or a seq2seq model
with a SAM-family step on DeepSpeed ZeRO 0-3.

    fsam-train --config launch/configs/rte.yaml --seed=2                      # one process
    torchrun --nproc_per_node 4 -m fsam_ds.train --config launch/configs/rte.yaml
    deepspeed --num_gpus 4 --module fsam_ds.train --config launch/configs/rte.yaml
    fsam-train ... --sam.sam_type=none                                        # the plain AdamW baseline
    fsam-train ... --resume=true                                              # continue a killed run

The run itself is `fsam_ds.trainer.loop.train`; this module turns argv into a configuration, sets
up the process group and turns known errors into one paragraph: exit status 2 for a configuration
or data error found before training, 3 for a run that failed while training (e.g. every update skipped).
"""

from __future__ import annotations

import os
import sys
import traceback

import torch.distributed as dist

from fsam_ds.trainer.loop import KNOWN_ERRORS, RUN_ERRORS, train
from fsam_ds.trainer.run_config import load_config
from fsam_ds.zero.distributed import init_distributed, teardown


def _report(err: BaseException) -> None:
    # one message per node: the same bad setting fails on every rank, a missing file maybe on one node
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print(f"fsam-train: error: {err}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the trainer; returns the exit status (0; 2 for a known configuration/data error; 3 for a run
    that stopped because it was not training, see `fsam_ds.trainer.loop.TrainingFailed`).

    From the command line (argv None) the process then leaves with os._exit, because gloo can abort
    at interpreter exit after a good run; called with an argv list it returns the status instead.
    """
    cli = argv is None
    code = 0
    try:
        cfg = load_config(sys.argv[1:] if cli else list(argv))
        rank, world = init_distributed()
        train(cfg, rank, world)
        teardown()
    except (*KNOWN_ERRORS, *RUN_ERRORS) as err:
        _report(err)
        code = 3 if isinstance(err, RUN_ERRORS) else 2
        if not cli and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may not get this far
    except Exception:
        if not cli:
            raise
        # an unexpected error: its traceback, then a plain exit 1 (leaving through the interpreter with
        # DeepSpeed's and gloo's threads alive aborts with "terminate called", exit 134)
        traceback.print_exc()
        code = 1
    if cli:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    main()
