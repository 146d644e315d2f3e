"""The SAM family in your own `accelerate` loop under its DeepSpeed plugin: prepare as usual, then let
`SAMEngine` run each optimizer step.

    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    sam_engine = sam_engine_from_accelerator(accelerator, model, SAMConfig(sam_type="fisher-sam"))
    for window in accumulation_windows(loader, accelerator.gradient_accumulation_steps):
        out = sam_engine.train_step(window, per_example_loss)   # both passes, one engine.step()
        if not out.skipped:
            scheduler.step()

`train_step` replaces `accelerator.backward(loss)` + `optimizer.step()` + `optimizer.zero_grad()`:
`accelerator.backward` would run DeepSpeed's `engine.step()` right after the first pass (its DeepSpeed
wrapper steps at every accumulation boundary), so it must not be called, and neither may
`accelerator.accumulate()` wrap the step. The micro-batches of one optimizer step go in together
(`accumulation_windows`; an epoch's last window may be shorter, the same length on every rank);
`per_example_loss(engine, batch)` returns one loss per example. What stays as it is:

* the scheduler accelerate prepared: `AcceleratedScheduler.step()` steps the scheduler once per process
  (accelerate's convention: build it for `steps * num_processes` steps, as for any accelerate loop) and
  not after a DeepSpeed fp16 overflow; `if not out.skipped` also holds it back after a SAM step that
  applied nothing in bf16/fp32. A scheduler in the DeepSpeed config is the engine's, stepped inside
  `engine.step()`; don't step it yourself;
* a peft model goes in as it is; at ZeRO-3 in bf16 or fp16 over a base loaded partitioned, call
  `fsam_ds.zero.engine.cast_added_parameters(model)` before `prepare` (DeepSpeed leaves peft's fp32
  adapters beside the base's dtype and its ZeRO-3 optimizer refuses the mix; `SAMTrainer` does this itself);
* evaluation (`model.eval()`, forward), `accelerator.gather_for_metrics`, `accelerator.save_state` for
  DeepSpeed's checkpoint, beside which `sam_engine.save_sam_state(folder)` writes this rank's SAM state
  (`read_sam_state` + `load_sam_state` to resume).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from fsam_ds.sam.config import ConfigError, SAMConfig
from fsam_ds.sam.driver import StepObserver
from fsam_ds.zero.ds_config import check_sam_compatible
from fsam_ds.zero.engine import SAMEngine

__all__ = ["accumulation_windows", "sam_engine_from_accelerator"]


def sam_engine_from_accelerator(accelerator: Any, model: Any, sam: SAMConfig, observer: StepObserver | None = None,
                                planned_steps: int | None = None) -> SAMEngine:
    """A `SAMEngine` on the DeepSpeed engine that `accelerator.prepare` returned as `model`; refuses, with
    the fix, an accelerator without the DeepSpeed plugin, another model, and the DeepSpeed settings
    `fsam_ds.initialize` refuses. `planned_steps`: the run's optimizer steps (the schedule `late:f` needs them)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        raise ConfigError("sam_engine_from_accelerator needs accelerate's DeepSpeed plugin (Accelerator("
                          "deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=...)) or `accelerate launch "
                          "--use_deepspeed`) and the model passed through accelerator.prepare first. Without "
                          "DeepSpeed, use fsam_ds.SAMOptimizer in your loop.")
    if model is not wrapped.engine:
        raise ConfigError(f"sam_engine_from_accelerator got a {type(model).__name__}, not the DeepSpeed engine "
                          "accelerator.prepare returned for the model; pass the model that prepare returned.")
    check_sam_compatible(model.config, source="the accelerate DeepSpeed config")
    return SAMEngine(model, sam, observer, planned_steps)


def accumulation_windows(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """The micro-batches of each optimizer step: lists of `size`, and a shorter last one where the data
    runs out (every rank gets as many batches from accelerate's prepared loader)."""
    window: list[Any] = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
