"""ZeRO-Offload on 2 gloo ranks equals a single-process run of the core on the global batch (fp32):
`offload_optimizer` cpu at stages 1-3, `offload_param` cpu at stage 3, with one and with two
micro-batches per step (each pass then calls backward twice, so a gradient lost or doubled by the
offloaded accumulation would show), and with gradient clipping active. Plus the settings that are
refused, and the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import build_model, global_batches, mlp, per_example_loss, run_clipped_cases, run_equivalence_cases, \
    run_fp16_overflow, sam_config
from fsam_ds.sam.config import SAM_TYPES, ConfigError
from fsam_ds.sam.optim import SAMOptimizer
from fsam_ds.zero.ds_config import build_ds_config, check_sam_compatible, resolve_ds_config
from fsam_ds.zero.offload import check_offload
from test_zero_equivalence import reference, relative_update_error
from test_zero_precision_and_state import assert_overflow_changes_nothing

pytest.importorskip("deepspeed")

CPU = {"device": "cpu"}
CASES = {
    "optimizer-1": (1, {"offload_optimizer": CPU}),
    "optimizer-2": (2, {"offload_optimizer": CPU}),
    "optimizer-3": (3, {"offload_optimizer": CPU}),
    "param-3": (3, {"offload_optimizer": CPU, "offload_param": CPU}),
}
TYPES = ["sam", "fisher-sam"]
# every case with one micro-batch (two backward passes per step); accumulation (four) where the offloaded
# gradient path differs: ZeRO-1/2's CPU accumulation buffers (shared by both stages) and ZeRO-3's.
# One launch per group: starting the ranks costs more than the runs.
GROUPS = {"stages-1-2": [("optimizer-1", 1), ("optimizer-2", 1), ("optimizer-2", 2)],
          "stage-3": [("optimizer-3", 1), ("param-3", 1), ("param-3", 2)]}


@pytest.mark.parametrize("group", list(GROUPS))
def test_offload_matches_single_process(group, tmp_path):
    """Without the counter reset between the passes (`restart_offloaded_accumulation`) ZeRO-1/2 adds the
    previous second-pass gradient to the current one: a relative update error of about 0.4 here."""
    runs = GROUPS[group]
    cases = [(CASES[case][0], CASES[case][1], parts) for case, parts in runs]
    results = run_distributed(run_equivalence_cases, 2, tmp_path, cases, "mlp", TYPES, use_deepspeed=True,
                              timeout=600)
    start = torch.cat([p.detach().reshape(-1) for p in mlp().parameters()])
    references = {sam_type: reference("mlp", sam_type) for sam_type in TYPES}
    wrongs = {(sam_type, variant): reference("mlp", sam_type, variant=variant)
              for sam_type in TYPES for variant in ("no-perturbation", "summed")}
    for (case, parts), mine, other in zip(runs, results[0], results[1]):
        for sam_type in TYPES:
            ours = torch.cat(mine[sam_type])
            assert torch.equal(ours, torch.cat(other[sam_type])), (case, parts, "ranks disagree")
            err = relative_update_error(ours, references[sam_type], start)
            assert err <= 1e-5, (case, parts, sam_type, err)
            # g1 + g2 (the first pass's gradient kept), or no perturbation, differ by far more
            for variant in ("no-perturbation", "summed"):
                wrong = relative_update_error(ours, wrongs[sam_type, variant], start)
                assert wrong > 1e-3, (case, parts, sam_type, variant, wrong)


class ClippedAdamW(torch.optim.AdamW):
    """torch AdamW after DeepSpeed's gradient clipping (`unscale_and_clip_grads`): every gradient times
    min(1, max_norm / (norm + 1e-6)), where norm is the global L2 norm of the gradients in place, or
    `norm_of()` when given. `norms` records the norm of each step."""

    def __init__(self, params, max_norm: float, norm_of=None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm, self.norm_of, self.norms = max_norm, norm_of, []

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = self.norm_of() if self.norm_of is not None else float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.norms.append(norm)
        for g in grads:
            g.mul_(min(1.0, self.max_norm / (norm + 1e-6)))
        return super().step(closure)


def clipped_reference(kind: str, sam_type: str, max_norm: float, steps: int = 3, norm: str = "corrected",
                      **overrides) -> tuple[torch.Tensor, list[float]]:
    """The single-process run of `reference` with the second-pass gradient clipped at `max_norm`; returns
    the parameters and the norm clipped with at each step. norm="uncorrected" is the deliberately wrong
    variant: the gsam types clip with the norm of the gradient before GSAM's correction."""
    model = build_model(kind)
    loss = per_example_loss(kind)
    uncorrected: list[float] = []

    def base(groups, **kwargs):
        return ClippedAdamW(groups, max_norm, (lambda: uncorrected[-1]) if norm == "uncorrected" else None, **kwargs)

    opt = SAMOptimizer(model.named_parameters(), base, sam_config(sam_type, **overrides), lr=1e-2, weight_decay=0.0)
    second_pass = opt.core.second_pass

    def recording_second_pass(shards):
        uncorrected.append(float(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))))
        return second_pass(shards)

    opt.core.second_pass = recording_second_pass
    for b in global_batches(kind, steps):
        opt.step_batch(b, lambda batch: loss(model, batch))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), opt.base_optimizer.norms


GRAD_CLIP = 0.2  # below every step's gradient norm here (0.7 to 3): every step clips
# a radius and GSAM weight at which the correction changes the gradient's norm by 1-3 % (0.3 % at the defaults)
CLIP_OVERRIDES = {"rho": 0.3, "alpha": 1.0}
GSAM_TYPES = ["gsam", "fisher-gsam"]
# the gsam types wherever the offloaded norm is recorded differently (ZeRO-1, ZeRO-2, ZeRO-2 accumulating);
# every type once, to show the others' norms (ESAM's second pass on a subset included) are right as recorded
CLIP_RUNS = [("optimizer-1", 1, GSAM_TYPES), ("optimizer-2", 1, SAM_TYPES), ("optimizer-2", 2, GSAM_TYPES)]


def test_clipping_under_optimizer_offload_uses_the_gradient_stepped_with(tmp_path):
    """With gradient clipping on, DeepSpeed's clip coefficient comes from the gradient the optimizer steps
    with, at ZeRO-1/2 with offload_optimizer. For the gsam types that is GSAM's corrected second-pass
    gradient: under optimizer offload DeepSpeed records each parameter's gradient norm during the backward
    (`norm_for_param_grads`), before the correction, and clipped with that before the adapter stored the
    corrected norms (relative update error 7e-4 for gsam, 2e-3 for fisher-gsam: the "uncorrected" reference)."""
    cases = [(CASES[case][0], CASES[case][1], parts, types) for case, parts, types in CLIP_RUNS]
    results = run_distributed(run_clipped_cases, 2, tmp_path, cases, "mlp", GRAD_CLIP, CLIP_OVERRIDES,
                              use_deepspeed=True, timeout=600)
    start = torch.cat([p.detach().reshape(-1) for p in mlp().parameters()])
    references = {sam_type: clipped_reference("mlp", sam_type, GRAD_CLIP, **CLIP_OVERRIDES) for sam_type in SAM_TYPES}
    for sam_type, (_, norms) in references.items():
        assert min(norms) > 2 * GRAD_CLIP, (sam_type, norms)  # clipping is active at every step
    unclipped = {sam_type: reference("mlp", sam_type, **CLIP_OVERRIDES) for sam_type in SAM_TYPES}
    uncorrected = {sam_type: clipped_reference("mlp", sam_type, GRAD_CLIP, norm="uncorrected", **CLIP_OVERRIDES)[0]
                   for sam_type in GSAM_TYPES}
    for (case, parts, types), mine, other in zip(CLIP_RUNS, results[0], results[1]):
        for sam_type in types:
            expected, expected_norms = references[sam_type]
            ours = torch.cat(mine[sam_type]["params"])
            assert torch.equal(ours, torch.cat(other[sam_type]["params"])), (case, parts, "ranks disagree")
            norm_errors = [abs(a - b) / b for a, b in zip(mine[sam_type]["norms"], expected_norms)]
            assert max(norm_errors) <= 1e-5, (case, parts, sam_type, mine[sam_type]["norms"], expected_norms)
            err = relative_update_error(ours, expected, start)
            assert err <= 1e-5, (case, parts, sam_type, err)
            wrong = relative_update_error(ours, unclipped[sam_type], start)
            assert wrong > 1e-3, (case, parts, sam_type, "unclipped", wrong)
            if sam_type in GSAM_TYPES:
                wrong = relative_update_error(ours, uncorrected[sam_type], start)
                assert wrong > 1e-4, (case, parts, sam_type, "uncorrected", wrong)


@pytest.mark.parametrize("stage", [2, 3])
def test_fp16_overflow_under_offload_changes_nothing(stage, tmp_path):
    """An overflow in either pass skips the step and leaves master and weights as they were, with the
    fp32 master and gradients offloaded (DeepSpeed tracks overflow in the CPU copies there)."""
    assert_overflow_changes_nothing(run_distributed(run_fp16_overflow, 2, tmp_path, stage, "fisher-sam",
                                                    {"offload_optimizer": CPU}, use_deepspeed=True)[0])


def _fails(config: dict, stage: int, nvme: bool = False) -> str:
    with pytest.raises(ConfigError) as err:
        check_offload(config, stage, _raise, nvme_available=lambda: nvme)
    return str(err.value)


def _raise(message: str) -> None:
    raise ConfigError(message)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_param_offload_is_refused_below_stage_3(stage):
    message = _fails({"zero_optimization": {"stage": stage, "offload_param": CPU}}, stage)
    assert "offload_param" in message and f"stage {stage}" in message and "zero_stage=3" in message


def test_optimizer_offload_is_refused_at_stage_0():
    message = _fails({"zero_optimization": {"offload_optimizer": CPU}}, 0)
    assert "offload_optimizer" in message and "stage 0" in message and "stages 1, 2 and 3" in message


def test_nvme_is_refused_without_async_io_and_below_stage_3():
    nvme = {"device": "nvme", "nvme_path": "/local_nvme"}
    message = _fails({"zero_optimization": {"offload_optimizer": nvme}}, 3, nvme=False)
    assert "async_io" in message and "libaio" in message and "'cpu'" in message
    message = _fails({"zero_optimization": {"offload_optimizer": nvme}}, 2, nvme=True)
    assert "NVMe only at ZeRO stage 3" in message
    assert check_offload({"zero_optimization": {"offload_optimizer": nvme}}, 3, _raise, nvme_available=lambda: True)


def test_unknown_device_and_legacy_flags_are_refused():
    assert "'disk'" in _fails({"zero_optimization": {"offload_optimizer": {"device": "disk"}}}, 2)
    message = _fails({"zero_optimization": {"cpu_offload": True}}, 2)
    assert "cpu_offload" in message and "offload_optimizer" in message


def test_initialize_check_refuses_param_offload_at_stage_2():
    with pytest.raises(ConfigError, match="offload_param"):
        check_sam_compatible({"zero_optimization": {"stage": 2, "offload_param": CPU}})


def test_client_optimizer_is_allowed_under_offload_and_forcing_deepspeeds_is_refused():
    """The trainer passes torch.optim.AdamW, which DeepSpeed refuses under offload unless told otherwise."""
    def resolve(config: dict) -> dict:
        return resolve_ds_config(config, precision="fp32", zero_stage=2, micro_batch_size=2, grad_accum=1,
                                 world_size=2, grad_clip=0.0)

    assert resolve({"zero_optimization": {"offload_optimizer": CPU}})["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in resolve({"zero_optimization": {"stage": 2}})
    for zero in ({"offload_optimizer": CPU}, {"stage": 2}):  # "auto" is filled last, offloaded or not
        assert resolve({"zero_optimization": zero, "zero_force_ds_cpu_optimizer": "auto"})[
            "zero_force_ds_cpu_optimizer"] is False
    with pytest.raises(ConfigError, match="zero_force_ds_cpu_optimizer is True"):
        resolve({"zero_optimization": {"offload_optimizer": CPU}, "zero_force_ds_cpu_optimizer": True})


CONFIG_DIR = Path(__file__).parent.parent / "ds_configs"
OFFLOAD_CONFIGS = sorted(CONFIG_DIR.glob("*offload*.json"))
OFFLOAD_VARIANTS = {"zero1_offload": (1, False), "zero2_offload": (2, False), "zero3_offload": (3, False),
                    "zero3_offload_param": (3, True)}


def test_exactly_the_offload_variants_ship_and_are_listed():
    names = sorted(p.name for p in OFFLOAD_CONFIGS)
    assert names == sorted(f"{v}_{p}.json" for v in OFFLOAD_VARIANTS for p in ("bf16", "fp32"))
    listing = (CONFIG_DIR / "README.md").read_text()
    assert all(f"`{variant}_{{bf16,fp32}}.json`" in listing for variant in OFFLOAD_VARIANTS)


@pytest.mark.parametrize("path", OFFLOAD_CONFIGS, ids=lambda p: p.name)
def test_offload_config_is_the_plain_config_plus_offload(path):
    """Each variant differs from the plain config of its stage and precision only by the offload sections."""
    variant, precision = path.stem.rsplit("_", 1)
    stage, params = OFFLOAD_VARIANTS[variant]
    expected = build_ds_config(precision, stage)
    expected["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params:
        expected["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    expected["zero_force_ds_cpu_optimizer"] = False
    assert json.loads(path.read_text()) == expected


@pytest.mark.parametrize("path", OFFLOAD_CONFIGS, ids=lambda p: p.name)
def test_offload_config_resolves_as_shipped(path):
    raw = json.loads(path.read_text())
    stage = raw["zero_optimization"]["stage"]
    precision = "bf16" if raw["bf16"]["enabled"] else "fp32"
    out = resolve_ds_config(str(path), precision=precision, zero_stage=stage, micro_batch_size=2, grad_accum=1,
                            world_size=2, grad_clip=0.0)
    assert out["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert out["zero_force_ds_cpu_optimizer"] is False
    check_sam_compatible(out)
    # the same file at another stage is a clash the resolver names
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        resolve_ds_config(str(path), precision=precision, zero_stage=1 if stage != 1 else 2, micro_batch_size=2,
                          grad_accum=1, world_size=2, grad_clip=0.0)


@pytest.fixture(scope="module")
def train_assets(tmp_path_factory) -> dict[str, Path]:
    import train_fixtures as fx

    root = tmp_path_factory.mktemp("offload_assets")
    train, dev = fx.write_sst2_files(root / "sst2")
    return {"model": fx.write_tiny_model(root / "model"), "train": train, "dev": dev}


def _train(assets: dict[str, Path], out: Path, stage: int, ds_config: str) -> dict:
    import train_fixtures as fx
    from dist_harness import free_port

    args = fx.base_args(assets["model"], assets["train"], assets["dev"], out, zero_stage=stage, precision="bf16",
                        ds_config=ds_config)
    cmd = [str(fx.BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "-m", "fsam_ds.train", *args]
    result = fx.run(cmd, 600)
    summary = fx.summary(out)
    assert summary is not None and summary["steps"] == 8, result.stdout[-4000:]
    return fx.final_weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage,offloaded", [(2, "zero2_offload_bf16.json"), (3, "zero3_offload_param_bf16.json")])
def test_trainer_with_offload_config_exports_the_same_model(train_assets, tmp_path, stage, offloaded):
    """fsam-train (fisher-sam, 2 ranks, bf16) with a shipped offload config as it is trains bit for bit
    the model of the plain config: offload moves buffers, not arithmetic. Without the accumulation
    restart between the passes the ZeRO-2 run differs."""
    plain = _train(train_assets, tmp_path / "plain", stage, f"ds_configs/zero{stage}_bf16.json")
    ours = _train(train_assets, tmp_path / "offload", stage, f"ds_configs/{offloaded}")
    assert plain.keys() == ours.keys()
    for name in plain:
        assert torch.equal(plain[name], ours[name]), name
    from transformers import AutoModelForSequenceClassification

    initial = AutoModelForSequenceClassification.from_pretrained(train_assets["model"]).state_dict()
    assert not torch.equal(initial["classifier.weight"], ours["classifier.weight"])  # it did train
