"""Code that runs inside the 2-rank processes of tests/test_zero_init.py: models partitioned from birth
(`deepspeed.zero.Init`, and the trainer's ZeRO-3 loading through transformers)."""

from __future__ import annotations

import torch

from ds_workers import build_engine, ds_config, full_params, global_batches, mlp, per_example_loss, sam_config, split


def run_zero_init_equivalence(rank: int, world: int, kind: str, types: list[str], model_dir: str | None = None,
                              zero: dict | None = None, steps: int = 3) -> dict:
    """The SAM types on a ZeRO-3 engine whose model never existed whole on a rank: the MLP constructed
    inside `deepspeed.zero.Init`, the BERT loaded by the trainer's partitioned loading from `model_dir`.
    Returns the trained full parameters per type and what each parameter looked like before the engine."""
    import deepspeed

    from fsam_ds.trainer.model_loading import load_model
    from fsam_ds.trainer.run_config import TrainConfig
    from fsam_ds.trainer.objectives import objective_for

    zero = zero or {}
    config = ds_config(3, **zero)
    batches = global_batches(kind, steps)
    loss = per_example_loss(kind)
    results, born = {}, {}
    for sam_type in types:
        if kind == "mlp":
            with deepspeed.zero.Init(config_dict_or_path=config):
                model = mlp()
        else:
            cfg = TrainConfig(task="mnli", model=str(model_dir))  # 3 labels, as tiny_bert's head
            model = load_model(cfg, objective_for(cfg), config)
        # partitioned from birth: a rank holds only its share of each parameter
        born[sam_type] = [(p.ds_numel, p.ds_tensor.numel(), p.numel()) for p in model.parameters()]
        sam_engine = build_engine(model, 3, sam=sam_config(sam_type), **zero)
        for b in batches:
            assert not sam_engine.train_step(split(b, rank, world), loss).skipped
        results[sam_type] = full_params(sam_engine.engine)
    return {"params": results, "born": born}


def run_load_memory(rank: int, world: int, model_dir: str, partitioned: bool) -> dict:
    """Loads the classifier in `model_dir` as the trainer does at ZeRO-3, with or without partitioned
    loading, then builds the fisher-sam engine. Returns the peaks above the start (`BackgroundPeak`)
    of the load and of load + `fsam_ds.initialize`, the bytes of the rank's share of the weights, and
    the parameters whose loaded weights differ from the checkpoint's (compared on rank 0)."""
    import deepspeed
    from safetensors import safe_open

    from benchmarks.measure import BackgroundPeak
    from fsam_ds.trainer.model_loading import load_model
    from fsam_ds.trainer.run_config import TrainConfig
    from fsam_ds.trainer.objectives import objective_for

    cfg = TrainConfig(task="sst2", model=model_dir)
    # transformers' BERT code (about 100 MiB resident once imported, whatever the model's size) is
    # imported before the baseline: the figures are what loading the weights costs
    import transformers.models.bert.modeling_bert  # noqa: F401

    torch.distributed.barrier()
    with BackgroundPeak() as whole:
        with BackgroundPeak() as load:
            model = load_model(cfg, objective_for(cfg), ds_config(3) if partitioned else None)
        params = dict(model.named_parameters())
        held = sum((p.ds_tensor if partitioned else p).numel() * 4 for p in params.values())
        sam_engine = build_engine(model, 3, sam=sam_config("fisher-sam"), lr=1e-4)
    mismatched = []
    with safe_open(f"{model_dir}/model.safetensors", "pt") as checkpoint:
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0 and not torch.equal(p.detach(), checkpoint.get_tensor(name)):
                    mismatched.append(name)
    del sam_engine
    return {"load": load.above_start, "initialize": whole.above_start, "held": held, "mismatched": mismatched,
            "checked": len(params)}


def run_partitioned_loads(rank: int, world: int, cases: list[tuple], seed: int = 1234) -> list[dict]:
    """Loads each (model class, folder, dtype, kwargs, DeepSpeed config arguments) case with
    `load_pretrained` at ZeRO-3, after seeding as the reference does. Returns per case whether it
    read the partitions itself (no fallback), the full parameters gathered on rank 0, what each
    parameter looked like loaded, and the checkpoint-name conversions the model keeps for saving; or
    the `CheckpointError` it raised."""
    import deepspeed

    import fsam_ds.trainer.model_loading as model_loading

    used = []
    planned = model_loading.load_planned

    def recording(*args, **kwargs):
        used.append(True)
        return planned(*args, **kwargs)

    model_loading.load_planned = recording
    results = []
    for model_class, folder, dtype, kwargs, config in cases:
        used.clear()
        torch.manual_seed(seed)
        try:
            model = model_loading.load_pretrained(model_class, folder, dtype, ds_config(3, **config), **kwargs)
        except model_loading.CheckpointError as err:  # raised on every rank, or the others would wait
            results.append({"error": str(err)})
            continue
        params = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if rank == 0:
                    params[name] = p.detach().clone()
        results.append({"partitioned": bool(used), "params": params, "training": model.training,
                        "born": [(p.ds_numel, p.ds_tensor.numel(), p.numel()) for p in model.parameters()],
                        "tied": [(a, b) for a, p in model.named_parameters(remove_duplicate=False)
                                 for b, q in model.named_parameters(remove_duplicate=False) if a < b and p is q],
                        "buffers": {n: b.clone() for n, b in model.named_buffers()},
                        "conversions": [c.source_patterns for c in getattr(model, "_weight_conversions", [])]})
    return results



def run_decay_groups(rank: int, world: int, model_dir: str, stage: int) -> dict:
    """The trainer's optimizer groups for the classifier in `model_dir` loaded as the trainer loads it at
    `stage` (partitioned at ZeRO-3), and one AdamW step on a zero gradient: Adam's moments stay 0, so the
    step is weight decay alone, w -> w (1 - lr wd) in the decay group and no change elsewhere.
    Returns {weight decay: sorted names} and the full weights before and after, by name."""
    import fsam_ds.zero.engine as fe
    from fsam_ds.trainer.build import build_optimizer
    from fsam_ds.trainer.model_loading import load_model
    from fsam_ds.trainer.objectives import objective_for
    from fsam_ds.trainer.run_config import TrainConfig

    cfg = TrainConfig(task="mnli", model=model_dir)
    cfg.optim.lr, cfg.optim.weight_decay = 0.1, 0.5
    config = ds_config(stage)
    model = load_model(cfg, objective_for(cfg), config)
    names = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim)
    groups = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    engine = fe.initialize_plain(model, config, optimizer=optimizer).engine

    def weights() -> dict:
        params = dict(engine.module.named_parameters())
        return dict(zip(params, full_params(engine)))

    before = weights()
    batch = split(global_batches("bert", 1)[0], rank, world)[0]
    out = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    engine.backward(out.logits.sum() * 0.0)  # every gradient exactly zero
    engine.step()
    return {"groups": groups, "before": before, "after": weights()}
