"""TRL's SFTTrainer and DPOTrainer through SAMTrainerMixin on 2 gloo ranks: the loss at step 0 is TRL's own (as
TRL's AdamW run logs it, and as a reference from the logits computes it), TRL's metrics are logged once per
micro-batch at w, and the weights equal fsam-ds's engine path on the same micro-batches."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("trl")

from dist_harness import run_distributed  # noqa: E402
from test_zero_equivalence import relative_update_error  # noqa: E402
from trl_workers import run_trl_cases, tiny_llama  # noqa: E402

TOLERANCE = 1e-4  # relative update error, as for the tiny BERT
LOSS_TOLERANCE = 1e-5


def start_params() -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in tiny_llama().parameters()])


def check_sft(case: dict, rank0: dict, rank1: dict) -> None:
    ours = torch.cat(rank0["params"])
    assert torch.equal(ours, torch.cat(rank1["params"])), ("ranks disagree", case)
    assert rank0["global_step"] == 2 and rank0["engine_steps"] == 2 and rank0["windows"] == [2, 2], case
    sam, adamw = rank0["sam_logs"][0], rank0["adamw_logs"][0]
    # step 0: TRL's completion-only loss, as TRL's AdamW run logs it and as the reference computes it
    assert abs(sam["loss"] - adamw["loss"]) <= LOSS_TOLERANCE, (case, sam["loss"], adamw["loss"])
    assert abs(sam["loss"] - rank0["reference"]) <= LOSS_TOLERANCE, (case, sam["loss"], rank0["reference"])
    if "prompt_too" in rank0:  # the wrong loss definition is far off
        assert abs(rank0["prompt_too"] - rank0["reference"]) > 100 * LOSS_TOLERANCE, (case, rank0["prompt_too"])
    # TRL's metrics of step 0 as its own run logs them: once per micro-batch, at w (ESAM's per-sequence losses
    # come from the model, not from SFTTrainer.compute_loss, which logs them)
    for key in () if "esam" in case["sam_type"] else ("num_tokens", "mean_token_accuracy", "entropy"):
        assert abs(sam[key] - adamw[key]) <= LOSS_TOLERANCE * max(1.0, abs(adamw[key])), (case, key, sam, adamw)
    error = relative_update_error(ours, torch.cat(rank0["engine_params"]), start_params())
    assert error <= TOLERANCE, (case, error)


def check_dpo(rank0: dict, rank1: dict) -> None:
    ours = torch.cat(rank0["params"])
    assert torch.equal(ours, torch.cat(rank1["params"])), "ranks disagree"
    sam, adamw = rank0["sam_logs"][0], rank0["adamw_logs"][0]
    # step 0: DPO's loss (policy and reference differ, so it is not log 2) and its metrics, as TRL logs them
    assert abs(sam["loss"] - rank0["reference"]) <= LOSS_TOLERANCE, (sam["loss"], rank0["reference"])
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "num_tokens"):
        assert abs(sam[key] - adamw[key]) <= LOSS_TOLERANCE * max(1.0, abs(adamw[key])), (key, sam, adamw)
    error = relative_update_error(ours, torch.cat(rank0["engine_params"]), start_params())
    assert error <= TOLERANCE, error
    assert "(chosen, rejected) pair" in rank0["esam_refusal"] and "fisher-sam" in rank0["esam_refusal"]


SFT_CASES = [{"stage": 3, "sam_type": "fisher-sam", "packing": False},
             {"stage": 3, "sam_type": "fisher-sam", "packing": True},
             {"stage": 2, "sam_type": "fisher-esam", "packing": False}]
DPO_CASE = {"stage": 2, "sam_type": "fisher-sam"}


@pytest.mark.slow
def test_sft_and_dpo_trainers_through_the_mixin(tmp_path):
    """SFT: completion-only loss, packing off and on (bfd, padding-free), fisher-sam at ZeRO-3 and fisher-esam
    (per-sequence losses) at ZeRO-2. DPO: fisher-sam at ZeRO-2, and ESAM refused. Gradient accumulation 2,
    2 steps each."""
    results = run_distributed(run_trl_cases, 2, tmp_path, SFT_CASES, DPO_CASE, str(tmp_path), use_deepspeed=True,
                              timeout=500)
    for case, rank0, rank1 in zip(SFT_CASES, results[0]["sft"], results[1]["sft"]):
        check_sft(case, rank0, rank1)
    check_dpo(results[0]["dpo"], results[1]["dpo"])
