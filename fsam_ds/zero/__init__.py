"""The SAM family on DeepSpeed: per-stage shard adapters, the engine, config checks, process groups.
Imports `fsam_ds.sam`, never the trainer."""
