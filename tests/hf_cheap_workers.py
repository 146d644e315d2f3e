"""Code that runs inside the 2-rank Trainer tests of the cheaper steps (schedules, LookSAM, MSAM).

Each case trains the tiny BERT classifier with `SAMTrainer` under one `SAMConfig`, then fsam-ds's engine
path (`fsam_ds.initialize` + `train_step`) on the micro-batches the Trainer handed to each optimizer step,
with that config and, as the contrast the test must tell apart, a second config that changes only the
cheap part (the schedule, the reuse, or MSAM's radius)."""

from __future__ import annotations

import os
from typing import Any

import torch

from benchmarks.ranks import accelerate_on_gloo
from ds_workers import ds_config, full_params, tiny_bert
from hf_workers import (ACCUMULATION, LR, PER_DEVICE_BATCH, bert_loss, examples, param_groups, recording,
                        training_args)
from fsam_ds.sam.config import SAMConfig

COUNT = 28  # 2 ranks x 2 per micro-batch x 2 per step: 4 optimizer steps of 2, 2, 2 and 1 micro-batches


def engine_path(stage: int, config: SAMConfig, windows: list[list[dict]]) -> list[torch.Tensor]:
    """fsam-ds's own path over the Trainer's micro-batches: same init, optimizer groups, linear schedule."""
    from transformers import get_linear_schedule_with_warmup

    import fsam_ds.zero.engine as fe

    model = tiny_bert()
    optimizer = torch.optim.AdamW(param_groups(model), lr=LR)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, len(windows))
    sam_engine = fe.initialize(model=model, config=ds_config(stage, micro=PER_DEVICE_BATCH, gas=ACCUMULATION),
                               sam=config, optimizer=optimizer, lr_scheduler=schedule, planned_steps=len(windows))
    for window in windows:
        assert not sam_engine.train_step(window, bert_loss).skipped
    return full_params(sam_engine.engine)


def run_cheap_cases(rank: int, world: int, cases: list[dict[str, Any]], out_dir: str) -> list[dict]:
    """Per case (stage, config, contrast: SAMConfigs as dicts): the Trainer's weights, windows and logged
    sharpness-aware shares, and the engine path's weights for the config and for the contrast."""
    from fsam_ds.hf.trainer import SAMTrainer

    accelerate_on_gloo()
    out = []
    for index, case in enumerate(cases):
        config = SAMConfig(**case["config"])
        args = training_args(os.path.join(out_dir, f"case{index}"), case["stage"])
        trainer = recording(SAMTrainer)(model=tiny_bert(), args=args, train_dataset=examples(COUNT), sam=config)
        trainer.train()
        out.append({"params": full_params(trainer.model_wrapped), "windows": [len(w) for w in trainer.windows],
                    "shares": [e.get("sharpness_aware_share") for e in trainer.state.log_history if "loss" in e],
                    "engine_params": engine_path(case["stage"], config, trainer.windows),
                    "contrast_params": engine_path(case["stage"], SAMConfig(**case["contrast"]), trainer.windows)})
    return out
