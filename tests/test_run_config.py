import dataclasses
import json
import re

import pytest

from fsam_ds.trainer.run_config import (
    ConfigError, SAMSection, TrainConfig, config_from_dict, config_keys, config_to_dict, load_config,
)

BASE = ["--task=sst2", "--model=roberta-base"]


def write_yaml(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_derived_fields():
    cfg = load_config(BASE)
    assert cfg.sam.sam_type == "fisher-sam" and cfg.sam.rho == 0.05 and cfg.sam.rho_min is None
    assert cfg.sam.candidate_exclude == ("bias", "embed")
    assert cfg.optim.betas == (0.9, 0.98) and cfg.optim.lr == 2e-5
    assert cfg.tokenizer == "roberta-base"  # defaults to the model
    assert re.fullmatch(r"runs/sst2-fisher-sam-s42-[0-9a-f]{8}", cfg.output_dir)  # {config_hash}: run_identity


def test_yaml_with_nested_sections_then_dotted_and_flat_overrides(tmp_path):
    path = write_yaml(tmp_path, """
task: rte
model: bert-base-uncased
zero_stage: 2
sam:
  sam_type: fisher-esam
  rho: 2e-2          # YAML 1.1 reads this as a string; the field type makes it a float
  candidate_exclude: [bias, LayerNorm]
optim:
  betas: [0.9, 0.999]
  schedule: polynomial
log:
  wandb: offline
""")
    cfg = load_config(["--config", path, "--sam.keep_ratio=0.2", "--mask_interval", "50",
                       "--lr=3e-5", "--progress=false", "--micro-batch-size", "8"])
    assert cfg.task == "rte" and cfg.zero_stage == 2
    assert cfg.sam.sam_type == "fisher-esam" and cfg.sam.rho == pytest.approx(0.02)
    assert cfg.sam.candidate_exclude == ("bias", "LayerNorm")
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.schedule == "polynomial"
    assert cfg.sam.keep_ratio == 0.2 and cfg.sam.mask_interval == 50
    assert cfg.optim.lr == 3e-5 and cfg.log.progress is False and cfg.data.micro_batch_size == 8
    assert re.fullmatch(r"runs/rte-fisher-esam-s42-[0-9a-f]{8}", cfg.output_dir)


def test_command_line_wins_over_file_whatever_the_order(tmp_path):
    path = write_yaml(tmp_path, "task: rte\nmodel: m\nseed: 1\n")
    cfg = load_config(["--seed=7", "--config", path])
    assert cfg.seed == 7 and cfg.sam.seed == 0  # bare 'seed' is the top-level field


def test_json_config_and_type_conversions(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"task": "mrpc", "model": "m", "sam": {"rho_min": 0.01}}))
    cfg = load_config(["--config", str(path), "--optim.betas=0.8,0.9", "--renormalize", "--adaptive=1",
                       "--sam.candidate_exclude=[\"bias\"]", "--resume=false", "--tokenizer=tok"])
    assert cfg.sam.rho_min == 0.01 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.sam.renormalize is True and cfg.sam.adaptive is True  # bare flag -> true
    assert cfg.sam.candidate_exclude == ("bias",) and cfg.resume is False and cfg.tokenizer == "tok"
    assert load_config(BASE + ["--sam.rho_min=none"]).sam.rho_min is None
    assert load_config(BASE + ["--sam.candidate_exclude="]).sam.candidate_exclude == ()


def test_resume_takes_a_bool_or_an_existing_path(tmp_path):
    assert load_config(BASE + ["--resume=true"]).resume is True
    assert load_config(BASE + [f"--resume={tmp_path}"]).resume == str(tmp_path)
    with pytest.raises(ConfigError, match="resume"):
        load_config(BASE + [f"--resume={tmp_path / 'missing'}"])


def test_local_rank_from_the_deepspeed_launcher_is_ignored():
    cfg = load_config(["--local_rank=3"] + BASE + ["--local_rank", "1"])
    assert cfg.task == "sst2"


def test_unknown_key_names_close_matches():
    with pytest.raises(ConfigError) as err:
        load_config(BASE + ["--sam.rhoo=0.1"])
    message = str(err.value)
    assert "'sam.rhoo'" in message and "sam.rho" in message and "Did you mean" in message
    with pytest.raises(ConfigError) as err:
        load_config(BASE + ["--keep_ration=0.1"])
    assert "keep_ratio" in str(err.value)


def test_ambiguous_flat_key_and_whole_section_are_rejected():
    with pytest.raises(ConfigError) as err:
        load_config(BASE + ["--eps=1e-8"])
    assert "ambiguous" in str(err.value) and "sam.eps" in str(err.value) and "optim.eps" in str(err.value)
    with pytest.raises(ConfigError, match="whole section"):
        load_config(BASE + ["--sam=1"])


@pytest.mark.parametrize("arg, key, expected", [
    ("--sam.rho=abc", "sam.rho", "a finite number"),
    ("--mask_interval=1.5", "sam.mask_interval", "an integer"),
    ("--sam.renormalize=maybe", "sam.renormalize", "true/false"),
    ("--sam_type=fisher", "sam.sam_type", "one of none, sam, esam, gsam, fisher-sam"),
    ("--optim.betas=0.9", "optim.betas", "a list of 2 values"),
    ("--precision=fp8", "precision", "one of fp32, bf16, fp16"),
])
def test_ill_typed_values_name_key_value_and_type(arg, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(BASE + [arg])
    message = str(err.value)
    value = arg.split("=", 1)[1]
    assert f"'{key}'" in message and repr(value) in message and expected in message
    assert "\n" not in message


def test_file_values_are_type_checked_too(tmp_path):
    path = write_yaml(tmp_path, "task: t\nmodel: m\ndata:\n  micro_batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"'data.micro_batch_size'.*an integer"):
        load_config(["--config", path])


@pytest.mark.parametrize("arg, key, requirement", [
    ("--rho=-0.1", "sam.rho", "must be >= 0"),
    ("--keep_ratio=0", "sam.keep_ratio", "must lie in (0, 1]"),
    ("--keep_ratio=1.5", "sam.keep_ratio", "must lie in (0, 1]"),
    ("--lr=0", "optim.lr", "must be > 0"),
    ("--micro_batch_size=0", "data.micro_batch_size", "must be >= 1"),
    ("--zero_stage=4", "zero_stage", "must be one of 0, 1, 2, 3"),
    ("--warmup_ratio=1", "optim.warmup_ratio", "must lie in [0, 1)"),
    ("--sam.rho_min=0.1", "sam.rho_min", "must lie in [0, sam.rho]"),
    ("--candidate_exclude=(", "sam.candidate_exclude", "is not a regular expression"),
    ("--log_every=0", "log.log_every", "must be >= 1"),
])
def test_range_validation_messages(arg, key, requirement):
    with pytest.raises(ConfigError) as err:
        load_config(BASE + [arg])
    message = str(err.value)
    assert f"'{key}'" in message and requirement in message


def test_missing_task_model_and_cross_field_checks(tmp_path):
    with pytest.raises(ConfigError, match="'task'"):
        load_config(["--model=m"])
    with pytest.raises(ConfigError, match="'model'"):
        load_config(["--task=t"])
    with pytest.raises(ConfigError, match="eval.save_best"):
        load_config(BASE + ["--every_epoch=false"])
    with pytest.raises(ConfigError, match="ds_config"):
        load_config(BASE + [f"--ds_config={tmp_path / 'nope.json'}"])


def test_malformed_command_line_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="Unexpected argument 'sst2'"):
        load_config(["--task", "sst2", "sst2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(["--config", str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        load_config(["--config", str(bad)])
    assert issubclass(ConfigError, ValueError)


def test_config_to_dict_is_json_and_round_trips():
    cfg = load_config(BASE + ["--sam_type=gsam", "--rho_min=0.01", "--betas=0.9,0.95"])
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data
    assert data["sam"]["sam_type"] == "gsam" and data["optim"]["betas"] == [0.9, 0.95]
    assert config_from_dict(data) == cfg


def test_sam_section_core_kwargs_cover_every_field():
    kwargs = dataclasses.asdict(SAMSection(sam_type="fisher-gsam", rho=0.1))  # what the trainer gives SAMConfig
    assert kwargs["sam_type"] == "fisher-gsam" and kwargs["rho"] == 0.1
    assert set(kwargs) == {k.split(".", 1)[1] for k in config_keys() if k.startswith("sam.")}


def test_every_sam_type_but_none_is_known_to_the_optimizer_core():
    from fsam_ds.sam.config import MSAM_TYPES, SAM_TYPES
    from typing import get_args, get_type_hints

    choices = get_args(get_type_hints(SAMSection)["sam_type"])
    assert set(choices) == set(SAM_TYPES) | set(MSAM_TYPES) | {"none"}


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit) as done:
        load_config(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--sam.keep_ratio" in out and "--optim.lr" in out


def test_default_train_config_is_not_valid_without_task():
    with pytest.raises(ConfigError):
        TrainConfig().validate()


def test_list_of_regexes_may_start_with_a_bracket():
    cfg = load_config(BASE + ["--candidate_exclude=[Ll]ayer[Nn]orm,bias"])
    assert cfg.sam.candidate_exclude == ("[Ll]ayer[Nn]orm", "bias")


def test_output_dir_placeholders_take_any_key():
    cfg = load_config(BASE + ["--output_dir=runs/{task}/{sam_type}-rho{sam.rho}-lr{lr}-s{seed}-{unknown}",
                              "--rho=0.02", "--model=org/model"])
    assert cfg.output_dir == "runs/sst2/fisher-sam-rho0.02-lr2e-05-s42-{unknown}"


def test_sam_section_mirrors_the_core_config():
    """The trainer's SAM section and the core's SAMConfig must not drift apart."""
    import dataclasses

    from fsam_ds.sam.config import MSAM_TYPES, SAM_TYPES, SAMConfig
    from fsam_ds.trainer.run_config import SAMSection

    core = {f.name: f.default for f in dataclasses.fields(SAMConfig)}
    section = SAMSection()
    for field in dataclasses.fields(SAMSection):
        assert field.name in core, f"SAMSection.{field.name} has no SAMConfig counterpart"
        assert getattr(section, field.name) == core[field.name], field.name
    for sam_type in SAM_TYPES + MSAM_TYPES:
        kwargs = dataclasses.asdict(dataclasses.replace(section, sam_type=sam_type))
        assert SAMConfig(**kwargs).sam_type == sam_type


@pytest.mark.parametrize("arg, key", [
    ("--sam.rho=inf", "sam.rho"), ("--rho=nan", "sam.rho"), ("--sam.rho_min=inf", "sam.rho_min"),
    ("--sam.lr_max=inf", "sam.lr_max"), ("--keep_ratio=-inf", "sam.keep_ratio"), ("--lr=inf", "optim.lr"),
    ("--grad_clip=inf", "optim.grad_clip"), ("--betas=0.9,nan", "optim.betas"),
])
def test_non_finite_numbers_are_refused_with_key_value_and_default(arg, key):
    with pytest.raises(ConfigError) as err:
        load_config(BASE + [arg])
    message = str(err.value)
    assert f"'{key}'" in message and repr(arg.split("=", 1)[1]) in message and "finite" in message
    assert "The default is" in message


def test_non_finite_number_in_a_yaml_file_is_refused(tmp_path):
    path = write_yaml(tmp_path, "task: t\nmodel: m\nsam:\n  rho: .inf\n")
    with pytest.raises(ConfigError, match=r"'sam.rho' \(in .*run.yaml\): inf is not a finite number"):
        load_config(["--config", path])


@pytest.mark.parametrize("arg, key, words", [
    ("--sam.beta=0", "sam.beta", ["(0, 1]", "ESAM"]),
    ("--sam.gamma=1.5", "sam.gamma", ["(0, 1]"]),
    ("--sam.alpha=2", "sam.alpha", ["[0, 1]", "0.4"]),
    ("--sam.mask_interval=0", "sam.mask_interval", [">= 1", "100"]),
    ("--sam.eps=0", "sam.eps", ["> 0"]),
    ("--sam.lr_min=-1", "sam.lr_min", [">= 0"]),
    ("--sam.lr_max=0", "sam.lr_max", ["must be > sam.lr_min = 0.0"]),
])
def test_sam_section_errors_come_from_the_core_checks_under_the_dotted_key(arg, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(BASE + [arg])
    message = str(err.value)
    assert message.startswith(f"Invalid value for config key '{key}': ")
    for word in words:
        assert word in message, (word, message)


def test_sam_section_is_the_core_config_and_takes_the_baseline():
    from fsam_ds.sam.config import SAMConfig
    from fsam_ds.trainer.run_config import BASELINE_SAM_TYPE

    cfg = load_config(BASE + ["--sam.lr_max=1e-4", "--sam.rho_min=0.01"])
    assert isinstance(cfg.sam, SAMConfig) and cfg.sam.rho_at(1e-4, 2e-5) == pytest.approx(0.05)
    assert cfg.sam.rho_at(0.5e-4, 2e-5) == pytest.approx(0.01 + 0.04 * 0.5)
    assert load_config(BASE + [f"--sam_type={BASELINE_SAM_TYPE}"]).sam.sam_type == BASELINE_SAM_TYPE
    with pytest.raises(ConfigError, match=BASELINE_SAM_TYPE):
        SAMConfig(sam_type=BASELINE_SAM_TYPE)  # the core has no baseline: only the trainer runs one


def test_list_as_the_wandb_agent_writes_it():
    cfg = load_config(BASE + ["--candidate_exclude=['bias', 'LayerNorm']", "--betas=[0.9, 0.999]"])
    assert cfg.sam.candidate_exclude == ("bias", "LayerNorm") and cfg.optim.betas == (0.9, 0.999)


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "data:\n  labels: [5, 10, 1.5, 2.0, 7]\n"),
    (".json", '{"data": {"labels": [5, 10, 1.5, 2.0, 7]}}'),
])
def test_numeric_labels_from_a_file_name_the_same_classes_as_the_command_line(tmp_path, suffix, text):
    from fsam_ds.trainer.objectives import objective_for

    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    own = ["--task=classification", "--model=m", "--data.train_file=t.csv", "--data.dev_file=d.csv"]
    from_file = load_config(["--config", str(path), *own])
    from_flag = load_config([*own, "--data.labels=5,10,1.5,2.0,7"])
    assert from_file.data.labels == from_flag.data.labels == ("5", "10", "1.5", "2.0", "7")
    assert objective_for(from_file).model_kwargs()["label2id"] == objective_for(from_flag).model_kwargs()["label2id"]


@pytest.mark.parametrize("entries", ["[[1, 2], 3]", "[a, {b: 1}]", "[yes, no]"])
def test_a_label_that_is_not_text_or_a_number_is_refused_with_the_key_value_and_fix(tmp_path, entries):
    path = write_yaml(tmp_path, f"task: classification\nmodel: m\ndata:\n  labels: {entries}\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--config", path])
    message = str(err.value)
    assert message.startswith("Invalid value for config key 'data.labels' (in ")
    import yaml

    assert repr(yaml.safe_load(entries)) in message  # the value as read (YAML 1.1: yes/no are booleans)
    assert "is not a list of strings" in message and "Give a list of strings (comma list or JSON list)" in message


def test_version_prints_the_package_version_and_exits_0(capsys):
    from importlib.metadata import version

    import fsam_ds
    from fsam_ds.cli.train import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    # the installed distribution's version, which is the package's own
    assert capsys.readouterr().out.strip() == f"fsam-train {version('fsam-ds')}" == f"fsam-train {fsam_ds.__version__}"
    with pytest.raises(SystemExit):
        load_config(["--help"])
    assert "--version" in capsys.readouterr().out
