"""The cheaper steps through SAMTrainer on 2 gloo ranks: a schedule (every:2, late:0.5), LookSAM's reuse and
fisher-msam give the weights of fsam-ds's engine path on the same micro-batches, and the Trainer's logs say
which steps were sharpness-aware."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

from dist_harness import run_distributed  # noqa: E402
from hf_cheap_workers import run_cheap_cases  # noqa: E402
from test_hf_trainer import TOLERANCE, start_params  # noqa: E402
from test_zero_equivalence import relative_update_error  # noqa: E402

BASE = {"sam_type": "fisher-sam", "rho": 0.05, "keep_ratio": 0.3, "mask_interval": 2, "seed": 1}
MSAM = {**BASE, "sam_type": "fisher-msam"}
# (stage, config, contrast: the same step without its cheap part, share of sharpness-aware steps logged per step)
CASES = [
    (2, {**BASE, "schedule": "every:2"}, BASE, [1, 0, 1, 0]),
    (2, {**BASE, "schedule": "every:2", "reuse": "looksam"}, {**BASE, "schedule": "every:2"}, [1, 0, 1, 0]),
    (2, {**BASE, "schedule": "late:0.5"}, BASE, [0, 0, 1, 1]),  # needs the Trainer's max_steps (4)
    (2, MSAM, {**MSAM, "rho": 0.0}, [0, 1, 1, 1]),  # MSAM's first step has no first moment: AdamW at w
    (3, MSAM, {**MSAM, "rho": 0.0}, [0, 1, 1, 1]),
]


def test_cheap_steps_through_the_trainer_equal_the_engine_path(tmp_path):
    cases = [{"stage": stage, "config": config, "contrast": contrast} for stage, config, contrast, _ in CASES]
    results = run_distributed(run_cheap_cases, 2, tmp_path, cases, str(tmp_path), use_deepspeed=True, timeout=400)
    start = start_params()
    for (stage, config, _, shares), rank0, rank1 in zip(CASES, *results):
        case = (stage, config)
        ours = torch.cat(rank0["params"])
        assert torch.equal(ours, torch.cat(rank1["params"])), ("ranks disagree", case)
        assert rank0["windows"] == [2, 2, 2, 1], case
        assert rank0["shares"] == shares == rank1["shares"], (case, rank0["shares"])
        assert relative_update_error(ours, torch.cat(rank0["engine_params"]), start) <= TOLERANCE, case
        # the cheap part changes the run by far more than the tolerance, so equality above is not trivial
        assert relative_update_error(ours, torch.cat(rank0["contrast_params"]), start) > 100 * TOLERANCE, case
