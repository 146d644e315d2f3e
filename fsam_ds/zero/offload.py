"""ZeRO-Offload under the two-pass SAM step: which settings run, and the refusals for the rest.

What offload changes for the step (DeepSpeed 0.19.8; tests/test_zero_offload.py checks each case
against the single-process reference):

* `offload_optimizer` cpu, stages 1/2: the fp32 master partition and its gradient live in CPU
  buffers; at the accumulation boundary each parameter's averaged fragment is copied into the
  master's `.grad` (the optimizer's `offload_gradient_dict` views of it). The shard adapter's
  fragments (`_hp_mapping`) then point into those CPU buffers, so scores, mask and e are computed
  there; e still reaches the replicated weights through the adapter's all-reduce.
* `offload_optimizer` cpu (or nvme), stage 3: the fp32 master partitions and their gradients are on
  the CPU; `safe_get_local_grad` / `safe_get_local_fp32_param` read them there.
* `offload_param` cpu, stage 3: `p.ds_tensor` itself is a CPU tensor; the adapter adds e to it in
  place, where it is, and the next forward gathers from it.

Gradient clipping: without offload, and at stage 3 (whose `safe_set_local_grad` records the norm it
writes), DeepSpeed measures the gradient it steps with. ZeRO-1/2 under offload measures each
parameter's fragment during the backward instead (`norm_for_param_grads`) and clips with those norms
in `step()`; the adapter stores them again for the fragments it rewrites after the backward (GSAM's
correction), so the clip coefficient comes from the corrected gradient. The other types step with the
second pass's gradient as the backward left it, so DeepSpeed's own norms are the right ones there.

Several backward passes per step: SAM calls backward at least twice per step (plus gradient
accumulation), with `engine.optimizer.zero_grad()` in between. ZeRO-3's zero_grad resets its
backward counter, so the second pass copies into the offloaded gradient partitions. ZeRO-1/2's does
not, and under offload a backward after the first of a step adds DeepSpeed's CPU accumulation buffer:
`restart_offloaded_accumulation` resets the counter between the passes (the adapter calls it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

OFFLOAD_SECTIONS = ("offload_optimizer", "offload_param")
# The stages each offload section runs at with the SAM step (DeepSpeed offloads parameters only at 3).
OFFLOAD_STAGES = {"offload_optimizer": (1, 2, 3), "offload_param": (3,)}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def offload_device(zero: Mapping[str, Any], section: str) -> str:
    """The device of `zero_optimization.<section>` ("none" when absent)."""
    value = zero.get(section)
    if value is None:
        return "none"
    return value.get("device", "none") if isinstance(value, Mapping) else value


def async_io_available() -> bool:
    """Whether DeepSpeed's async I/O op (needed for NVMe offload) can be built here."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return bool(AsyncIOBuilder().is_compatible(verbose=False))


def check_offload(config: dict[str, Any], stage: int, fail: Callable[[str], None],
                  nvme_available: Callable[[], bool] = async_io_available) -> bool:
    """Checks the offload sections for the SAM step; returns whether optimizer offload is on.

    `fail(message)` raises; `stage` is the ZeRO stage the run uses."""
    zero = config.get("zero_optimization") or {}
    for key in ("cpu_offload", "cpu_offload_param"):
        if zero.get(key):
            new = "offload_optimizer" if key == "cpu_offload" else "offload_param"
            fail(f"zero_optimization.{key} is true, DeepSpeed's deprecated spelling of CPU offload. Remove it "
                 f'and set zero_optimization.{new} to {{"device": "cpu"}} instead.')
    for section in OFFLOAD_SECTIONS:
        device = offload_device(zero, section)
        if device == "none":
            continue
        if device not in OFFLOAD_DEVICES:
            fail(f"zero_optimization.{section}.device is {device!r}; it must be one of "
                 f"{', '.join(OFFLOAD_DEVICES)}.")
        stages = OFFLOAD_STAGES[section]
        if stage not in stages:
            where = "ZeRO stage 3" if stages == (3,) else "ZeRO stages 1, 2 and 3"
            example = "zero3_offload_param_bf16.json" if section == "offload_param" else "zero2_offload_bf16.json"
            fail(f"zero_optimization.{section} is {zero[section]!r} at ZeRO stage {stage!r}, but {section} runs "
                 f"only at {where}. Use zero_stage={stages[-1]} (e.g. ds_configs/{example}), or remove "
                 f"zero_optimization.{section}.")
        if device == "nvme":
            if stage != 3:
                fail(f"zero_optimization.{section}.device is 'nvme' at ZeRO stage {stage}; DeepSpeed offloads to "
                     "NVMe only at ZeRO stage 3 (ZeRO-Infinity). Use zero_stage=3, or device 'cpu'.")
            if not nvme_available():
                fail(f"zero_optimization.{section}.device is 'nvme', but DeepSpeed's async I/O op (async_io) "
                     "cannot be built on this machine. Install libaio (apt-get install libaio-dev) and check "
                     "with `ds_report` that async_io is compatible, or use device 'cpu'.")
    return offload_device(zero, "offload_optimizer") != "none"


def allow_client_optimizer(config: dict[str, Any], fail: Callable[[str], None], offloaded: bool) -> None:
    """Under optimizer offload (`offloaded`) DeepSpeed refuses a client torch optimizer unless told otherwise;
    the trainer always passes its own `torch.optim.AdamW`, so `zero_force_ds_cpu_optimizer` "auto" is filled
    with false (absent too, under offload), and true is refused under offload (DeepSpeedCPUAdam would be
    faster, but it is a C++ build, and the trainer's optimizer is torch's in every configuration)."""
    value = config.get("zero_force_ds_cpu_optimizer", "auto" if offloaded else None)
    if value == "auto":
        config["zero_force_ds_cpu_optimizer"] = False
    elif offloaded and value is not False:
        fail(f"zero_force_ds_cpu_optimizer is {value!r}, but the trainer passes its own torch.optim.AdamW, "
             "which DeepSpeed then refuses under offload_optimizer. Set zero_force_ds_cpu_optimizer to false "
             "(or \"auto\").")


def optimizer_offloaded(engine: Any) -> bool:
    """Whether the engine's ZeRO optimizer keeps its fp32 master and gradients offloaded."""
    return engine.zero_optimization_stage() in (1, 2) and bool(engine.zero_use_cpu_optimizer())


def restart_offloaded_accumulation(optimizer: Any) -> None:
    """Makes the next backward of a ZeRO-1/2 offloaded optimizer start a fresh accumulation.

    DeepSpeed 0.19.8 counts backward passes in `micro_step_id` and resets it only in `step()`. Under
    offload, a backward with `micro_step_id > 0` adds the per-parameter CPU accumulation buffer
    (`accumulated_grads_in_cpu`) to the new gradient: SAM's second pass would then include the
    last gradient saved there, the previous step's second-pass gradient (or, with accumulation, this
    step's first pass). Resetting the counter between the passes makes the second pass overwrite
    that buffer instead, as the first pass of a step does (tests/test_zero_offload.py fails without it).
    """
    if getattr(optimizer, "micro_step_id", None) is None:
        from fsam_ds.zero.adapters import deepspeed_moved

        raise RuntimeError(deepspeed_moved("has no `micro_step_id` on its ZeRO-1/2 optimizer",
                                           "resets it between the SAM passes under offload_optimizer",
                                           "remove zero_optimization.offload_optimizer"))
    from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

    optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
