"""The measurement behind `python -m benchmarks`: counters, memory views, the phase observer, targets
and report maths.

No timing is asserted anywhere; the benchmarks themselves are commands, not tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import core as bench, scale as bench_scale, targets, zero as bench_zero
from benchmarks.__main__ import build_parser
from benchmarks.measure import (BackgroundPeak, CollectiveCounter, HeapPeak, PhaseProfile, base_state_tensors, held_tensor_bytes,
                                heap_in_use, median_profile, payload_bytes, random_batches, rotated)
from fsam_ds.sam.config import SAMConfig
from fsam_ds.sam.optim import SAMOptimizer

REPO = Path(__file__).resolve().parents[1]
# runs `python -m benchmarks ARGS` from the repository root as if pytorch-optimizer were not installed
WITHOUT_PYTORCH_OPTIMIZER = ("import runpy, sys; sys.modules['pytorch_optimizer'] = None; "
                             "runpy.run_module('benchmarks', run_name='__main__')")
TINY = dict(hidden=16, layers=1, heads=2, vocab=50, seq=8)

# torch 2.13 deprecates the all-gather / reduce-scatter names DeepSpeed still calls; the counter wraps both
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# ---------------------------------------------------------------- collective bytes on a 1-rank gloo group
@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_counter_counts_exact_payload_bytes_and_calls(gloo_group):
    seen = []
    with CollectiveCounter(on_call=lambda name, n: seen.append((name, n))) as counter:
        dist.all_reduce(torch.ones(10))                                  # 40 B input
        dist.all_gather([torch.empty(6, dtype=torch.float64)], torch.ones(6, dtype=torch.float64))  # 48 B output
        dist.all_gather_into_tensor(torch.empty(5, dtype=torch.bfloat16), torch.ones(5, dtype=torch.bfloat16))  # 10 B
        dist.reduce_scatter_tensor(torch.empty(3), torch.ones(3))        # 12 B input
        dist.broadcast(torch.ones(7, dtype=torch.int64), src=0)          # 56 B
        totals = counter.take()
    assert totals.calls == {"all_reduce": 1, "all_gather": 1, "all_gather_into_tensor": 1,
                            "reduce_scatter_tensor": 1, "broadcast": 1}
    assert totals.bytes == {"all_reduce": 40, "all_gather": 48, "all_gather_into_tensor": 10,
                            "reduce_scatter_tensor": 12, "broadcast": 56}
    assert totals.total_bytes == 166 and totals.total_calls == 5
    assert seen == [("all_reduce", 40), ("all_gather", 48), ("all_gather_into_tensor", 10),
                    ("reduce_scatter_tensor", 12), ("broadcast", 56)]


def test_counter_counts_a_forwarding_alias_once_and_uninstalls(gloo_group):
    original = dist.all_gather_into_tensor
    with CollectiveCounter() as counter:
        # the deprecated alias forwards to its successor, itself wrapped: one call, not two
        dist.distributed_c10d._all_gather_base(torch.empty(4), torch.ones(4))
        dist.all_reduce(torch.ones(2), async_op=False)
        counter.active = False
        dist.all_reduce(torch.ones(100))  # not counted while inactive
        totals = counter.take()
        assert counter.take().total_calls == 0  # take() starts afresh
    assert totals.calls == {"_all_gather_base": 1, "all_reduce": 1}
    assert totals.bytes == {"_all_gather_base": 16, "all_reduce": 8}
    assert dist.all_gather_into_tensor is original
    assert dist.distributed_c10d.all_gather_into_tensor is original


def test_counter_sees_calls_made_through_the_comm_of_the_library(gloo_group):
    from fsam_ds.sam.shards import TorchComm

    comm = TorchComm()  # built before the counter: looks the function up at call time
    with CollectiveCounter() as counter:
        comm.all_reduce(torch.zeros(3, dtype=torch.float64))
    assert counter.take().bytes == {"all_reduce": 24}


def test_payload_bytes_of_nested_lists():
    assert payload_bytes([[torch.ones(2), torch.ones(3, dtype=torch.int8)], torch.ones(1, dtype=torch.float64)]) == 19
    assert payload_bytes(None) == 0


# ---------------------------------------------------------------- heap
needs_mallinfo2 = pytest.mark.skipif(heap_in_use() is None, reason="glibc mallinfo2 not available")


@needs_mallinfo2
def test_heap_sees_a_known_allocation_and_its_release():
    size = 32 << 20
    before = heap_in_use()
    block = torch.empty(size, dtype=torch.uint8)
    during = heap_in_use()
    del block
    after = heap_in_use()
    assert size <= during - before < size + (1 << 20)
    assert during - after >= size


@needs_mallinfo2
def test_heap_peak_keeps_the_high_water_of_its_samples():
    peak = HeapPeak()
    peak.sample()  # ignored before start()
    baseline = peak.start()
    block = torch.empty(16 << 20, dtype=torch.uint8)
    peak.sample()
    del block
    total, above = peak.stop()
    assert above >= 16 << 20 and total == baseline + above
    assert heap_in_use() < total


# ---------------------------------------------------------------- tensors held by an object
def test_held_tensor_bytes_walks_attributes_and_containers_once_per_storage():
    shared = torch.zeros(10)                      # 40 B
    holder = types.SimpleNamespace(
        a=shared, view=shared[2:5],              # a view of the same storage counts once
        nested={"x": [torch.zeros(3, dtype=torch.float64), (torch.zeros(2, dtype=torch.uint8),)]},  # 24 + 2
        module=nn.Linear(100, 100),              # modules are not walked into
        excluded=torch.zeros(1000))
    holder.cycle = holder
    assert held_tensor_bytes(holder, exclude=[holder.excluded]) == 40 + 24 + 2
    assert held_tensor_bytes(holder) == 40 + 24 + 2 + 4000


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _bytes_between_passes(sam_type: str) -> tuple[int, int, SAMOptimizer]:
    model = _tiny_model()
    optimizer = SAMOptimizer(model.named_parameters(), torch.optim.AdamW,
                             SAMConfig(sam_type=sam_type, keep_ratio=0.25, candidate_exclude=()), lr=1e-2)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    seen: list[tuple[int, int]] = []
    calls = 0

    def closure():
        nonlocal calls
        if calls:  # the second call runs at w + e: the perturbation is held now
            base = base_state_tensors(model.parameters(), optimizer.state, ("step", "exp_avg", "exp_avg_sq"))
            seen.append((held_tensor_bytes(optimizer, base), optimizer.shards.perturbation_nbytes()))
        calls += 1
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return seen[0][0], seen[0][1], optimizer


def test_extra_bytes_of_sam_are_exactly_its_stored_perturbation():
    extra, perturbation, optimizer = _bytes_between_passes("sam")
    n = sum(p.numel() for p in optimizer.shards.params)
    assert perturbation >= 4 * n  # one fp32 difference per entry, plus rare exceptions
    assert extra == perturbation


def test_extra_bytes_of_fisher_sam_are_its_mask_plus_perturbation():
    extra, perturbation, optimizer = _bytes_between_passes("fisher-sam")
    mask = sum(m.nbytes for m in optimizer.core.fisher_mask if m is not None)
    assert mask > 0 and extra == mask + perturbation


# ---------------------------------------------------------------- measured through the observer hook
BASE_KEYS = {"step", "exp_avg", "exp_avg_sq"}


def _probed(sam_type: str) -> tuple[dict, SAMOptimizer]:
    """One step measured by the benchmark's MemoryProbe, an observer of the optimizer's phases."""
    method = bench.build_core_method(sam_type, TINY, mask_interval=1)
    batches = random_batches(1, 4, TINY["seq"], TINY["vocab"], seed=0)
    return bench.measure_memory(method, batches, 1, BASE_KEYS), method.optimizer


def _held_in_the_closure(sam_type: str) -> tuple[int, int]:
    """The same step, measured without the hook: inside step(closure)'s second call, at w + e."""
    method = bench.build_core_method(sam_type, TINY, mask_interval=1)
    optimizer, batch, seen = method.optimizer, random_batches(1, 4, TINY["seq"], TINY["vocab"], seed=0)[0], []

    def closure():
        if optimizer.shards.perturbation_nbytes():
            base = base_state_tensors(method.model.parameters(), optimizer.state, BASE_KEYS)
            seen.append((held_tensor_bytes(optimizer, base), optimizer.shards.perturbation_nbytes()))
        loss = bench.per_example_loss(method.model, batch).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return seen[0]


@pytest.mark.parametrize("sam_type", ["sam", "fisher-sam", "gsam"])
def test_memory_probe_measures_between_the_passes_through_the_observer(sam_type):
    memory, optimizer = _probed(sam_type)
    extra, perturbation = _held_in_the_closure(sam_type)
    n = sum(p.numel() for p in optimizer.shards.params)
    assert memory["extra_bytes"] == extra and memory["perturbation_bytes_per_param"] * n == perturbation
    mask = sum(m.nbytes for m in optimizer.core.fisher_mask if m is not None) if sam_type == "fisher-sam" else 0
    # gsam keeps the first gradient (fp32, 4 B per entry) for its correction after the second pass
    first_gradient = 4 * n if sam_type == "gsam" else 0
    assert extra == perturbation + mask + first_gradient and (mask > 0) == (sam_type == "fisher-sam")
    assert perturbation >= (4 * n if sam_type != "fisher-sam" else 1)


def test_memory_probe_sees_nothing_held_by_plain_adamw():
    memory, _ = _probed("adamw")
    assert memory["extra_bytes"] == 0 and memory["perturbation_bytes_per_param"] is None  # no first_pass phase


def test_phase_profile_as_the_optimizers_observer_sees_the_step_phases():
    methods = [bench.build_core_method(name, TINY, mask_interval=1) for name in ("adamw", "sam", "fisher-sam", "esam")]
    steps = bench.time_interleaved(methods, random_batches(2, 4, TINY["seq"], TINY["vocab"], seed=0), reps=2,
                                   warmup=0)
    phases = {name: set(result["profile"]) - {"other", "step total"} for name, result in steps.items()}
    two_pass = {"zero_grads", "forward", "backward", "first_pass", "apply_perturbation", "second_pass", "restore",
                "step"}
    assert phases["adamw"] == {"zero_grads", "forward", "backward", "step"}
    assert phases["sam"] == two_pass
    assert phases["fisher-sam"] == two_pass | {"rebuild_mask"}  # mask_interval 1: every step rebuilds
    assert phases["esam"] == two_pass | {"select_examples"}
    profile = steps["fisher-sam"]["profile"]
    assert profile["first_pass"]["ms"] >= profile["rebuild_mask"]["ms"]  # nested, inclusive time
    assert profile["step total"]["ms"] >= profile["forward"]["ms"] + profile["backward"]["ms"]


def test_the_reference_reports_the_same_phase_names():
    pytest.importorskip("pytorch_optimizer")
    method = bench.build_core_method(bench.REFERENCE, TINY)
    steps = bench.time_interleaved([method], random_batches(1, 4, TINY["seq"], TINY["vocab"], seed=0), 1, 0)
    assert set(steps[bench.REFERENCE]["profile"]) == {"zero_grads", "forward", "backward", "first_pass", "step",
                                                      "other", "step total"}
    memory = bench.measure_memory(method, random_batches(1, 4, TINY["seq"], TINY["vocab"], seed=0), 1, BASE_KEYS)
    assert memory["extra_bytes_per_param"] == 4.0  # its copy of the weights, old_p


def test_the_command_starts_without_pytorch_optimizer_and_core_says_what_to_install():
    run = subprocess.run([sys.executable, "-c", WITHOUT_PYTORCH_OPTIMIZER, "core", "--reps", "1", "--warmup", "0",
                          "--memory-steps", "1", *(f"--{k}={v}" for k, v in TINY.items()), "--batch", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "pip install -e '.[dev]'" in run.stderr, run.stderr[-2000:]
    help_text = subprocess.run([sys.executable, "-c", WITHOUT_PYTORCH_OPTIMIZER, "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
    commands = "{core,zero,scale,cheap,trainer,quality,lora,checkpoints}"
    assert help_text.returncode == 0 and commands in help_text.stdout, help_text.stderr[-2000:]


@pytest.mark.slow
def test_zero_command_end_to_end_without_pytorch_optimizer(tmp_path):
    """Two gloo ranks at stage 1, fp32: the bytes the engine's phases report match the gradient size."""
    out = tmp_path / "zero.json"
    run = subprocess.run([sys.executable, "-c", WITHOUT_PYTORCH_OPTIMIZER, "zero", "--stages", "1", "--steps", "1",
                          "--warmup", "1", "--micro-batch", "2", *(f"--{k}={v}" for k, v in TINY.items()),
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    gradient = 4 * result["config"]["parameters"]  # fp32: one gradient's bytes, reduced once per backward
    methods = result["stages"]["1"]["methods"]
    for name, method in methods.items():
        profile = method["profile_rank0"]
        passes = 1 if name == "adamw" else 2
        assert profile["backward"]["bytes"] == passes * gradient, name
        assert profile["step total"]["bytes"] == method["collective_bytes"], name  # every byte has a phase
        assert ("rebuild_mask" in profile) == name.endswith("@rebuild"), name
        assert ("select_examples" in profile) == ("esam" in name), name
        assert ("second_pass" in profile) == (name != "adamw"), name
    assert set(result["stages"]["1"]["targets"]) == {"fisher-sam collective bytes / AdamW",
                                                     "fisher-esam collective bytes / AdamW"}
    assert "verdict" in run.stdout and "benchmarks zero:" in run.stdout


@pytest.mark.slow
def test_cheap_command_end_to_end(tmp_path):
    """Two gloo ranks at stage 3: the schedules' share of sharpness-aware steps is the rule's over the timed
    steps, every:5 moves (4 one-pass steps + 1 fisher-sam step) / 5 of the bytes, and fisher-msam's one pass
    about AdamW's."""
    out = tmp_path / "cheap.json"
    run = subprocess.run([sys.executable, "-c", WITHOUT_PYTORCH_OPTIMIZER, "cheap", "--stages", "3", "--steps", "5",
                          "--warmup", "1", "--micro-batch", "2", *(f"--{k}={v}" for k, v in TINY.items()),
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    methods = json.loads(out.read_text())["stages"]["3"]["methods"]
    share = {name: m["sharpness_aware_share"] for name, m in methods.items()}
    assert share["fisher-sam"] == 1.0 and share["fisher-msam"] == 1.0
    assert share["fisher-sam@every:5"] == 0.2 and share["fisher-sam@looksam:5"] == 0.2  # step counts 2..6
    assert 0.6 <= share["fisher-sam@late:0.2"] <= 1.0  # the switch falls inside the timed steps

    def ratio(name: str) -> float:
        return methods[name]["collective_bytes"] / methods["adamw"]["collective_bytes"]

    assert abs(ratio("fisher-sam@every:5") - (4 + ratio("fisher-sam")) / 5) < 0.01
    # one pass: about AdamW's bytes (plus, here, e's all-reduce into the persistent small parameters)
    assert ratio("fisher-sam") > 1.9 and 1.0 <= ratio("fisher-msam") < 0.6 * ratio("fisher-sam")
    assert "benchmarks cheap:" in run.stdout


@pytest.mark.slow
def test_lora_command_end_to_end(tmp_path):
    """Two gloo ranks at stage 1: full fine-tuning reduces every parameter's gradient in each backward, LoRA
    only the adapters' (a benchmark that trained the whole model under the LoRA label would move them all)."""
    import peft

    from benchmarks.measure import llama_decoder

    out = tmp_path / "lora.json"
    run = subprocess.run([sys.executable, "-c", WITHOUT_PYTORCH_OPTIMIZER, "lora", "--stages", "1", "--steps", "1",
                          "--warmup", "1", "--micro-batch", "2", "--lora-r", "2",
                          *(f"--{k}={v}" for k, v in TINY.items()), "--json", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    lora = peft.get_peft_model(llama_decoder(*TINY.values()), peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    for name, method in result["stages"]["1"]["methods"].items():
        passes = 1 if name.endswith("adamw") else 2
        gradient = 4 * (adapters if name.startswith("lora/") else result["config"]["parameters"])
        assert method["profile_rank0"]["backward"]["bytes"] == passes * gradient, name
    assert "LoRA fisher-sam / LoRA AdamW memory" in run.stdout


# ---------------------------------------------------------------- profile and ordering
def test_phase_profile_nests_and_attributes_bytes_to_the_innermost_part():
    profile = PhaseProfile()
    with profile.phase("outer"):
        profile.note_bytes(5)
        with profile.phase("inner"):
            profile.note_bytes(7)
    profile.note_bytes(1)
    taken = profile.take()
    assert taken["bytes"] == {"outer": 5, "inner": 7, "other": 1}
    assert taken["seconds"]["outer"] >= taken["seconds"]["inner"] >= 0
    assert taken["accounted"] == taken["seconds"]["outer"]
    assert profile.take() == {"seconds": {}, "bytes": {}, "accounted": 0.0}


def test_median_profile_reports_the_time_outside_every_part():
    profiles = [{"seconds": {"a": 0.010}, "bytes": {"a": 100}, "accounted": 0.010},
                {"seconds": {"a": 0.020}, "bytes": {"a": 300}, "accounted": 0.020}]
    out = median_profile(profiles, [0.015, 0.030])
    assert out["a"] == {"ms": pytest.approx(15.0), "bytes": 200}
    assert out["other"]["ms"] == pytest.approx(7.5)
    assert out["step total"] == {"ms": pytest.approx(22.5), "bytes": 200}


def test_rotation_puts_every_method_first_and_last():
    items = ["a", "b", "c"]
    orders = [rotated(items, r) for r in range(6)]
    assert all(sorted(o) == items for o in orders)
    assert {o[0] for o in orders} == set(items) and {o[-1] for o in orders} == set(items)


# ---------------------------------------------------------------- report maths from given numbers
def _core_result(seconds: dict[str, float]) -> dict:
    steps = {name: {"median": s, "all": [s], "profile": {"forward": {"ms": 1.0, "bytes": 0}}}
             for name, s in seconds.items()}
    memory = {"adamw": {"extra_bytes": 0, "extra_bytes_per_param": 0.0, "perturbation_bytes_per_param": None,
                        "heap_step_peak_above_start": 1 << 20},
              "sam": {"extra_bytes": 40, "extra_bytes_per_param": 4.0, "perturbation_bytes_per_param": 4.0,
                      "heap_step_peak_above_start": None}}
    result = {"model": {"hidden": 8, "layers": 1, "heads": 1, "vocab": 10, "seq": 4, "batch": 2, "parameters": 10},
              "threads": 1, "reps": 1, "warmup": 0, "mask_interval": 100, "steps": steps,
              "adamw_state_bytes_per_param": 8.0, "memory": memory}
    result["ratios"] = bench.core_ratios(result)
    return result


def test_core_report_prints_ratios_of_the_given_numbers():
    result = _core_result({"adamw": 0.1, "pytorch-optimizer-sam": 0.2, "sam": 0.3, "fisher-sam": 0.25,
                           "fisher-sam@rebuild": 0.45})
    assert result["ratios"]["fisher_sam_amortised_seconds"] == pytest.approx(0.252)
    text = bench.format_core_report(result)
    assert "sam / pytorch-optimizer SAM = 1.50" in text
    assert "fisher-sam (amortised) / pytorch-optimizer SAM = 1.26" in text
    assert "sam / AdamW = 3.00" in text
    assert "252.0" in text and "4.000" in text


def _rank(ms: float, nbytes: int, peak: int) -> dict:
    collectives = {"bytes": nbytes, "calls": 3, "by_function": {"all_reduce": {"calls": 3, "bytes": nbytes}}}
    profile = {"seconds": {"forward": ms / 2e3}, "bytes": {"forward": nbytes}, "accounted": ms / 2e3}
    memory = {"peak": 1000 + peak, "before_build": 1000, "after_initialize": 1000 + peak // 2,
              "peak_above_before_build": peak, "peak_above_after_initialize": peak - peak // 2}
    return {"times": [ms / 1e3] * 3, "collectives": [collectives] * 3, "profiles": [profile] * 3, "memory": memory}


def _zero_stage(stage: int) -> dict:
    per_rank = []
    for slow in (0.0, 5.0):  # rank 1 is slower: a step lasts as long as its slowest rank
        per_rank.append({"adamw": _rank(100 + slow, 1000, 100),
                         "fisher-sam": _rank(190 + slow, 2000, 103),
                         "fisher-esam": _rank(220 + slow, 2100, 100),
                         "fisher-sam@rebuild": _rank(290 + slow, 2000, 110),
                         "fisher-esam@rebuild": _rank(320 + slow, 2100, 110)})
    return bench_zero.summarise_stage(stage, per_rank)


def test_zero_summary_ratios_and_verdicts_from_given_numbers():
    s = _zero_stage(3)
    assert s["fisher-sam"]["step_ratio"] == pytest.approx(195 / 105)
    assert s["fisher-sam"]["rebuild_ms_amortised"] == pytest.approx(1.0)
    assert s["fisher-sam"]["rebuild_fraction_of_adamw"] == pytest.approx(1 / 105)
    assert s["fisher-sam"]["memory_ratio"] == pytest.approx(1.03)
    assert s["fisher-esam"]["collective_ratio"] == pytest.approx(2.1)
    verdicts = {k: v["verdict"] for k, v in s["targets"].items()}
    assert verdicts == {"fisher-sam step / AdamW": "met", "fisher-sam collective bytes / AdamW": "met",
                        "fisher-esam step / AdamW": "MISSED", "fisher-esam collective bytes / AdamW": "MISSED",
                        "fisher-sam peak memory / AdamW": "met"}
    assert "fisher-sam step / AdamW" not in _zero_stage(1)["targets"]  # the step target is for stages 2 and 3


def test_targets_table_decides_the_verdicts():
    ratios = {"fisher-sam": {"step_ratio": 2.05, "collective_ratio": None, "memory_ratio": 1.0501},
              "fisher-esam": {"step_ratio": 2.0, "collective_ratio": 3.0, "memory_ratio": 9.0}}
    checked = targets.check(3, ratios)
    assert {k: v["verdict"] for k, v in checked.items()} == {
        "fisher-sam step / AdamW": "met", "fisher-esam step / AdamW": "met",
        "fisher-sam collective bytes / AdamW": "n/a", "fisher-esam collective bytes / AdamW": "MISSED",
        "fisher-sam peak memory / AdamW": "MISSED"}  # fisher-esam has no memory target
    assert set(targets.check(0, ratios)) == {"fisher-sam collective bytes / AdamW",
                                              "fisher-esam collective bytes / AdamW"}
    text = targets.describe()
    assert all(f"{t.label} <= {t.limit}" in text for t in targets.TARGETS)


def test_zero_report_prints_the_table_and_the_misses():
    result = {"config": {"world_size": 2, "hidden": 8, "layers": 1, "vocab": 10, "seq": 4, "parameters": 100,
                         "micro_batch": 2, "dtype": "fp32", "steps": 3, "persistence_threshold": None,
                         "zero_optimization": {
                             "3": bench_zero.ds_config(3, "fp32", 2, 2, 8, None)["zero_optimization"]}},
              "stages": {"3": _zero_stage(3)}}
    text = bench_zero.format_zero_report(result)
    assert "1.857" in text or "1.86" in text          # 195 / 105
    assert "MISSED" in text and "2.100" in text
    assert "0.95%" in text                           # 1 ms of rebuild per step over a 105 ms AdamW step


def test_zero_command_line_parses_the_documented_form():
    args = build_parser().parse_args(["zero", "--stages", "1", "2", "3", "--steps", "30", "--dtype", "bf16"])
    assert (args.command, args.stages, args.steps, args.dtype) == ("zero", [1, 2, 3], 30, "bf16")
    config = bench_zero.ds_config(3, "fp32", 8, 2, 128, None)
    assert config["gradient_clipping"] == 0.0
    assert config["zero_optimization"]["reduce_bucket_size"] == 128 * 128
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 1280



# ---------------------------------------------------------------- the scale benchmark
def test_background_peak_keeps_each_phase_peak_and_start():
    """A 64 MiB tensor allocated and freed inside one phase: that phase's heap peak is at least its start
    plus the tensor's bytes, and the next phase starts without it."""
    size = 64 << 20
    with BackgroundPeak(interval=0.001) as peak:
        peak.enter("big")
        block = torch.ones(size // 4)  # written, so resident as well as allocated
        peak._sample()  # the sampling thread may not have woken up while the tensor was alive
        del block
        peak.enter("after")
    big, after = peak.phases["big"], peak.phases["after"]
    assert big["peak"]["heap"] - big["start"]["heap"] >= size
    assert big["peak"]["RssAnon"] - big["start"]["RssAnon"] >= size * 0.9  # a page or two may have been resident
    assert after["start"]["heap"] < big["peak"]["heap"] - size * 0.9
    assert peak.peak["heap"] >= big["peak"]["heap"]


def test_background_peak_marks_keep_the_peak_over_every_stretch_of_a_name():
    """Marks repeat (a step's phases, every step): a mark's peak is the largest over all its stretches, a
    64 MiB tensor alive only in the first "forward" still counts there, and "step" never saw it."""
    size = 64 << 20
    with BackgroundPeak(interval=0.001) as peak:
        peak.enter("train")
        start = peak.phases["train"]["start"]["heap"]
        for first in (True, False):
            peak.mark("forward")
            if first:  # the heap just before the tensor: it may have shrunk a little since the phase began
                before = heap_in_use()
            block = torch.ones(size // 4) if first else None
            peak._sample()
            del block
            peak.mark("step")
        peak.mark(None)
    assert peak.marks["forward"]["heap"] - before >= size
    assert peak.marks["step"]["heap"] < start + size * 0.5
    assert set(peak.marks) == {"forward", "step"}


def test_scale_fit_predicts_the_largest_layer_count_within_the_budget():
    a, b = bench_scale.fit_line([(2, 1000.0 + 2 * 150.0), (8, 1000.0 + 8 * 150.0)])
    assert (a, b) == pytest.approx((1000.0, 150.0))
    assert bench_scale.largest_within(a, b, 1000.0 + 7 * 150.0) == 7        # exactly at the budget
    assert bench_scale.largest_within(a, b, 1000.0 + 7 * 150.0 - 1) == 6     # one byte under it
    assert bench_scale.largest_within(a, b, 1100.0) is None                  # not even one layer
    assert bench_scale.largest_within(a, -1.0, 5000.0) is None               # a peak that does not grow
    assert bench_scale.roberta_parameters(24, 1024, 50265) == 355_361_794    # RoBERTa-large's classifier


def _scale_rank(base: int, load: int, held: int, train: int, finish: int) -> dict:
    """A rank's phases with the same value in every figure: starts at `base` and peaks given above it;
    its step phases peak at `train` (backward) and 100 below (forward); it holds `held` split by role."""
    def figures(v: int) -> dict:
        return {"VmRSS": v, "heap": v, "RssAnon": v}
    peaks = {"setup": 0, "load": load, "initialize": held, "train": train, "finish": finish}
    phases = {name: {"start": figures(base + (held if name != "setup" and name != "load" else 0)),
                     "peak": figures(base + p)} for name, p in peaks.items()}
    phases["load"]["start"] = figures(base)
    return {"phases": phases, "step_phases": {"forward": figures(base + train - 100), "backward": figures(base + train)},
            "held": {"weights": held // 5, "optimizer state": held - held // 5},
            "step_phase_seconds": [{"forward": 9.0}, {"forward": 1.0, "backward": 2.0}, {"forward": 1.2},
                                   {"forward": 0.9, "backward": 2.5}]}


def test_scale_summary_ratios_and_verdicts_from_given_numbers():
    model = 1000
    runs = {}
    for name, train, step in (("adamw", 2400, 1.0), ("fisher-sam", 2550, 2.1)):
        ranks = [_scale_rank(500, 700, 500, train, 900), _scale_rank(520, 550, 500, train - 100, 600)]
        ranks[0]["step_cpu_seconds"] = [9.0, step, step + 0.1, step]    # the first step is not counted
        ranks[1]["step_cpu_seconds"] = [9.0, step + 0.5, step, step]    # per step the larger rank counts
        raw = {"per_rank": ranks, "step_seconds": [step, step + 0.2, step - 0.1], "wall_seconds": 1.0}
        runs[name] = bench_scale.summarise_run(raw, model)
    adamw = runs["adamw"]
    assert adamw["load_x_model"] == pytest.approx(0.7)          # the larger rank's load peak
    assert adamw["run_x_model"] == pytest.approx(2.4)           # the train phase's peak, rank 0
    assert adamw["run_absolute"] == 500 + 2400
    assert adamw["per_rank"][0]["held_after_load"]["heap"] == 500
    assert adamw["run_peak_phase"] == ["train", "train"]
    assert adamw["step_s"] == pytest.approx(1.0)
    assert adamw["step_cpu_s"] == pytest.approx(1.1)  # median of 1.5, 1.1, 1.0
    assert adamw["held_x_model"] == {"weights": pytest.approx(0.1), "optimizer state": pytest.approx(0.4)}
    assert adamw["step_phase_x_model"]["backward"]["heap"] == pytest.approx(2.4)  # rank 0's, the larger
    assert adamw["step_phase_x_model"]["forward"]["heap"] == pytest.approx(2.3)
    assert adamw["finish_x_model"]["heap"] == pytest.approx(0.9)
    assert adamw["finish_over_train_heap"] == pytest.approx(900 / 2400)  # the larger rank's of each
    # per phase, the median over the steps after the first, a missing phase counting 0
    assert adamw["step_phase_seconds"] == {"forward": pytest.approx(1.0), "backward": pytest.approx(2.0)}
    summary = bench_scale.summarise_setting("checkpointing", runs)
    assert summary["ratios"]["fisher-sam"]["memory_ratio"] == pytest.approx(2550 / 2400)
    assert summary["ratios"]["fisher-sam"]["step_ratio"] == pytest.approx(2.1)
    assert summary["ratios"]["fisher-sam"]["step_cpu_ratio"] == pytest.approx(2.2 / 1.1)
    assert {k: v["verdict"] for k, v in summary["targets"].items()} == {
        "adamw finish heap peak / training heap peak": "met", "fisher-sam finish heap peak / training heap peak": "met",
        "fisher-sam run peak / AdamW": "MISSED", "fisher-sam run heap peak / AdamW": "MISSED",
        "fisher-sam step / AdamW": "MISSED", "fisher-sam step CPU / AdamW": "met"}
    zero_init = bench_scale.summarise_setting("zero-init", runs)["targets"]
    assert {k: v["verdict"] for k, v in zero_init.items()} == {
        "adamw load peak / fp32 model": "MISSED", "fisher-sam load peak / fp32 model": "MISSED",
        "adamw run peak above baseline / fp32 model": "met",
        "fisher-sam run peak above baseline / fp32 model": "MISSED",
        "adamw run heap peak above baseline / fp32 model": "met",
        "fisher-sam run heap peak above baseline / fp32 model": "MISSED",
        "adamw finish heap peak / training heap peak": "met", "fisher-sam finish heap peak / training heap peak": "met",
        "fisher-sam run peak / AdamW": "MISSED", "fisher-sam run heap peak / AdamW": "MISSED"}


@pytest.mark.slow
def test_scale_command_end_to_end_memory_bounds_from_the_parameter_count(tmp_path):
    """`benchmarks scale` on a small RoBERTa (one layer, 8.7M parameters), zero.Init, 2 ranks through
    torchrun: the table and the verdicts are printed, and each rank's memory obeys bounds set by the
    parameter count alone. Right after the partitioned load a rank holds its half of the weights
    (0.4-0.8x the fp32 model in heap, where a whole copy would be 1x and an unmeasured load 0), and at
    its peak AdamW's run holds at least its half of the weights and of both AdamW moments (1.5x)."""
    out = tmp_path / "scale.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "scale", "--settings", "zero-init", "--layers", "1",
                          "--hidden", "256", "--vocab", "30000", "--seq", "16", "--micro-batch", "2", "--steps", "3",
                          "--timeout", "600", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    model = result["config"]["model_bytes_fp32"]
    assert model == 4 * bench_scale.roberta_parameters(1, 256, 30000)
    setting = result["settings"]["zero-init"]
    assert set(setting["optimizers"]) == {"adamw", "fisher-sam"}
    assert set(setting["targets"]) == {"adamw load peak / fp32 model", "fisher-sam load peak / fp32 model",
                                       "adamw run peak above baseline / fp32 model",
                                       "fisher-sam run peak above baseline / fp32 model",
                                       "adamw run heap peak above baseline / fp32 model",
                                       "fisher-sam run heap peak above baseline / fp32 model",
                                       "adamw finish heap peak / training heap peak",
                                       "fisher-sam finish heap peak / training heap peak",
                                       "fisher-sam run peak / AdamW", "fisher-sam run heap peak / AdamW"}
    for name, summary in setting["optimizers"].items():
        assert len(summary["per_rank"]) == 2 and len(summary["step_seconds"]) == 2, name  # steps 2 and 3
        assert all(s > 0 for s in summary["step_seconds"]) and summary["step_cpu_s"] > 0, name
        for rank in summary["per_rank"]:
            assert 0.4 * model <= rank["held_after_load"]["heap"] <= 0.8 * model, (name, rank)
            assert rank["load"]["heap"] >= rank["held_after_load"]["heap"], (name, rank)
    for rank in setting["optimizers"]["adamw"]["per_rank"]:
        assert rank["run"]["heap"] >= 1.5 * model and rank["run"]["VmRSS"] >= 1.5 * model, rank
    for name, summary in setting["optimizers"].items():
        # after the steps each rank holds its half of the weights, of DeepSpeed's fp32 master and of the
        # gradient, and of both AdamW moments: 0.5, 0.5, 0.5 and 1.0 x the fp32 model (plus padding)
        held = summary["held_x_model"]
        for role, share in (("weights", 0.5), ("fp32 master", 0.5), ("gradients", 0.5), ("optimizer state", 1.0)):
            assert share <= held[role] <= share * 1.1, (name, role, held)
        phases = summary["step_phase_x_model"]
        expected = {"forward", "backward", "step"} | ({"first_pass", "second_pass"} if name == "fisher-sam" else set())
        assert expected <= set(phases), (name, sorted(phases))
        # the optimizer step runs with everything the rank holds for the model alive (heap above the baseline,
        # which holds none of it)
        assert phases["step"]["heap"] >= 2.5, (name, phases["step"])
        assert expected <= set(summary["step_phase_seconds"]), (name, summary["step_phase_seconds"])
        assert all(v > 0 for v in summary["step_phase_seconds"].values()), summary["step_phase_seconds"]
    text = run.stdout
    assert "benchmarks scale" in text and "+ zero.Init" in text and "verdict" in text
    assert text.count("fisher-sam") >= 2 and "mem/AdamW" in text

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="3">
<testcase classname="test_cuda" name="test_a" time="12.34"/>
<testcase classname="test_cuda" name="test_b" time="1.0"><failure message="boom">trace</failure></testcase>
<testcase classname="test_cuda" name="test_c" time="0"><skipped message="needs a CUDA GPU"/></testcase>
</testsuite></testsuites>"""


def test_gpu_check_summary_from_given_results(tmp_path):
    """The GPU check reads pytest's junit XML and the benchmark's JSON; a failed or skipped test fails it."""
    from benchmarks import gpu_check

    (tmp_path / "tests.xml").write_text(JUNIT)
    tests = gpu_check.read_tests(tmp_path / "tests.xml")
    assert tests == {"test_a": {"outcome": "passed", "seconds": 12.3}, "test_b": {"outcome": "failure", "seconds": 1.0},
                     "test_c": {"outcome": "skipped", "seconds": 0.0}}
    (tmp_path / "zero.json").write_text(json.dumps({"stages": {"3": _zero_stage(3)}}))
    ratios = gpu_check.read_ratios(tmp_path / "zero.json")
    assert ratios["3"]["fisher-sam"]["step_ratio"] == pytest.approx(195 / 105)
    assert ratios["3"]["fisher-esam"]["collective_ratio"] == pytest.approx(2.1)
    assert ratios["3"]["fisher-sam"]["cuda_memory_ratio"] is None  # gloo ranks: no device memory
    summary = {"world_size": 1, "environment": {"gpus": ["H200"]}, "tests": tests, "seconds": 5.0, "passed": False,
               "parts": {"cuda tests": {"status": "failed (exit 1)", "seconds": 4.0}},
               "ratios": {"fp32": ratios}}
    text = gpu_check.format_summary(summary)
    assert "1.857" in text and "2.143" in text and "FAILED" in text and "failure" in text  # 195/105, 225/105
    assert gpu_check.read_tests(tmp_path / "absent.xml") == {}


def test_gpu_check_dry_run_prints_the_cuda_tests_and_the_nccl_benchmarks(tmp_path, capsys):
    from benchmarks import gpu_check

    assert gpu_check.main([str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "-m pytest -q -m cuda tests/test_cuda.py" in text and f"--timeout={gpu_check.TEST_TIMEOUT_S}" in text
    for dtype in ("fp32", "bf16"):
        assert f"zero --backend nccl --world-size <visible GPUs> --dtype {dtype}" in text
    assert sum(part.limit_s for part in gpu_check.parts(tmp_path, 1)) < 600  # the 10-minute budget
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.slow
def test_checkpoints_command_splits_the_hashing_across_the_ranks():
    """Two gloo ranks at ZeRO-2: every byte of the checkpoint is hashed once, by the rank that wrote it; rank 1
    hashes its own optimizer partition (before, rank 0 hashed everything)."""
    from benchmarks import checkpoints

    args = argparse.Namespace(world_size=2, hidden=256, layers=2, stage=2, repeats=1, timeout=600)
    result = checkpoints.run_checkpoints(args)
    assert sum(result["bytes_per_rank"]) == result["total_bytes"]
    assert min(result["bytes_per_rank"]) > 2 * 256 * 256  # rank 1's master, exp_avg and exp_avg_sq halves at least
    assert "each rank hashing what it wrote" in checkpoints.format_checkpoints_report(result)

