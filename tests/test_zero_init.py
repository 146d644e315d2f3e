"""Models partitioned from birth at ZeRO-3 (2 gloo ranks): a model constructed inside
`deepspeed.zero.Init` and one loaded by the trainer's partitioned loading train exactly like the
single-process reference, and loading keeps each rank well under one full fp32 model."""

from __future__ import annotations

import pytest
import torch

from dist_harness import run_distributed
from ds_workers import mlp, run_each, tiny_bert, tiny_gpt2
from test_zero_equivalence import reference, relative_update_error
from zero_init_workers import run_decay_groups, run_load_memory, run_zero_init_equivalence

pytest.importorskip("deepspeed")

TYPES = ["sam", "fisher-sam"]


def _check_partitioned_from_birth(born: list[tuple[int, int, int]], world: int) -> None:
    for full, local, visible in born:
        assert local == -(-full // world), (full, local)  # its 1/world share, padded
        assert visible == 0  # the module's own tensor is an empty placeholder until gathered


@pytest.mark.parametrize("persistence", [None, 0], ids=["small-persistent", "all-partitioned"])
def test_mlp_built_under_zero_init_matches_single_process(persistence, tmp_path):
    """`deepspeed.zero.Init` around the user's constructor, then `fsam_ds.initialize`. With DeepSpeed's
    default persistence threshold these small parameters become persistent (held whole) at initialize;
    with threshold 0 every one stays partitioned and is gathered for each forward."""
    zero = {} if persistence is None else {"stage3_param_persistence_threshold": persistence}
    results = run_distributed(run_zero_init_equivalence, 2, tmp_path, "mlp", TYPES, None, zero,
                              use_deepspeed=True)
    start = torch.cat([p.detach().reshape(-1) for p in mlp().parameters()])
    for rank_result in results:
        for sam_type in TYPES:
            _check_partitioned_from_birth(rank_result["born"][sam_type], 2)
    for sam_type in TYPES:
        ours = torch.cat(results[0]["params"][sam_type])
        assert torch.equal(ours, torch.cat(results[1]["params"][sam_type])), "ranks disagree"
        assert relative_update_error(ours, reference("mlp", sam_type), start) <= 1e-5, sam_type
        assert relative_update_error(ours, reference("mlp", sam_type, variant="summed"), start) > 1e-3, sam_type


def test_bert_loaded_partitioned_by_the_trainer_matches_single_process(tmp_path):
    """The trainer's ZeRO-3 loading (`model_loading.load_model` with a stage-3 config) of a saved tiny BERT."""
    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    results = run_distributed(run_zero_init_equivalence, 2, tmp_path / "ranks", "bert", TYPES, str(folder),
                              use_deepspeed=True)
    start = torch.cat([p.detach().reshape(-1) for p in tiny_bert().parameters()])
    for sam_type in TYPES:
        _check_partitioned_from_birth(results[0]["born"][sam_type], 2)
        ours = torch.cat(results[0]["params"][sam_type])
        assert relative_update_error(ours, reference("bert", sam_type), start) <= 1e-4, sam_type
        assert relative_update_error(ours, reference("bert", sam_type, variant="summed"), start) > 1e-2, sam_type


def test_weight_decay_groups_are_the_same_at_every_stage_with_partitioned_loading(tmp_path):
    """The trainer's AdamW groups (decay on matrices, none on biases and LayerNorm) at ZeRO 0-3 on 2 ranks,
    the ZeRO-3 model loaded partitioned (its parameters are [0]-shaped placeholders when the groups are
    built), and one step on a zero gradient: decay alone, w (1 - lr wd) exactly where the groups say."""
    folder = tmp_path / "bert"
    tiny_bert().save_pretrained(folder)
    stages = [0, 1, 2, 3]
    results = run_distributed(run_each, 2, tmp_path / "ranks", run_decay_groups,
                              [(str(folder), stage) for stage in stages], use_deepspeed=True)[0]
    expected = results[0]["groups"]
    decayed = set(expected[0.5])
    assert decayed and set(expected[0.0]), expected
    assert all(".bias" not in n and "LayerNorm" not in n for n in decayed)
    assert any("embeddings.word_embeddings" in n for n in decayed)
    for stage, result in zip(stages, results):
        assert result["groups"] == expected, stage
        for name, before in result["before"].items():
            after = result["after"][name]
            want = before * (1 - 0.1 * 0.5) if name in decayed else before
            assert torch.allclose(after, want, rtol=1e-6, atol=0), (stage, name)
            if name in decayed:
                assert not torch.equal(after, before), (stage, name)


def _save_renamed(model, folder, rename) -> None:
    """`model` saved with its state-dict keys renamed, as an older checkpoint layout would hold them."""
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    save_file({rename(k): v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


@pytest.mark.slow
def test_partitioned_reading_matches_single_process_from_pretrained(tmp_path):
    """ZeRO-3 loading on 2 ranks reads each rank's partitions from the files; gathered, every parameter
    equals the single-process `from_pretrained` of the same checkpoint, seeded the same way (so new
    heads match too): a base BERT into a classifier with a new head, a classifier into a base model,
    a tied GPT-2, a sharded checkpoint, a bf16 checkpoint into fp32, BERT's legacy LayerNorm
    gamma/beta names, fp32 into bf16 partitions, partitions offloaded to the CPU; a pytorch_model.bin
    checkpoint falls back to transformers' own ZeRO-3 loading; a truncated file stops every rank."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from zero_init_workers import run_partitioned_loads

    bert = tiny_bert()
    bert.bert.save_pretrained(tmp_path / "base")
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    bert.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    tiny_bert().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _save_renamed(bert, tmp_path / "legacy", lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma")
                  .replace("LayerNorm.bias", "LayerNorm.beta"))
    bert.config.save_pretrained(tmp_path / "bin")
    torch.save(bert.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    tiny_bert().save_pretrained(tmp_path / "truncated")
    data = (tmp_path / "truncated" / "model.safetensors").read_bytes()
    (tmp_path / "truncated" / "model.safetensors").write_bytes(data[:-100])
    f32, bf16, cpu = torch.float32, torch.bfloat16, {"offload_param": {"device": "cpu"}}
    cases = [(AutoModelForSequenceClassification, "base", f32, {"num_labels": 5}, {}),
             (AutoModel, "sharded", f32, {}, {}),  # a classifier's checkpoint into the base model: prefix stripped
             (AutoModelForCausalLM, "gpt2", f32, {}, {}),
             (AutoModelForSequenceClassification, "bf16", f32, {}, {}),
             (AutoModelForSequenceClassification, "legacy", f32, {}, {}),
             (AutoModelForSequenceClassification, "bin", f32, {}, {}),
             (AutoModelForSequenceClassification, "sharded", bf16, {}, {"dtype": "bf16"}),  # fp32 into bf16
             (AutoModelForSequenceClassification, "base", f32, {"num_labels": 5}, cpu),  # partitions offloaded
             (AutoModelForSequenceClassification, "truncated", f32, {}, {})]
    cases = [(cls, str(tmp_path / folder), dtype, kwargs, config) for cls, folder, dtype, kwargs, config in cases]
    results = run_distributed(run_partitioned_loads, 2, tmp_path / "ranks", cases, use_deepspeed=True)
    for rank_results in results:  # every rank stops with the error (none waits in a collective)
        assert f"{tmp_path}/truncated/model.safetensors is damaged" in rank_results[-1]["error"]
    for (cls, folder, dtype, kwargs, _), ours in zip(cases[:-1], results[0]):
        torch.manual_seed(1234)
        reference = cls.from_pretrained(folder, dtype=dtype, **kwargs)
        assert ours["partitioned"] == (not folder.endswith("bin")), folder
        _check_partitioned_from_birth(ours["born"], 2)
        assert not ours["training"]  # eval mode, as from_pretrained leaves it
        expected = dict(reference.named_parameters())
        assert set(ours["params"]) == set(expected), folder
        for name, p in expected.items():
            assert ours["params"][name].dtype == dtype
            assert torch.equal(ours["params"][name], p), (folder, name)
        for name, b in reference.named_buffers():
            assert torch.equal(ours["buffers"][name], b), (folder, name)
        # save_pretrained writes the names the checkpoint had, as after the whole-model load
        assert ours["conversions"] == [c.source_patterns for c in getattr(reference, "_weight_conversions", [])]
    assert results[0][4]["conversions"]  # the legacy gamma/beta renames were used
    head = results[0][0]["params"]
    assert 0.01 < head["classifier.weight"].std() < 0.03 and not head["classifier.bias"].any()  # N(0, 0.02), 0
    assert results[0][2]["tied"] == [("lm_head.weight", "transformer.wte.weight")]


def _plan(folder, **kwargs):
    from transformers import AutoModelForSequenceClassification

    from fsam_ds.trainer.model_loading import plan_partitioned_load

    return plan_partitioned_load(AutoModelForSequenceClassification, str(folder), torch.float32,
                                 {"zero_optimization": {"stage": 3}}, **kwargs)


def test_partitioned_reading_refuses_damaged_and_mismatched_checkpoints_and_falls_back_on_the_rest(tmp_path):
    """From the files' headers alone: a truncated file and weights that do not fit config.json raise
    errors naming the file, the tensor and the fix; what the reading does not cover (no safetensors
    file, model arguments that are not config fields) falls back to transformers' loading."""
    from transformers import BertConfig, BertForSequenceClassification

    from fsam_ds.trainer.model_loading import CheckpointError, Fallback

    good = tmp_path / "good"
    tiny_bert().save_pretrained(good)
    plan = _plan(good)
    assert plan.missing == [] and plan.unexpected == [] and len(plan.parameters) == len(list(tiny_bert().parameters()))

    truncated = tmp_path / "truncated"
    tiny_bert().save_pretrained(truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"truncated.*model\.safetensors is damaged.*claims bytes.*Save "):
        _plan(truncated)
    (truncated / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match=r"header claims"):
        _plan(truncated)

    narrow = tmp_path / "narrow"  # weights of a hidden-16 model under a hidden-32 config.json
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=48, max_position_embeddings=32, num_labels=3)
                                  ).save_pretrained(narrow)
    tiny_bert().config.save_pretrained(narrow)
    with pytest.raises(CheckpointError, match=r"holds 'bert\.embeddings\.word_embeddings\.weight' with shape \[97, 16\]"
                       r".*\[97, 32\].*config\.json and the weights disagree"):
        _plan(narrow)

    head = tmp_path / "head"  # another head size: a new head with ignore_mismatched_sizes, as the trainer asks
    tiny_bert().save_pretrained(head)
    plan = _plan(head, num_labels=2, ignore_mismatched_sizes=True)
    assert sorted(plan.missing) == ["classifier.bias", "classifier.weight"]
    with pytest.raises(CheckpointError, match="classifier.weight"):
        _plan(head, num_labels=2)

    (good / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(Fallback, match="no model.safetensors"):
        _plan(good)
    with pytest.raises(Fallback, match="not configuration fields"):
        _plan(head, not_a_config_field=1)
    with pytest.raises(Fallback, match="not a local folder"):
        _plan(tmp_path / "absent" / "x" / "y")


def test_a_hub_id_is_read_from_the_local_cache_and_never_downloaded(tmp_path, monkeypatch):
    """A hub id whose snapshot is in huggingface_hub's cache is read from there; one that is not falls
    back to transformers' own loading (which may download it), without touching the network here."""
    import huggingface_hub.constants

    from fsam_ds.trainer.model_loading import Fallback, checkpoint_folder

    snapshot = tmp_path / "hub" / "models--org--tiny-bert" / "snapshots" / "abc123"
    tiny_bert().save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert checkpoint_folder("org/tiny-bert") == snapshot
    assert _plan("org/tiny-bert").folder == snapshot
    assert checkpoint_folder("org/other") is None
    with pytest.raises(Fallback, match="nor in the local hub cache"):
        _plan("org/other")


def write_large_classifier(folder) -> int:
    """A BERT-base-wide, 8-layer classifier (about 82M parameters) saved as safetensors; its fp32 bytes."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=768, num_hidden_layers=8, num_attention_heads=12, intermediate_size=3072,
                        num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters()) * 4


@pytest.mark.slow
def test_partitioned_loading_keeps_each_rank_under_0_6_of_the_fp32_model(tmp_path):
    """Per-rank peaks (anonymous RSS, total RSS, heap) above the start of `load_model` at ZeRO-3 on 2 ranks,
    against the target of at most 0.6x the fp32 model; printed with -s, with the peaks through
    `fsam_ds.initialize` and the same figures for the whole-model load. Both loads give every weight of
    the checkpoint; the partitioned one leaves each rank holding half of them. transformers' BERT code
    is imported before the start (`run_load_memory`): its ~100 MiB do not grow with the model."""
    folder = tmp_path / "model"
    model_bytes = write_large_classifier(folder)
    measured = {}
    for partitioned in (True, False):
        results = run_distributed(run_load_memory, 2, tmp_path / f"ranks-{partitioned}", str(folder), partitioned,
                                  use_deepspeed=True, timeout=900)
        for rank, r in enumerate(results):
            assert r["mismatched"] == [] and r["checked"] > 0, r  # the checkpoint's weights, all of them
            measured[partitioned, rank] = r
            print(f"partitioned={partitioned} rank {rank} (x the {model_bytes / 2 ** 20:.0f} MiB fp32 model): "
                  + "; ".join(f"{phase} peak " + ", ".join(f"{k} {v / model_bytes:.2f}" for k, v in r[phase].items())
                              for phase in ("load", "initialize")) + f"; holds {r['held'] / model_bytes:.2f}")
    for rank in range(2):
        assert measured[False, rank]["held"] == model_bytes
        assert measured[True, rank]["held"] <= 0.51 * model_bytes
    for rank in range(2):
        assert max(measured[True, rank]["load"].values()) <= 0.6 * model_bytes, (rank, measured[True, rank])


def test_trainer_zero3_loads_partitioned_trains_and_exports_the_consolidated_weights(tmp_path):
    """fsam-train at ZeRO-3 on 2 ranks (torchrun) from a local model folder: the model is loaded partitioned,
    trains, and final/ holds exactly the weights DeepSpeed's own fp32 consolidation (zero_to_fp32) reads
    from the last checkpoint's partitions; the loaded model and a wrong parameter differ from them."""
    import train_fixtures as fx
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from dist_harness import free_port

    model = fx.write_tiny_model(tmp_path / "model")
    train, dev = fx.write_sst2_files(tmp_path / "sst2")
    out = tmp_path / "run"
    args = fx.base_args(model, train, dev, out, zero_stage=3, precision="fp32", **{"optim.epochs": 1})
    cmd = [str(fx.BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), "-m", "fsam_ds.train", *args]
    result = fx.run(cmd, 300)
    summary = fx.summary(out)
    assert summary is not None and summary["steps"] == 4, result.stdout[-4000:]  # 64 / (2 x 8), one epoch
    exported = fx.final_weights(out)
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step4")
    loaded = load_file(str(model / "model.safetensors"))
    assert set(exported) == set(loaded)  # the model's own parameter names, as a whole-model load exports
    params = [name for name in consolidated if name in loaded]
    assert len(params) == len(consolidated) > 0
    for name in params:
        assert torch.equal(exported[name], consolidated[name].float()), name
    assert any(not torch.equal(exported[name], loaded[name]) for name in params)  # it trained


def test_partitioned_loading_is_scoped_to_its_block_and_to_zero3(monkeypatch):
    """Inside the block transformers builds ZeRO-3 models partitioned; after it, and at other stages, it
    does not (a later model in the same process must not be partitioned by a config that is not its own)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from fsam_ds.sam.config import ConfigError
    from fsam_ds.trainer.model_loading import partitioned_loading

    pytest.importorskip("accelerate")
    with partitioned_loading({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}):
        assert is_deepspeed_zero3_enabled()
    assert not is_deepspeed_zero3_enabled()
    with partitioned_loading({"zero_optimization": {"stage": 2}}):
        assert not is_deepspeed_zero3_enabled()

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate"
                        else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"zero_stage = 3 .*pip install 'accelerate"):
        with partitioned_loading({"zero_optimization": {"stage": 3}}):
            pass
    with partitioned_loading({"zero_optimization": {"stage": 1}}):  # not needed below stage 3
        pass


RECIPE_PRELUDE = """
import torch
import fsam_ds
from fsam_ds import SAMConfig

ds_config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
             "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}


class MyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        import torch._dynamo  # noqa: F401  first imported here, as transformers' modeling code does
        self.embed, self.head = torch.nn.Embedding(99, 16), torch.nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))
"""

RECIPE_CHECK = """
assert all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())  # partitioned from birth
ids = torch.randint(1, 99, (2, 8))
loss = lambda engine, batch: torch.nn.functional.cross_entropy(engine(batch), torch.tensor([0, 2]), reduction="none")
assert not sam_engine.train_step([ids], loss).skipped
print("recipe ok")
"""

TRANSFORMERS_RECIPE = """
from transformers import AutoModelForSequenceClassification, BertConfig
from transformers.integrations import HfDeepSpeedConfig

hf_ds = HfDeepSpeedConfig(ds_config)
model = AutoModelForSequenceClassification.from_config(
    BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
               num_labels=3))
opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
sam_engine = fsam_ds.initialize(model=model, config=ds_config, sam=SAMConfig(sam_type="fisher-sam"), optimizer=opt)
assert all(p.numel() == 0 and p.ds_numel > 0 for p in model.parameters())
print("recipe ok")
"""


def _readme_recipe() -> str:
    """The README's Python block that builds a model partitioned from birth, as it is written there."""
    import re

    from train_fixtures import REPO

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (recipe,) = [b for b in blocks if "zero_init(" in b]
    return recipe


@pytest.mark.parametrize("variant", ["as written", "deepspeed.zero.Init", "transformers"])
def test_the_readme_recipe_for_a_model_built_partitioned_runs_in_a_fresh_process(tmp_path, variant):
    """In a fresh process whose model construction imports torch._dynamo for the first time: the README's
    `fsam_ds.zero_init` block works as written, plain `deepspeed.zero.Init` fails there, and the
    transformers line (HfDeepSpeedConfig, then from_config) builds the model partitioned."""
    import subprocess
    import sys

    import train_fixtures as fx
    from dist_harness import free_port

    recipe = _readme_recipe()
    if variant == "deepspeed.zero.Init":
        recipe = recipe.replace("fsam_ds.zero_init(ds_config)",
                                "__import__('deepspeed').zero.Init(config_dict_or_path=ds_config)")
    code = RECIPE_PRELUDE + (TRANSFORMERS_RECIPE if variant == "transformers" else recipe + RECIPE_CHECK)
    env = fx.env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                 PYTHONPATH=str(fx.REPO))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    if variant == "deepspeed.zero.Init":
        assert done.returncode != 0 and "Signature mismatch" in done.stderr, done.stderr[-3000:]
    else:
        assert done.returncode == 0 and "recipe ok" in done.stdout, done.stderr[-3000:]
