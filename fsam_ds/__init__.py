"""fsam-ds: Fisher-mask SAM and the SAM family, in plain PyTorch and on DeepSpeed ZeRO 0-3.

Four parts, each importing only the ones before it, and `fsam_ds.hf` beside the trainer:

* `fsam_ds.sam`: the SAM-family math on shards, its configuration and the plain-PyTorch optimizer
  (torch only);
* `fsam_ds.zero`: DeepSpeed: per-stage shard adapters, the engine, config checks, process groups;
* `fsam_ds.trainer`: the fine-tuning run: configuration, tasks, data, evaluation, checkpoints, loop;
* `fsam_ds.cli`: the commands (train, launch, sweep, report, demo) and asset fetching;
* `fsam_ds.hf`: Hugging Face's Trainer under --deepspeed (imports `sam` and `zero` only).
"""

from fsam_ds.sam import ConfigError, SAMConfig, SAMOptimizer

__all__ = ["ConfigError", "SAMConfig", "SAMEngine", "SAMOptimizer", "initialize", "zero_init"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the DeepSpeed side is imported on first use, so that `fsam_ds.sam` works without DeepSpeed
    if name in ("SAMEngine", "initialize", "zero_init"):
        from fsam_ds.zero import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'fsam_ds' has no attribute {name!r}")
