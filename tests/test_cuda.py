"""The DeepSpeed checks on CUDA over NCCL, marked `cuda`: skipped without a GPU (CI never needs one);
`scripts/gpu_check.sh` runs them.

Every visible GPU that divides the 8-example global batch is a rank. One GPU is enough: at world
size 1 DeepSpeed still flattens and partitions, so the ZeRO adapters' code paths run. The workers,
references and assertions are the CPU tests' own; what differs here is the backend (NCCL, tensors on
the device, CPU histograms staged through it) and the precisions: bf16 and fp16 with DeepSpeed's loss
scaler on a GPU rather than the CPU accelerator's emulation.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import (build_model, mlp, run_bf16, run_checkpointed_equivalence, run_each, run_equivalence,
                        run_equivalence_cases, run_fp16_overflow)
from fsam_ds.sam.config import MSAM_TYPES, SAM_TYPES
from test_activation_checkpointing import reference as checkpointing_reference
from test_zero_equivalence import reference, relative_update_error
from test_zero_offload import CASES as OFFLOAD_CASES, GROUPS as OFFLOAD_GROUPS
from test_zero_precision_and_state import assert_bf16_update_applied, assert_overflow_changes_nothing

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

STAGES = [1, 2, 3]
TYPES = ["sam", "fisher-sam"]
CPU = {"device": "cpu"}


def gpu_ranks() -> int:
    """The most visible GPUs that split the 8-example global batch evenly (1, 2, 4 or 8)."""
    return max(n for n in (1, 2, 4, 8) if n <= torch.cuda.device_count())


def run_nccl(fn, tmp_path: Path, *args) -> list:
    # the ranks are killed before pytest-timeout (240 s in scripts/gpu_check.sh) would leave them orphaned on the GPU
    return run_distributed(fn, gpu_ranks(), tmp_path, *args, use_deepspeed=True, backend="nccl", timeout=200)


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def assert_ranks_agree(results: list, pick) -> None:
    for other in results[1:]:
        assert torch.equal(torch.cat(pick(results[0])), torch.cat(pick(other))), "ranks disagree"


def test_stages_match_single_process_all_types(tmp_path):
    """fp32 ZeRO 1-3 (and two micro-batches at stage 3) against SAMOptimizer on the CPU, 1e-5."""
    cases = [(stage, {}, 1) for stage in STAGES] + [(3, {}, 2)]
    results = run_nccl(run_equivalence_cases, tmp_path, cases, "mlp", SAM_TYPES)
    start = flat(mlp())
    for index, (stage, _, parts) in enumerate(cases):
        for sam_type in SAM_TYPES:
            assert_ranks_agree(results, lambda r: r[index][sam_type])
            ours = torch.cat(results[0][index][sam_type])
            err = relative_update_error(ours, reference("mlp", sam_type), start)
            assert err <= 1e-5, (stage, parts, sam_type, err)
            for variant in ("no-perturbation", "summed", "no-restore"):
                wrong = relative_update_error(ours, reference("mlp", sam_type, variant=variant), start)
                assert wrong > 1e-3, (stage, parts, sam_type, variant, wrong)


def test_msam_stages_match_single_process(tmp_path):
    """msam and fisher-msam at fp32 ZeRO 1-3 (first moments read from the device's optimizer state, and
    offloaded at stage 2) against SAMOptimizer on the CPU, 1e-5; the CPU test's wrong variants fail."""
    from test_msam import msam_reference

    cases = [(stage, {}, 1) for stage in STAGES] + [(2, {"offload_optimizer": CPU}, 1)]
    results = run_nccl(run_equivalence_cases, tmp_path, cases, "mlp", list(MSAM_TYPES))
    start = flat(mlp())
    for index, case in enumerate(cases):
        for sam_type in MSAM_TYPES:
            assert_ranks_agree(results, lambda r: r[index][sam_type])
            ours = torch.cat(results[0][index][sam_type])
            assert relative_update_error(ours, reference("mlp", sam_type), start) <= 1e-5, (case, sam_type)
            for variant in ("sign", "per-tensor", "none"):
                wrong = relative_update_error(ours, msam_reference(sam_type, 3, variant), start)
                assert wrong > 1e-3, (case, sam_type, variant, wrong)


def test_offload_matches_single_process(tmp_path):
    """offload_optimizer cpu at stages 1-3 and offload_param cpu at stage 3: fp32 master and gradients
    in CPU buffers while the module and its forward run on the GPU."""
    runs = [run for group in OFFLOAD_GROUPS.values() for run in group]
    cases = [(OFFLOAD_CASES[case][0], OFFLOAD_CASES[case][1], parts) for case, parts in runs]
    results = run_nccl(run_equivalence_cases, tmp_path, cases, "mlp", TYPES)
    start = flat(mlp())
    for index, (case, parts) in enumerate(runs):
        for sam_type in TYPES:
            assert_ranks_agree(results, lambda r: r[index][sam_type])
            ours = torch.cat(results[0][index][sam_type])
            err = relative_update_error(ours, reference("mlp", sam_type), start)
            assert err <= 1e-5, (case, parts, sam_type, err)
            wrong = relative_update_error(ours, reference("mlp", sam_type, variant="summed"), start)
            assert wrong > 1e-3, (case, parts, sam_type, wrong)


def test_checkpointed_tiny_bert_matches_single_process(tmp_path):
    """Activation checkpointing (reentrant and not) with both passes, ZeRO 1-3, tiny BERT, 1e-4."""
    modes = ["reentrant", "non_reentrant"]
    cases = [(stage, "bert", TYPES, modes) for stage in STAGES]
    results = run_nccl(run_each, tmp_path, run_checkpointed_equivalence, cases)
    start = flat(build_model("bert"))
    for sam_type in TYPES:
        ref = checkpointing_reference("bert", sam_type)
        wrong = checkpointing_reference("bert", sam_type, summed=True)
        for index, stage in enumerate(STAGES):
            for mode in modes:
                assert_ranks_agree(results, lambda r: r[index][mode][sam_type])
                ours = torch.cat(results[0][index][mode][sam_type])
                err = relative_update_error(ours, ref, start)
                assert err <= 1e-4, (stage, mode, sam_type, err)
                assert relative_update_error(ours, wrong, start) > 1e-2, (stage, mode, sam_type)


def test_tied_gpt2_at_stage_3_matches_single_process(tmp_path):
    results = run_nccl(run_equivalence, tmp_path, 3, "gpt2", TYPES)
    start = flat(build_model("gpt2"))
    for sam_type in TYPES:
        ours = torch.cat(results[0][sam_type])
        err = relative_update_error(ours, checkpointing_reference("gpt2", sam_type), start)
        assert err <= 1e-4, (sam_type, err)
        assert relative_update_error(ours, checkpointing_reference("gpt2", sam_type, summed=True), start) > 1e-2


def test_bf16_update_applied_at_unperturbed_master(tmp_path):
    results = run_nccl(run_each, tmp_path, run_bf16, [(stage, "mlp", "fisher-sam") for stage in STAGES])
    for stage, report in zip(STAGES, results[0]):
        try:
            assert_bf16_update_applied(report, device="cuda")
        except AssertionError as err:
            raise AssertionError(f"stage {stage}: {err}") from err


FP16_CASES = [(1, "fisher-sam", None), (2, "fisher-sam", None), (3, "fisher-sam", None), (2, "fisher-esam", None),
              (3, "gsam", None), (2, "fisher-sam", {"offload_optimizer": CPU}),
              (3, "fisher-sam", {"offload_optimizer": CPU})]


def test_fp16_overflow_in_either_pass_changes_nothing(tmp_path):
    """DeepSpeed's dynamic loss scaler on a GPU: an inf or nan loss in either pass skips the step,
    halves the scale and changes neither master nor module weights, with and without offload."""
    results = run_nccl(run_each, tmp_path, run_fp16_overflow, FP16_CASES)
    for case, report in zip(FP16_CASES, results[0]):
        try:
            assert_overflow_changes_nothing(report)
        except AssertionError as err:
            raise AssertionError(f"{case}: {err}") from err
