"""Code that runs inside the 2-rank DeepSpeed test processes (imported by the spawned workers)."""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from fsam_ds.config import SAMConfig

SAM_TYPES = ["sam", "esam", "gsam", "fisher-sam", "fisher-esam", "fisher-gsam"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    # the 3-wide last bias is not divisible by 2 ranks: ZeRO pads it
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def global_batches(kind: str, steps: int, n: int = 8):
    g = torch.Generator().manual_seed(11)
    out = []
    for _ in range(steps):
        if kind == "mlp":
            out.append({"x": torch.randn(n, 16, generator=g), "y": torch.randint(0, 3, (n,), generator=g)})
        else:
            out.append({"input_ids": torch.randint(1, 97, (n, 12), generator=g),
                        "attention_mask": torch.ones(n, 12, dtype=torch.long),
                        "y": torch.randint(0, 3, (n,), generator=g)})
    return out


def per_example_loss(kind: str):
    def loss(module, batch):
        if kind == "mlp":
            logits = module(batch["x"])
        else:
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["y"], reduction="none")
    return loss


def sam_config(sam_type: str, **kw) -> SAMConfig:
    base = dict(sam_type=sam_type, rho=0.05, keep_ratio=0.3, mask_interval=2, beta=0.6, gamma=0.5, seed=1)
    base.update(kw)
    return SAMConfig(**base)


def ds_config(stage: int, dtype: str = "fp32", micro: int = 4, gas: int = 1, **zero) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "zero_optimization": {"stage": stage, **zero}, "steps_per_print": 10 ** 6,
           "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
           "gradient_clipping": 0.0}  # DeepSpeed clips at 1.0 unless told otherwise
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 100,
                       "hysteresis": 1, "min_loss_scale": 1}
    return cfg


def split(batch: dict, rank: int, world: int, parts: int = 1) -> list[dict]:
    """This rank's share of a global batch, as `parts` micro-batches."""
    n = next(iter(batch.values())).shape[0]
    per_rank = n // world
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    size = per_rank // parts
    return [{k: v[i * size:(i + 1) * size] for k, v in mine.items()} for i in range(parts)]


def full_params(engine) -> list[torch.Tensor]:
    """Full fp32 parameters (master where DeepSpeed keeps one); collective, test-only gather."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        if engine.zero_optimization_stage() == 0:
            master = None
        else:
            master = safe_get_full_fp32_param(p)
        out.append((p.detach().float() if master is None else master).clone().reshape(-1))
    return out


def build_engine(model, stage, dtype="fp32", sam=None, lr=1e-2, gas=1, micro=4, **zero):
    import fsam_ds.engine as fe

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return fe.initialize(model=model, config=ds_config(stage, dtype, micro=micro, gas=gas, **zero), sam=sam,
                         optimizer=optimizer)


def run_equivalence(rank: int, world: int, stage: int, kind: str, types: list[str], steps: int = 3):
    results = {}
    batches = global_batches(kind, steps)
    loss = per_example_loss(kind)
    for sam_type in types:
        model = mlp() if kind == "mlp" else tiny_bert()
        sam_engine = build_engine(model, stage, sam=sam_config(sam_type))
        for b in batches:
            out = sam_engine.train_step(split(b, rank, world), loss)
            assert not out.skipped
        results[sam_type] = full_params(sam_engine.engine)
    return results
