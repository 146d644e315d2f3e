"""DeepSpeed config resolution: shipped files, "auto" filling, and every clash the trainer must refuse."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest

from fsam_ds.sam import config as sam_config
from fsam_ds.zero.ds_config import PRECISIONS, ConfigError, build_ds_config, resolve_ds_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "ds_configs"
CELLS = [(stage, precision) for stage in range(4) for precision in PRECISIONS]
BASE = dict(micro_batch_size=4, grad_accum=2, world_size=3, grad_clip=0.0)


def resolve(ds_config, precision="fp32", zero_stage=2, **overrides):
    return resolve_ds_config(ds_config, precision=precision, zero_stage=zero_stage, **{**BASE, **overrides})


def autos(node, path=""):
    """Dotted paths of every "auto" left in a config."""
    join = (lambda key: f"{path}.{key}") if path else str
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in autos(v, join(k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in autos(v, join(i))]
    return [path] if node == "auto" else []


def test_exactly_the_twelve_files_ship():
    # besides the offload variants, which tests/test_zero_offload.py checks
    names = sorted(p.name for p in CONFIG_DIR.glob("*.json") if "offload" not in p.name)
    assert names == sorted(f"zero{s}_{p}.json" for s, p in CELLS)


@pytest.mark.parametrize("stage,precision", CELLS)
def test_file_matches_builder_and_has_no_optimizer(stage, precision):
    on_disk = json.loads((CONFIG_DIR / f"zero{stage}_{precision}.json").read_text())
    assert on_disk == build_ds_config(precision, stage)
    assert "optimizer" not in on_disk and "scheduler" not in on_disk
    # at stage 3 the buckets are sized from the model: DeepSpeed's 5e8-element default is a 2 GB fp32 buffer
    buckets = [f"zero_optimization.{k}" for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size") if stage == 3]
    assert sorted(autos(on_disk)) == sorted(["gradient_accumulation_steps", "gradient_clipping", "train_batch_size",
                                             "train_micro_batch_size_per_gpu", *buckets])
    zero = on_disk["zero_optimization"]
    assert "offload_optimizer" not in zero and "offload_param" not in zero
    if stage == 3:
        assert zero["stage3_param_persistence_threshold"] == 100_000
    if precision == "fp16":
        assert on_disk["fp16"]["loss_scale"] == 0


@pytest.mark.parametrize("stage,precision", CELLS)
def test_every_file_resolves_to_concrete_numbers(stage, precision):
    path = CONFIG_DIR / f"zero{stage}_{precision}.json"
    if (stage, precision) == (0, "fp16"):
        with pytest.warns(UserWarning, match="stage 0 with fp16"):
            out = resolve(path, precision, stage)
    else:
        out = resolve(path, precision, stage)
    assert autos(out) == []
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 4 * 2 * 3
    assert out["gradient_clipping"] == 0.0
    assert out["zero_optimization"]["stage"] == stage
    assert out["fp16"]["enabled"] is (precision == "fp16")
    assert out["bf16"]["enabled"] is (precision == "bf16")


@pytest.mark.parametrize("stage,precision", CELLS)
def test_deepspeed_accepts_the_resolved_config(stage, precision):
    # DeepSpeed's own parser rejects misspelt keys and checks the batch arithmetic (1 process here).
    runtime_config = pytest.importorskip("deepspeed.runtime.config")
    for source in (CONFIG_DIR / f"zero{stage}_{precision}.json", None):
        with pytest.warns(UserWarning) if (stage, precision) == (0, "fp16") else contextlib.nullcontext():
            out = resolve(source, precision, stage, world_size=1, grad_clip=1.0)
        parsed = runtime_config.DeepSpeedConfig(out)
        assert parsed.zero_optimization_stage == stage
        assert parsed.train_batch_size == 8 and parsed.gradient_clipping == 1.0
        assert parsed.float16_config.enabled == (precision == "fp16")
        assert parsed.bfloat16_config.enabled == (precision == "bf16")


def test_none_builds_from_precision_and_stage():
    out = resolve(None, "bf16", 3)
    assert out["bf16"]["enabled"] is True and out["zero_optimization"]["stage"] == 3
    assert autos(out) == []


def test_input_dict_is_not_modified():
    original = build_ds_config("bf16", 1)
    kept = copy.deepcopy(original)
    resolve(original, "bf16", 1)
    assert original == kept


def test_concrete_values_that_agree_are_kept():
    cfg = {"train_batch_size": 24, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "gradient_clipping": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}
    out = resolve(cfg, "bf16", 2, grad_clip=1.0)
    assert out["train_batch_size"] == 24 and out["fp16"]["enabled"] is False


def test_missing_fields_are_filled_and_auto_precision_follows_argument():
    out = resolve({"fp16": {"enabled": "auto", "initial_scale_power": "auto", "loss_scale_window": 500}},
                  "fp16", 1)
    assert out["fp16"] == {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 500,
                           "loss_scale": 0, "hysteresis": 2, "min_loss_scale": 1}
    assert out["zero_optimization"] == {"stage": 1}
    assert out["train_batch_size"] == 24 and out["gradient_clipping"] == 0.0


def test_optimizer_and_scheduler_autos_are_filled():
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto"}},
           "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": "auto", "total_num_steps": "auto",
                                                              "warmup_max_lr": "auto", "warmup_min_lr": "auto"}}}
    out = resolve(cfg, lr=2e-5, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6, total_steps=1018, warmup_steps=61)
    assert out["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}
    assert out["scheduler"]["params"] == {"warmup_num_steps": 61, "total_num_steps": 1018,
                                          "warmup_max_lr": 2e-5, "warmup_min_lr": 0.0}


def test_hf_style_bucket_autos_use_hidden_size_or_deepspeed_defaults():
    zero = {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto"}
    sized = resolve({"zero_optimization": dict(zero)}, zero_stage=3, hidden_size=1024)["zero_optimization"]
    assert sized == {"stage": 3, "reduce_bucket_size": 1024 * 1024, "stage3_prefetch_bucket_size": 943718,
                     "stage3_param_persistence_threshold": 10240}
    assert resolve({"zero_optimization": dict(zero)}, zero_stage=3)["zero_optimization"] == {"stage": 3}


def test_offload_with_device_none_is_allowed():
    out = resolve({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}})
    assert out["zero_optimization"]["offload_optimizer"] == {"device": "none"}


def test_native_deepspeed_auto_passes_through():
    out = resolve({"data_types": {"keep_in_fp32_modules": "auto"}})
    assert out["data_types"]["keep_in_fp32_modules"] == "auto"


# (config, resolve keyword arguments, substrings the message must contain)
CLASHES = {
    "bf16 file, fp32 run": ({"bf16": {"enabled": True}}, {"precision": "fp32"},
                            ["bf16.enabled", "true", "'fp32'", "--precision=bf16"]),
    "fp16 run, fp16 disabled": ({"fp16": {"enabled": False}}, {"precision": "fp16"},
                                ["fp16.enabled", "false", "'fp16'"]),
    "both half precisions": ({"fp16": {"enabled": True}, "bf16": {"enabled": True}}, {"precision": "bf16"},
                             ["fp16.enabled", "bf16.enabled", "both true", "'bf16'"]),
    "train batch": ({"train_batch_size": 64}, {}, ["train_batch_size", "64", "4 x 2 x 3 = 24"]),
    "grad accum": ({"gradient_accumulation_steps": 8}, {}, ["gradient_accumulation_steps", "8",
                                                             "data.grad_accum", "2", "--data.grad_accum=8"]),
    "micro batch": ({"train_micro_batch_size_per_gpu": 16}, {}, ["train_micro_batch_size_per_gpu", "16",
                                                                  "data.micro_batch_size", "4"]),
    "zero stage": ({"zero_optimization": {"stage": 3}}, {"zero_stage": 1}, ["zero_optimization.stage", "3",
                                                                            "zero_stage is 1", "--zero_stage=3"]),
    "clipping": ({"gradient_clipping": 1.0}, {"grad_clip": 0.0}, ["gradient_clipping", "1.0", "optim.grad_clip",
                                                                   "0.0"]),
    "param offload below stage 3": ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, {},
                                    ["zero_optimization.offload_param", "stage 2", "zero_stage=3"]),
    "nvme offload below stage 3": ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
                                   {}, ["offload_optimizer.device", "'nvme'", "stage 3", "'cpu'"]),
    "legacy offload": ({"zero_optimization": {"stage": 2, "cpu_offload": True}}, {}, ["cpu_offload", "Remove"]),
    "pipeline": ({"pipeline": {"stages": 2}}, {}, ["'pipeline'", "not supported", "Remove 'pipeline'"]),
    "optimizer lr": ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, {"lr": 2e-5},
                     ["optimizer.params.lr", "1e-05", "optim.lr", "2e-05"]),
    "scheduler steps": ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 500}}},
                        {"total_steps": 1018}, ["scheduler.params.total_num_steps", "500", "1018"]),
    "unknown auto": ({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}, "foo": ["auto"]}, {},
                     ["zero_optimization.sub_group_size", "foo.0", "cannot resolve"]),
    "auto lr without a value": ({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}, {},
                                ["optimizer.params.lr", "cannot resolve"]),
    "bad enabled": ({"bf16": {"enabled": "yes"}}, {}, ["bf16.enabled", "'yes'"]),
}


@pytest.mark.parametrize("name", list(CLASHES))
def test_clash_raises_config_error_naming_field_and_values(name):
    cfg, kwargs, needles = CLASHES[name]
    with pytest.raises(ConfigError) as info:
        resolve(cfg, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} missing from: {message}"
    assert message.startswith("DeepSpeed config (dict): ")


def test_file_errors_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": "auto",\n oops}')
    with pytest.raises(ConfigError, match=r"bad\.json.*line 2"):
        resolve(bad)
    clash = tmp_path / "clash.json"
    clash.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match=r"clash\.json.*bf16\.enabled"):
        resolve(clash)


@pytest.mark.parametrize("kwargs,needle", [
    ({"precision": "fp8"}, "precision is 'fp8'"),
    ({"zero_stage": 4}, "zero_stage is 4"),
    ({"grad_accum": 0}, "data.grad_accum is 0"),
    ({"world_size": 1.5}, "world_size is 1.5"),
    ({"grad_clip": -1.0}, "optim.grad_clip is -1.0"),
])
def test_bad_arguments_are_rejected(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(None, **kwargs)


def test_config_error_is_the_package_wide_value_error():
    assert ConfigError is sam_config.ConfigError and issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("stage, round_robin, refused", [(1, True, True), (2, True, True), (2, False, False),
                                                          (3, True, False), (0, True, False)])
def test_round_robin_gradients_is_refused_where_it_reorders_the_shards(stage, round_robin, refused):
    """Only ZeRO 1/2 reorder the flat buffer (tests/test_round_robin.py shows the wrong update)."""
    from fsam_ds.zero.ds_config import check_sam_compatible

    config = {"zero_optimization": {"stage": stage, "round_robin_gradients": round_robin}}
    context = pytest.raises(ConfigError, match="round_robin_gradients") if refused else contextlib.nullcontext()
    with context:
        check_sam_compatible(config)


def test_auto_values_left_for_the_hugging_face_trainer_pass_only_when_said_so():
    from fsam_ds.zero.ds_config import check_sam_compatible

    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 2}}
    check_sam_compatible(config, auto_filled_later=True)
    with pytest.raises(ConfigError, match='still has "auto" for train_micro_batch_size_per_gpu'):
        check_sam_compatible(config)
    with pytest.raises(ConfigError, match="round_robin_gradients"):  # the other checks still apply
        check_sam_compatible({**config, "zero_optimization": {"stage": 2, "round_robin_gradients": True}},
                             auto_filled_later=True)
