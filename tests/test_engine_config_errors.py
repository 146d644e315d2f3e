"""fsam_ds.initialize refuses DeepSpeed settings the SAM step cannot run with, before DeepSpeed starts."""

from __future__ import annotations

import pytest
import torch.nn as nn

from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.zero.engine import initialize

pytest.importorskip("deepspeed")


@pytest.mark.parametrize("config,words", [
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, ["offload_param", "stage 2", "stage 3"]),
    ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}},
     ["offload_optimizer", "stage 0", "stages 1, 2 and 3"]),
    ({"zero_optimization": {"stage": 1}, "pipeline": {"stages": 2}}, ["pipeline", "Remove"]),
    ({"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}}, ["fp16", "stage 0", "stage 1, 2 or 3"]),
    ({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"},
     ["train_micro_batch_size_per_gpu", "resolve_ds_config"]),
])
def test_unsupported_deepspeed_settings_fail_at_initialisation(config, words):
    with pytest.raises(ConfigError) as err:
        initialize(model=nn.Linear(2, 2), config=config, sam=SAMConfig())
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_model_without_trainable_parameters_fails_at_initialisation():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        initialize(model=model, config={"zero_optimization": {"stage": 1}}, sam=SAMConfig())
