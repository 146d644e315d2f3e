"""Code that runs inside the 2-rank TRL test processes (imported by the spawned workers).

A tiny Llama (built from its config, 2 layers) with a word-level tokenizer trains on prompt/completion
text (SFT) or prompt/chosen/rejected text (DPO) through `sam_trainer(SFTTrainer)` / `sam_trainer(DPOTrainer)`
and through TRL's own trainer with AdamW on the same data. The SAM runs record the micro-batches of each
optimizer step; a second copy then trains through fsam-ds's engine path on them, with losses written here
from the logits (not TRL's fused LM head), so the references share no code with TRL or the mixin."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.ranks import accelerate_on_gloo
from ds_workers import full_params, sam_config
from hf_workers import trainer_ds_config

LR = 1e-2
BATCH = 2
ACCUMULATION = 2
STEPS = 2
BETA = 0.5  # DPO's beta
WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa", "lam", "mu"]
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(config)


def _sentence(g: torch.Generator, low: int, high: int) -> str:
    length = int(torch.randint(low, high + 1, (), generator=g))
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g))


def sft_rows(count: int) -> list[dict]:
    """Prompts of 3-8 words and completions of 1-6: sequences with different numbers of labelled tokens."""
    g = torch.Generator().manual_seed(7)
    return [{"prompt": _sentence(g, 3, 8), "completion": " " + _sentence(g, 1, 6)} for _ in range(count)]


def dpo_rows(count: int) -> list[dict]:
    g = torch.Generator().manual_seed(8)
    return [{"prompt": _sentence(g, 2, 5), "chosen": " " + _sentence(g, 1, 4), "rejected": " " + _sentence(g, 1, 4)}
            for _ in range(count)]


def common_args(stage: int) -> dict:
    """One value each for what TRL's configs and the Trainer would otherwise choose for us (bf16, the schedule,
    the per-process batch): AdamW without weight decay at a constant lr, no clipping."""
    return {"deepspeed": trainer_ds_config(stage, "trainer"), "per_device_train_batch_size": BATCH,
            "gradient_accumulation_steps": ACCUMULATION, "max_steps": STEPS, "learning_rate": LR, "weight_decay": 0.0,
            "max_grad_norm": 0.0, "optim": "adamw_torch", "lr_scheduler_type": "constant", "report_to": [],
            "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "dataloader_pin_memory": False,
            "bf16": False, "seed": 3}


def recording(base: type) -> type:
    """`base` that records the micro-batches of each of the Trainer's optimizer steps."""

    class Recording(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.windows: list[list[dict]] = []

        def training_step(self, model, inputs, num_items_in_batch=None):
            if len(self.windows) == self.state.global_step:
                self.windows.append([])
            self.windows[-1].append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return super().training_step(model, inputs, num_items_in_batch)

    return Recording


def logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------- references, written from the logits
def token_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token NLL of the next token [batch, len - 1], zero where unlabelled; the labelled mask)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    # without a cache, transformers reads packed sequences off the position ids and keeps them apart
    logits = model(**inputs, use_cache=False).logits.float()[:, :-1]
    targets = batch["labels"][:, 1:]
    labelled = targets.ne(-100)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1), reduction="none")
    return nll.view(targets.shape) * labelled, labelled


def global_sum(value: float) -> float:
    import torch.distributed as dist

    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total)


def sft_reference_loss(model, windows: list[list[dict]], prompt_too: bool = False) -> float:
    """SFT's loss at the first step: every labelled token of the step on both ranks weighs the same. With
    `prompt_too` (the deliberately wrong variant), the prompt's tokens are labelled too."""
    total = count = 0.0
    with torch.no_grad():
        for batch in windows[0]:
            if prompt_too:
                batch = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"].eq(0), -100)}
            nll, labelled = token_losses(model, batch)
            total, count = total + float(nll.sum()), count + float(labelled.sum())
    return global_sum(total) / global_sum(count)


def sft_engine_loss(world: int, esam: bool):
    """The engine path's SFT loss for one window: each micro-batch's token sum over the window's labelled tokens
    on all ranks, times the ranks and the window's length (the engine averages both); for ESAM per sequence,
    times the batch size (the engine averages the sequences too)."""
    def for_window(window: list[dict]):
        tokens = global_sum(sum(float(b["labels"][:, 1:].ne(-100).sum()) for b in window))

        def loss(module, batch):
            nll, _ = token_losses(module, batch)
            sums = nll.sum(dim=1) * (world * len(window) / tokens)
            return sums * BATCH if esam else sums.sum().reshape(1)  # BATCH: ESAM's second pass sees fewer rows
        return loss
    return for_window


def engine_path(model, stage: int, sam_type: str, windows: list[list[dict]], loss_for_window) -> list:
    import fsam_ds.zero.engine as fe
    from ds_workers import ds_config

    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sam_engine = fe.initialize(model=model, config=ds_config(stage, micro=BATCH, gas=ACCUMULATION),
                               sam=sam_config(sam_type), optimizer=optimizer)
    for window in windows:
        assert not sam_engine.train_step(window, loss_for_window(window)).skipped
    return full_params(sam_engine.engine)


# ---------------------------------------------------------------- SFT
def sft_trainer(out_dir: str, stage: int, sam_type: str | None, packing: bool, count: int):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fsam_ds.hf import sam_trainer

    packed = {"packing": True, "packing_strategy": "bfd", "max_length": 24} if packing else {"max_length": 32}
    args = SFTConfig(output_dir=out_dir, completion_only_loss=True, dataset_num_proc=None, **packed,
                     **common_args(stage))
    kwargs = dict(model=tiny_llama(), args=args, train_dataset=Dataset.from_list(sft_rows(count)),
                  processing_class=tokenizer())
    if sam_type is None:
        return SFTTrainer(**kwargs)
    return recording(sam_trainer(SFTTrainer))(**kwargs, sam=sam_config(sam_type))


def run_sft_cases(rank: int, world: int, cases: list[dict], out_dir: str) -> list[dict]:
    """Per case (stage, sam_type, packing): TRL's SFTTrainer with AdamW, then through the mixin; the losses and
    metrics each logged, the step-0 references, and the engine path's weights on the mixin's micro-batches."""
    accelerate_on_gloo()
    out = []
    for case in cases:
        started = time.perf_counter()
        folder = os.path.join(out_dir, f"sft-{case['stage']}-{case['sam_type']}-{case['packing']}")
        count = 40 if case["packing"] else 16
        adamw = sft_trainer(folder + "-adamw", case["stage"], None, case["packing"], count)
        adamw.train()
        sam = sft_trainer(folder, case["stage"], case["sam_type"], case["packing"], count)
        sam.train()
        run = {"adamw_logs": logs(adamw), "sam_logs": logs(sam), "windows": [len(w) for w in sam.windows],
               "params": full_params(sam.model_wrapped), "global_step": sam.state.global_step,
               "engine_steps": sam.model_wrapped.global_steps,
               "reference": sft_reference_loss(tiny_llama(), sam.windows),
               "labelled": [int(b["labels"][:, 1:].ne(-100).sum()) for b in sam.windows[0]]}
        if not case["packing"]:
            run["prompt_too"] = sft_reference_loss(tiny_llama(), sam.windows, prompt_too=True)
        run["engine_params"] = engine_path(tiny_llama(), case["stage"], case["sam_type"], sam.windows,
                                           sft_engine_loss(world, sam.sam_config.uses_esam))
        run["seconds"] = time.perf_counter() - started
        out.append(run)
    return out


# ---------------------------------------------------------------- DPO
def dpo_trainer(out_dir: str, stage: int, sam_type: str | None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from fsam_ds.hf import sam_trainer

    args = DPOConfig(output_dir=out_dir, beta=BETA, max_length=24, dataset_num_proc=None, **common_args(stage))
    # a reference other than the policy's start, so that the loss at step 0 is not log 2 whatever the code does
    kwargs = dict(model=tiny_llama(), ref_model=tiny_llama(seed=1), args=args,
                  train_dataset=Dataset.from_list(dpo_rows(16)), processing_class=tokenizer())
    if sam_type is None:
        return DPOTrainer(**kwargs)
    return recording(sam_trainer(DPOTrainer))(**kwargs, sam=sam_config(sam_type))


def sequence_logps(model, batch: dict) -> torch.Tensor:
    """Each row's summed log-probability of its completion tokens."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"].eq(0), -100)
    nll, _ = token_losses(model, {**batch, "labels": labels})
    return -nll.sum(dim=1)


def dpo_engine_loss(reference):
    """DPO's sigmoid loss per micro-batch, the mean over its pairs (rows: the chosen, then the rejected)."""
    def for_window(window: list[dict]):
        def loss(module, batch):
            with torch.no_grad():
                ref_chosen, ref_rejected = sequence_logps(reference, batch).chunk(2)
            chosen, rejected = sequence_logps(module, batch).chunk(2)
            margin = (chosen - ref_chosen) - (rejected - ref_rejected)
            return -F.logsigmoid(BETA * margin).mean().reshape(1)
        return loss
    return for_window


def run_dpo_cases(rank: int, world: int, stage: int, sam_type: str, out_dir: str) -> dict:
    from fsam_ds.sam.config import ConfigError

    accelerate_on_gloo()
    adamw = dpo_trainer(os.path.join(out_dir, "dpo-adamw"), stage, None)
    adamw.train()
    sam = dpo_trainer(os.path.join(out_dir, "dpo-sam"), stage, sam_type)
    sam.train()
    reference = tiny_llama(seed=1).eval()
    with torch.no_grad():
        step0 = [float(dpo_engine_loss(reference)(None)(tiny_llama(), b)) for b in sam.windows[0]]
    run = {"adamw_logs": logs(adamw), "sam_logs": logs(sam), "params": full_params(sam.model_wrapped),
           "reference": global_sum(sum(step0) / len(step0)) / world,
           "engine_params": engine_path(tiny_llama(), stage, sam_type, sam.windows, dpo_engine_loss(reference))}
    esam = dpo_trainer(os.path.join(out_dir, "dpo-esam"), stage, "esam")
    try:
        esam.train()
    except ConfigError as err:
        run["esam_refusal"] = str(err)
    return run


def run_trl_cases(rank: int, world: int, sft_cases: list[dict], dpo_case: dict, out_dir: str) -> dict:
    """The SFT cases and the DPO case in one pair of processes (starting them costs more than a case)."""
    return {"sft": run_sft_cases(rank, world, sft_cases, out_dir),
            "dpo": run_dpo_cases(rank, world, dpo_case["stage"], dpo_case["sam_type"], out_dir)}
