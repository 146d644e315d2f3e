"""Code that runs inside the 2-rank DeepSpeed test processes (imported by the spawned workers).

The same workers run on GPUs (tests/test_cuda.py, NCCL): batches go to the rank's accelerator device
in `split`, and every tensor a worker returns is brought back to the CPU, where the tests compare."""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F

from fsam_ds.sam.config import SAMConfig


def mlp() -> nn.Module:
    torch.manual_seed(0)
    # the 3-wide last bias is not divisible by 2 ranks: ZeRO pads it
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))


def tiny_bert(dropout: float = 0.0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(cfg)


def tiny_gpt2() -> nn.Module:
    """A decoder whose lm_head is tied to the token embedding (one Parameter, listed once)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                     use_cache=False)
    return GPT2LMHeadModel(cfg)


def shared_layer_bert() -> nn.Module:
    """tiny_bert whose two encoder layers are one module (weights shared across checkpointed layers)."""
    model = tiny_bert()
    model.bert.encoder.layer[1] = model.bert.encoder.layer[0]
    return model


def build_model(kind: str, checkpointing: str | bool = False, ds_config: dict | None = None) -> nn.Module:
    """The test model of `kind` ("mlp", "bert", "shared", "gpt2"), with activation checkpointing as the
    trainer sets it."""
    model = {"mlp": mlp, "bert": tiny_bert, "shared": shared_layer_bert, "gpt2": tiny_gpt2}[kind]()
    if checkpointing:
        from fsam_ds.trainer.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model, checkpointing, ds_config)
    return model


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
            logits = module(batch["x"].to(next(module.parameters()).dtype))
        elif kind == "gpt2":  # next-token loss, averaged over each example's tokens
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            tokens = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:],
                                     reduction="none")
            return tokens.mean(dim=1)
        else:
            logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["y"], reduction="none")
    return loss


def sam_config(sam_type: str, **kw) -> SAMConfig:
    base = dict(sam_type=sam_type, rho=0.05, keep_ratio=0.3, mask_interval=2, beta=0.6, gamma=0.5, seed=1)
    base.update(kw)
    return SAMConfig(**base)


def ds_config(stage: int, dtype: str = "fp32", micro: int = 4, gas: int = 1, grad_clip: float = 0.0,
              **zero) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
           "zero_force_ds_cpu_optimizer": False,  # the tests pass torch.optim.AdamW, also under offload
           "zero_optimization": {"stage": stage, **zero}, "steps_per_print": 10 ** 6,
           "zero_allow_untested_optimizer": True, "wall_clock_breakdown": False,
           "gradient_clipping": grad_clip}  # explicit: DeepSpeed clips at 1.0 unless told otherwise
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 100,
                       "hysteresis": 1, "min_loss_scale": 1}
    return cfg


def split(batch: dict, rank: int, world: int, parts: int = 1) -> list[dict]:
    """This rank's share of a global batch, as `parts` micro-batches, on the rank's DeepSpeed device
    (the CPU under the CPU accelerator, where the move is free)."""
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().current_device_name()
    n = next(iter(batch.values())).shape[0]
    per_rank = n // world
    mine = {k: v[rank * per_rank:(rank + 1) * per_rank].to(device) for k, v in batch.items()}
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
        out.append((p.detach().float() if master is None else master).cpu().clone().reshape(-1))
    return out


def build_engine(model, stage, dtype="fp32", sam=None, lr=1e-2, gas=1, micro=4, grad_clip=0.0, planned_steps=None,
                 **zero):
    import fsam_ds.zero.engine as fe

    # the trainable tensors: all of a full model, the adapters of a peft model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    config = ds_config(stage, dtype, micro=micro, gas=gas, grad_clip=grad_clip, **zero)
    return fe.initialize(model=model, config=config, sam=sam, optimizer=optimizer, planned_steps=planned_steps)


def run_scheduled(rank: int, world: int, cases: list[tuple[int, str, dict, int]], kind: str = "mlp") -> list[dict]:
    """Per (stage, sam_type, SAMConfig overrides, steps): the full parameters after the steps and whether
    each step was sharpness-aware, on this rank's share of `global_batches` (planned_steps = steps)."""
    loss = per_example_loss(kind)
    out = []
    for stage, sam_type, overrides, steps in cases:
        sam_engine = build_engine(build_model(kind), stage, sam=sam_config(sam_type, **overrides),
                                  planned_steps=steps)
        kinds = []
        for b in global_batches(kind, steps):
            step = sam_engine.train_step(split(b, rank, world), loss)
            assert not step.skipped
            kinds.append(step.stats.sharpness_aware)
        out.append({"params": torch.cat(full_params(sam_engine.engine)), "kinds": kinds})
    return out


def train_equivalence(rank: int, world: int, stage: int, kind: str, sam_type: str, steps: int = 3,
                      overrides: dict | None = None, zero: dict | None = None, parts: int = 1,
                      checkpointing: str | bool = False, grad_clip: float = 0.0):
    """`steps` steps of `sam_type` on this rank's share of `global_batches`; returns the engine and the
    global gradient norm DeepSpeed recorded at each step (the one it clipped with)."""
    loss = per_example_loss(kind)
    model = build_model(kind, checkpointing)
    sam_engine = build_engine(model, stage, sam=sam_config(sam_type, **(overrides or {})), gas=parts,
                              micro=4 // parts, grad_clip=grad_clip, **(zero or {}))
    norms = []
    for b in global_batches(kind, steps):
        out = sam_engine.train_step(split(b, rank, world, parts), loss)
        assert not out.skipped
        norm = sam_engine.engine.get_global_grad_norm()
        norms.append(None if norm is None else float(norm))
    return sam_engine, norms


def run_equivalence(rank: int, world: int, stage: int, kind: str, types: list[str], steps: int = 3,
                    overrides: dict | None = None, zero: dict | None = None, parts: int = 1,
                    checkpointing: str | bool = False):
    return {sam_type: full_params(train_equivalence(rank, world, stage, kind, sam_type, steps, overrides, zero, parts,
                                                    checkpointing)[0].engine)
            for sam_type in types}


def run_checkpointed_equivalence(rank: int, world: int, stage: int, kind: str, types: list[str],
                                 modes: list[str], steps: int = 3) -> dict:
    """`run_equivalence` for each activation checkpointing mode, in one launch."""
    return {mode: run_equivalence(rank, world, stage, kind, types, steps, checkpointing=mode) for mode in modes}


def run_equivalence_cases(rank: int, world: int, cases: list[tuple[int, dict, int]], kind: str, types: list[str]):
    """`run_equivalence` for several (stage, zero_optimization extras, micro-batches) in one launch."""
    return [run_equivalence(rank, world, stage, kind, types, 3, None, zero, parts) for stage, zero, parts in cases]


def run_clipped_cases(rank: int, world: int, cases: list[tuple[int, dict, int, list[str]]], kind: str,
                      grad_clip: float, overrides: dict | None = None) -> list[dict]:
    """Runs of (stage, zero_optimization extras, micro-batches, types) with DeepSpeed's gradient clipping
    at `grad_clip`, in one launch: per case and type, the trained parameters and the gradient norm
    DeepSpeed clipped with at each step."""
    out = []
    for stage, zero, parts, types in cases:
        runs = {}
        for sam_type in types:
            sam_engine, norms = train_equivalence(rank, world, stage, kind, sam_type, 3, overrides, zero, parts,
                                                  grad_clip=grad_clip)
            runs[sam_type] = {"params": full_params(sam_engine.engine), "norms": norms}
        out.append(runs)
    return out


def full_grads(engine) -> list[torch.Tensor]:
    """The averaged full gradients in fp32 (collective; test-only)."""
    from deepspeed.utils import safe_get_full_grad

    out = []
    for p in engine.module.parameters():
        g = p.grad if engine.zero_optimization_stage() == 0 else safe_get_full_grad(p)
        out.append(g.detach().float().cpu().clone().reshape(-1))
    return out


def record_before_step(sam_engine, store: list) -> None:
    """Wraps engine.step on this instance so the second-pass gradient is recorded first."""
    engine = sam_engine.engine
    real_step = engine.step

    def step(*args, **kwargs):
        store.append(full_grads(engine))
        return real_step(*args, **kwargs)

    engine.step = step


def run_bf16(rank: int, world: int, stage: int, kind: str, sam_type: str, steps: int = 3):
    batches = global_batches(kind, steps)
    loss = per_example_loss(kind)
    model = mlp() if kind == "mlp" else tiny_bert()
    sam_engine = build_engine(model, stage, "bf16", sam=sam_config(sam_type))
    initial_master = full_params(sam_engine.engine)
    g2: list = []
    record_before_step(sam_engine, g2)
    masters, module_params = [], []
    for b in batches:
        out = sam_engine.train_step(split(b, rank, world), loss)
        assert not out.skipped
        masters.append(full_params(sam_engine.engine))
        module_params.append(module_full_params(sam_engine.engine))
    return {"initial_master": initial_master, "g2": g2, "masters": masters, "module": module_params}


def module_full_params(engine) -> list[torch.Tensor]:
    """The low-precision weights the forward pass uses (gathered under ZeRO-3; test-only)."""
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().cpu().clone().reshape(-1) for p in params]
    return [p.detach().cpu().clone().reshape(-1) for p in params]


def poisonable_loss(kind: str):
    """`per_example_loss(kind)` whose call number calls["poison"] returns inf (odd calls) or nan losses."""
    base = per_example_loss(kind)
    calls = {"n": 0, "poison": None}

    def loss(module, batch):
        calls["n"] += 1
        value = base(module, batch)
        if calls["poison"] == calls["n"]:
            value = value * float("inf") if calls["n"] % 2 else value * float("nan")
        return value

    return loss, calls


def run_fp16_overflow(rank: int, world: int, stage: int, sam_type: str, zero: dict | None = None):
    from fsam_ds.zero.engine import allow_fp16_on_cpu

    allow_fp16_on_cpu()
    batches = global_batches("mlp", 4)
    loss, calls = poisonable_loss("mlp")
    sam_engine = build_engine(mlp(), stage, "fp16", sam=sam_config(sam_type), **(zero or {}))
    report = {}
    # step 1 trains normally
    out = sam_engine.train_step(split(batches[0], rank, world), loss)
    report["first"] = (out.skipped, out.loss_scale)
    for name, offset in (("pass1", 1), ("pass2", 2)):
        before_master = full_params(sam_engine.engine)
        before_module = module_full_params(sam_engine.engine)
        scale = sam_engine.shards.loss_scale()
        passes = (1 if sam_engine.config.uses_momentum  # msam: the step's only pass (both cases poison it)
                  else 3 if sam_engine.config.uses_esam and sam_engine.config.gamma < 1 else 2)
        calls["poison"] = calls["n"] + (offset if offset == 1 else passes)
        out = sam_engine.train_step(split(batches[1], rank, world), loss)
        report[name] = {
            "skipped": out.skipped,
            "scale_before": scale, "scale_after": sam_engine.shards.loss_scale(),
            "master_same": all(torch.equal(a, b) for a, b in zip(before_master, full_params(sam_engine.engine))),
            "module_same": all(torch.equal(a, b) for a, b in
                               zip(before_module, module_full_params(sam_engine.engine))),
            "step_count": sam_engine.core.step_count,
        }
    calls["poison"] = None
    before = full_params(sam_engine.engine)
    out = sam_engine.train_step(split(batches[2], rank, world), loss)
    after = full_params(sam_engine.engine)
    report["next"] = {"skipped": out.skipped, "changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
                      "skipped_steps": sam_engine.skipped_steps, "ds_skipped": sam_engine.engine.skipped_steps}
    return report


def run_fp16_overflow_without_sharpness(rank: int, world: int, stage: int) -> dict:
    """fp16 fisher-sam with schedule every:2: step 0 is sharpness-aware; step 1 (one forward-backward, no
    second pass) overflows in its only pass, then is taken again without the overflow."""
    from fsam_ds.zero.engine import allow_fp16_on_cpu

    allow_fp16_on_cpu()
    batches = global_batches("mlp", 3)
    loss, calls = poisonable_loss("mlp")
    sam_engine = build_engine(mlp(), stage, "fp16", sam=sam_config("fisher-sam", schedule="every:2"))
    first = sam_engine.train_step(split(batches[0], rank, world), loss)
    before_master, before_module = full_params(sam_engine.engine), module_full_params(sam_engine.engine)
    scale = sam_engine.shards.loss_scale()
    calls["poison"] = calls["n"] + 1
    out = sam_engine.train_step(split(batches[1], rank, world), loss)
    report = {"first": (first.skipped, first.stats.sharpness_aware),
              "poisoned": {"skipped": out.skipped, "sharpness_aware": out.stats.sharpness_aware,
                           "scale_backed_off": sam_engine.shards.loss_scale() < scale,
                           "master_same": all(torch.equal(a, b) for a, b in
                                              zip(before_master, full_params(sam_engine.engine))),
                           "module_same": all(torch.equal(a, b) for a, b in
                                              zip(before_module, module_full_params(sam_engine.engine))),
                           "step_count": sam_engine.core.step_count}}
    calls["poison"] = None
    calls_before = calls["n"]
    out = sam_engine.train_step(split(batches[1], rank, world), loss)
    changed = any(not torch.equal(a, b) for a, b in zip(before_master, full_params(sam_engine.engine)))
    report["retried"] = {"skipped": out.skipped, "sharpness_aware": out.stats.sharpness_aware, "changed": changed,
                         "forwards": calls["n"] - calls_before}
    return report


def run_accumulation(rank: int, world: int, stage: int, sam_type: str, parts: int):
    batches = global_batches("mlp", 3)
    loss = per_example_loss("mlp")
    sam_engine = build_engine(mlp(), stage, sam=sam_config(sam_type), gas=parts, micro=4 // parts)
    for b in batches:
        assert not sam_engine.train_step(split(b, rank, world, parts), loss).skipped
    return full_params(sam_engine.engine)


def run_mask_capture(rank: int, world: int, stage: int, kind: str, keep_ratio: float):
    """One fisher-sam step; returns the gathered first-pass gradients and this rank's mask pieces."""
    batches = global_batches(kind, 1)
    loss = per_example_loss(kind)
    model = mlp() if kind == "mlp" else tiny_bert()
    sam_engine = build_engine(model, stage, sam=sam_config("fisher-sam", keep_ratio=keep_ratio))
    captured = {}
    real_first_pass = sam_engine.core.first_pass

    def first_pass(shards, lr):
        captured["g1"] = full_grads(sam_engine.engine)
        return real_first_pass(shards, lr)

    sam_engine.core.first_pass = first_pass
    sam_engine.train_step(split(batches[0], rank, world), loss)
    masks = [None if m is None else m for m in sam_engine.core._masks()]
    pieces = [(p.index, p.offset, p.size) for p in sam_engine.core.pieces]
    names = [n for n, p in sam_engine.engine.module.named_parameters()]
    return {"g1": captured["g1"], "masks": [m if isinstance(m, torch.Tensor) else None for m in masks],
            "pieces": pieces, "names": names}


def run_checkpoint(rank: int, world: int, stage: int, sam_type: str, directory: str, dtype: str = "fp32"):
    batches = global_batches("mlp", 6)
    loss = per_example_loss("mlp")
    straight = build_engine(mlp(), stage, dtype, sam=sam_config(sam_type))
    for b in batches:
        straight.train_step(split(b, rank, world), loss)
    expected = full_params(straight.engine)

    first = build_engine(mlp(), stage, dtype, sam=sam_config(sam_type))
    for b in batches[:3]:
        first.train_step(split(b, rank, world), loss)
    tag = first.save_checkpoint(directory)
    resumed = build_engine(mlp(), stage, dtype, sam=sam_config(sam_type))
    resumed.load_checkpoint(directory)
    step_after_load = resumed.core.step_count
    for b in batches[3:]:
        resumed.train_step(split(b, rank, world), loss)
    got = full_params(resumed.engine)

    # without the SAM state (mask, counters, generator) the run would differ
    blind = build_engine(mlp(), stage, dtype, sam=sam_config(sam_type))
    blind.engine.load_checkpoint(directory, tag=tag)
    for b in batches[3:]:
        blind.train_step(split(b, rank, world), loss)
    return {"expected": expected, "got": got, "blind": full_params(blind.engine), "step": step_after_load}


def run_shm_check(rank: int, world: int, released: bool) -> tuple[list[str], float]:
    """The group's DeepSpeed shared-memory segments still named in /dev/shm, and an all-reduce through them.
    Once released, a second release on one rank alone must return without a collective."""
    import os

    import deepspeed.comm as ds_comm

    from fsam_ds.zero.distributed import release_shm_buffer, shm_buffer_names

    if released and rank == 0:
        release_shm_buffer()
    torch.distributed.barrier()  # every rank has released (or not) its own segment
    left = [path.name for path in shm_buffer_names(os.environ["MASTER_PORT"])]
    total = torch.tensor([float(rank + 1)] * 8)
    ds_comm.inference_all_reduce(total)
    return left, total[0].item()


def fail_on_rank_one(rank: int, world: int) -> int:
    """Rank 1 fails; rank 0 would go on for ten minutes."""
    import time

    if rank == 1:
        raise ValueError("rank one gives up")
    time.sleep(600)
    return rank


class RecordingObserver:
    """A `StepObserver` that records every phase as the path of its enclosing phases ("first_pass/rebuild_mask")."""

    def __init__(self) -> None:
        self.open: list[str] = []
        self.seen: list[str] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.open.append(name)
        self.seen.append("/".join(self.open))
        try:
            yield
        finally:
            self.open.pop()


def run_observed_steps(rank: int, world: int, stage: int) -> list[list[str]]:
    """The phases of two fisher-sam steps (mask_interval 2: the first rebuilds, the second does not),
    then of one step of the AdamW baseline."""
    from fsam_ds.zero.engine import initialize_plain

    observer = RecordingObserver()
    sam_engine = build_engine(mlp(), stage, sam=sam_config("fisher-sam"))
    sam_engine.observer = observer
    seen = []
    batches = global_batches("mlp", 2)
    for b in batches:
        sam_engine.train_step(split(b, rank, world), per_example_loss("mlp"))
        seen.append(observer.seen)
        observer.seen = []
    model = mlp()
    initialize_plain(model, ds_config(stage), optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                     observer=observer).train_step(split(batches[0], rank, world), per_example_loss("mlp"))
    return seen + [observer.seen]


def run_fp16_skip_keeps_fisher(rank: int, world: int, stage: int) -> dict:
    """fisher-sam with the accumulated estimator on fp16: the second pass of a mask-rebuild step
    overflows. Returns the SAM state and the master before and after that step."""
    from fsam_ds.zero.engine import allow_fp16_on_cpu

    allow_fp16_on_cpu()
    batches = global_batches("mlp", 3)
    loss, calls = poisonable_loss("mlp")
    sam_engine = build_engine(mlp(), stage, "fp16", sam=sam_config("fisher-sam", fisher_estimator="accumulated"))
    core = sam_engine.core

    def state() -> dict:
        return {"master": full_params(sam_engine.engine), "step_count": core.step_count,
                "mask": [None if m is None else m.clone() for m in core.fisher_mask],
                "fisher_sum": [None if s is None else s.clone() for s in core.fisher_sum],
                "density": core.mask_density}

    for b in batches[:2]:  # step 0 builds the mask, step 1 accumulates
        assert not sam_engine.train_step(split(b, rank, world), loss).skipped
    before = state()
    calls["poison"] = calls["n"] + 2  # the second pass of the next step, which is due to rebuild
    out = sam_engine.train_step(split(batches[2], rank, world), loss)
    return {"before": before, "after": state(), "skipped": out.skipped, "rebuilt": out.stats.mask_rebuilt}


def dropout_bert() -> nn.Module:
    return tiny_bert(dropout=0.2)


DEEPSPEED_CHECKPOINTING = {"activation_checkpointing": {"cpu_checkpointing": False, "number_checkpoints": None}}


def run_dropout_under_checkpointing(rank: int, world: int, stage: int, variants: list[str]) -> dict:
    """fisher-sam on a BERT with dropout, the same seed for every variant: "off" (no checkpointing),
    torch's "reentrant"/"non_reentrant", DeepSpeed's ("deepspeed-reentrant", ...), and the deliberately
    wrong "no-rng-restore" (torch's non-reentrant checkpoint told not to restore the random state)."""
    from fsam_ds.trainer.activation_checkpointing import enable_activation_checkpointing

    batches = global_batches("bert", 2)
    loss = per_example_loss("bert")
    results = {}
    for variant in variants:
        model = dropout_bert()
        config = ds_config(stage)
        if variant == "no-rng-restore":
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False, "preserve_rng_state": False})
        elif variant.startswith("deepspeed-"):
            import deepspeed

            config.update(DEEPSPEED_CHECKPOINTING)
            enable_activation_checkpointing(model, variant.removeprefix("deepspeed-"), config)
            chosen = model.bert.encoder.layer[0]._gradient_checkpointing_func
            assert chosen is (deepspeed.checkpointing.checkpoint if variant == "deepspeed-reentrant"
                              else deepspeed.checkpointing.non_reentrant_checkpoint)
        elif variant != "off":
            enable_activation_checkpointing(model, variant, config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        import fsam_ds.zero.engine as fe

        sam_engine = fe.initialize(model=model, config=config, sam=sam_config("fisher-sam"), optimizer=optimizer)
        torch.manual_seed(100 + rank)
        for b in batches:
            assert not sam_engine.train_step(split(b, rank, world), loss).skipped
        results[variant] = torch.cat(full_params(sam_engine.engine))
    return results


def run_reused_parameters(rank: int, world: int, cases: list[tuple[int, str]], steps: int = 3) -> dict:
    """sam on `shared_layer_bert` with checkpointing enabled past the trainer's check, per (stage, mode):
    the parameters on success, DeepSpeed's error message on failure (put failing cases last)."""
    results = {}
    for stage, mode in cases:
        model = build_model("shared", mode)
        sam_engine = build_engine(model, stage, sam=sam_config("sam"))
        try:
            for b in global_batches("shared", steps):
                sam_engine.train_step(split(b, rank, world), per_example_loss("shared"))
        except AssertionError as err:
            results[(stage, mode)] = f"{err!s} ({traceback.format_exc(limit=-1).strip()})"
            continue
        results[(stage, mode)] = full_params(sam_engine.engine)
    return results


def run_each(rank: int, world: int, fn, cases: list[tuple]) -> list:
    """[fn(rank, world, *case) for each case] in one launch: starting the ranks costs more than these runs."""
    return [fn(rank, world, *case) for case in cases]


def run_jobs(rank: int, world: int, jobs: list[tuple]) -> list:
    """[fn(rank, world, *args) for each (fn, args)]: different workers in one launch."""
    return [fn(rank, world, *args) for fn, args in jobs]


def _share_master_with_weights(engine) -> None:
    """What DeepSpeed's ZeRO-3 means to do for fp32 weights (and 0.19.8 never does): the fp32 master
    becomes the weights' partition itself. Done before the first step, so no optimizer state moves."""
    zero = engine.optimizer
    for i, (weights, master) in enumerate(zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat)):
        shared = weights.detach()
        shared.requires_grad = True
        shared.grad = master.grad
        for group in zero.optimizer.param_groups:
            group["params"] = [shared if p is master else p for p in group["params"]]
        zero.fp32_partitioned_groups_flat[i] = shared


def run_master_shared_with_weights(rank: int, world: int) -> dict:
    """fisher-sam on the tiny BERT at ZeRO-3 fp32, 3 steps: DeepSpeed's layout; the master shared with
    the weights (refused?); and shared with the refusal bypassed."""
    import deepspeed

    import fsam_ds.zero.adapters as adapters
    import fsam_ds.zero.engine as fe

    batches = global_batches("bert", 3)

    def engine(share: bool):
        model = tiny_bert()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        ds_engine, *_ = deepspeed.initialize(model=model, config=ds_config(3), optimizer=optimizer)
        if share:
            _share_master_with_weights(ds_engine)
        return fe.SAMEngine(ds_engine, sam_config("fisher-sam"))

    def trained(sam_engine) -> list[torch.Tensor]:
        for b in batches:
            sam_engine.train_step(split(b, rank, world), per_example_loss("bert"))
        return full_params(sam_engine.engine)

    out = {"apart": trained(engine(share=False))}
    try:
        engine(share=True)
        out["refused"] = None
    except adapters.UnsupportedConfiguration as err:
        out["refused"] = str(err)
    check = adapters._EngineShards._require_master_apart
    adapters._EngineShards._require_master_apart = lambda self, weights_of, master_of: None
    try:
        out["shared"] = trained(engine(share=True))
    finally:
        adapters._EngineShards._require_master_apart = check
    return out


def with_lora(model: nn.Module) -> nn.Module:
    """`model` (tiny_bert, in memory or loaded) under LoRA as peft builds it for a classifier: its default
    targets for BERT (query, value), the classifier trained whole; the adapters drawn from seed 1."""
    import peft

    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8))


def lora_bert() -> nn.Module:
    return with_lora(tiny_bert())


def trainer_lora_bert(model_dir: str, config: dict, checkpointing: str | bool = False) -> nn.Module:
    """`lora_bert` built as fsam-train builds it: tiny_bert loaded from `model_dir` (partitioned at ZeRO-3),
    activation checkpointing, then the trainer's peft wrapping."""
    from fsam_ds.trainer.activation_checkpointing import enable_activation_checkpointing
    from fsam_ds.trainer.model_loading import load_model
    from fsam_ds.trainer.objectives import objective_for
    from fsam_ds.trainer.peft_model import wrap_with_peft
    from fsam_ds.trainer.run_config import PeftSection, TrainConfig

    cfg = TrainConfig(task="mnli", model=model_dir, peft=PeftSection(method="lora", r=4, alpha=8))  # 3 labels
    objective = objective_for(cfg)
    model = load_model(cfg, objective, config)
    enable_activation_checkpointing(model, checkpointing, config)
    torch.manual_seed(1)
    return wrap_with_peft(cfg, model, objective)


def named_full_params(engine) -> dict[str, torch.Tensor]:
    """Every parameter in fp32 by name, frozen ones included (gathered at ZeRO-3); collective, test-only."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    stage, out = engine.zero_optimization_stage(), {}
    for name, p in engine.module.named_parameters():
        master = safe_get_full_fp32_param(p) if stage > 0 and p.requires_grad else None
        if master is None:
            with deepspeed.zero.GatheredParameters([p]) if stage == 3 else contextlib.nullcontext():
                master = p.detach().clone()
        out[name] = master.float().cpu().clone()
    return out


def run_lora_equivalence(rank: int, world: int, model_dir: str, cases: list[tuple[int, str, dict, int, str | bool]],
                         steps: int = 3, dtype: str = "fp32") -> list[dict[str, torch.Tensor]]:
    """Per (stage, sam_type, zero_optimization extras, micro-batches, activation checkpointing): every
    parameter of `trainer_lora_bert` after `steps` steps on this rank's share of `global_batches` (in fp32:
    the master of a trainable one, a frozen one as it is in `dtype`)."""
    import fsam_ds.zero.engine as fe

    loss = per_example_loss("bert")
    out = []
    for stage, sam_type, zero, parts, checkpointing in cases:
        config = ds_config(stage, dtype, micro=4 // parts, gas=parts, **zero)
        model = trainer_lora_bert(model_dir, config, checkpointing)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        sam_engine = fe.initialize(model=model, config=config, sam=sam_config(sam_type), optimizer=optimizer)
        for b in global_batches("bert", steps):
            assert not sam_engine.train_step(split(b, rank, world, parts), loss).skipped
        out.append(named_full_params(sam_engine.engine))
    return out


def engine_state(engine) -> dict:
    """Full fp32 weights (the master of a trainable one, a frozen one as it is), the forward pass's weights,
    and this rank's part of the base optimizer's state (the torch AdamW under DeepSpeed's wrapper: moments
    and step of its flat partitions); collective, test-only."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {"master": list(named_full_params(engine).values()), "module": module_full_params(engine),
            "optimizer": [value.detach().clone().reshape(-1) for state in base.state.values()
                          for value in state.values() if torch.is_tensor(value)]}


def run_lora_fp16_overflow(rank: int, world: int, cases: list[tuple[int, int]]) -> list[dict]:
    """Per (stage, pass): fisher-sam on `lora_bert` in fp16 (DeepSpeed's dynamic loss scale): a clean step,
    a step whose loss is not finite in that pass (1 at w, 2 at w + e), then the same batch again without
    it. The engine's state before and after the poisoned step and after the retried one, the loss scales
    around the poisoned step, and which steps were skipped."""
    from fsam_ds.zero.engine import allow_fp16_on_cpu

    allow_fp16_on_cpu()
    out = []
    for stage, poisoned_pass in cases:
        batches = global_batches("bert", 2)
        loss, calls = poisonable_loss("bert")
        sam_engine = build_engine(lora_bert(), stage, "fp16", sam=sam_config("fisher-sam"))
        first = sam_engine.train_step(split(batches[0], rank, world), loss)
        states, scales = [engine_state(sam_engine.engine)], [sam_engine.shards.loss_scale()]
        calls["poison"] = calls["n"] + poisoned_pass  # one micro-batch: one loss call per pass
        poisoned = sam_engine.train_step(split(batches[1], rank, world), loss)
        states.append(engine_state(sam_engine.engine))
        scales.append(sam_engine.shards.loss_scale())
        calls["poison"] = None
        retried = sam_engine.train_step(split(batches[1], rank, world), loss)
        states.append(engine_state(sam_engine.engine))
        out.append({"skipped": [first.skipped, poisoned.skipped, retried.skipped], "scales": scales,
                    "states": states, "names": [n for n, _ in sam_engine.engine.module.named_parameters()]})
    return out


def run_lora_checkpoint_keys(rank: int, world: int, folder: str, stages: list[int]) -> dict[int, list[str]]:
    """Per stage, the module entries of the checkpoint that `SAMEngine.save_checkpoint(exclude_frozen_parameters=
    True)` writes for `tiny_gpt2` (embedding tied to its LM head) under LoRA, after one step."""
    import peft

    out = {}
    for stage in stages:
        model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8))
        sam_engine = build_engine(model, stage, sam=sam_config("fisher-sam"))
        sam_engine.train_step(split(global_batches("gpt2", 1)[0], rank, world), per_example_loss("gpt2"))
        sam_engine.save_checkpoint(folder, tag=f"stage{stage}", exclude_frozen_parameters=True)
        states = torch.load(next((Path(folder) / f"stage{stage}").glob("*model_states.pt")), weights_only=False)
        out[stage] = sorted(states["module"])
        sam_engine.engine.destroy()
    return out
