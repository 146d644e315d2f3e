"""ZeRO-Offload on 2 gloo ranks equals a single-process run of the core on the global batch (fp32):
`offload_optimizer` cpu at stages 1-3, `offload_param` cpu at stage 3, with one and with two
micro-batches per step (each pass then calls backward twice, so a gradient lost or doubled by the
offloaded accumulation would show). Plus the settings that are refused, and the shipped configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import mlp, run_equivalence_cases, run_fp16_overflow
from fsam_ds.sam.config import ConfigError
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
