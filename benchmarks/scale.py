"""`python -m benchmarks scale`: AdamW vs fisher-sam through `fsam-train` at ZeRO-3 on a model large enough
for memory to matter, per-rank memory by phase and step time, and the largest model each setting fits.

    python -m benchmarks scale                                   # RoBERTa-large shape, 5 settings x 2 optimizers
    python -m benchmarks scale --layers 8 --search --search-layers 2 --budget-gib 4   # what fits 2 x 12 GiB
    python -m benchmarks scale --layers 2 --hidden 64 --settings zero-init --steps 3   # a tiny version
    python -m benchmarks scale --layers 8 --settings zero-init --zero-option stage3_max_live_parameters=30000000
    python -m benchmarks scale --layers 8 --settings zero-init --rank-env MALLOC_MMAP_THRESHOLD_=1048576

A RoBERTa-shaped classifier (`RobertaForSequenceClassification`, default the large shape: 24 layers,
hidden 1024, vocab 50265, 355M parameters) is built from a config, with a small word-level tokenizer,
and saved once to a temporary folder, with a tiny SST-2 CSV whose sentences fill `--seq` tokens.
Then for each setting and optimizer the trainer runs as users run it: `torchrun --nproc_per_node 2`
of fsam-train's `main` (through `benchmarks.scale_rank`, which only samples memory and marks the
phases), fp32, ZeRO-3, `--steps` steps of micro-batch `--micro-batch` per rank. The settings are
cumulative: ZeRO-3 with the model loaded whole on every rank; + zero.Init (the trainer's default at
ZeRO-3); + activation checkpointing; + optimizer offload; + parameter offload (the shipped
`ds_configs/zero3*_fp32.json`, DeepSpeed's default bucket sizes).

Per rank: the process baseline (memory at the start of the model load: libraries, process group and
data are in), and the peaks of the load, of training and of the whole run above it, in total RSS and
heap (`benchmarks.measure`); every figure also in anonymous RSS in the JSON. The median step time comes
from the run's own metrics.jsonl (log_every 1: the time between consecutive steps' lines, the first
step left out), and the median CPU time of a step (the larger rank's), which a busy machine does not
inflate. Ratios are to the fp32 model (4 bytes per parameter), and fisher-sam / AdamW per
setting. The targets (`benchmarks.targets.SCALE_TARGETS`) are printed with their verdicts.

Per run the breakdown table shows what each rank holds after the steps, by role (`scale_rank.held_by_role`),
and the heap peak and wall seconds of each step phase. `--zero-option KEY=VALUE` adds a `zero_optimization`
entry to every setting's DeepSpeed config, `--rank-env NAME=VALUE` an environment variable of the ranks:
to measure what a DeepSpeed or allocator setting changes, against a run without it.

`--search`: per setting and optimizer, the whole-run peak per rank (absolute, the larger rank) is
fitted as a + b x layers from two sizes (`--layers` and `--search-layers`, same width), the largest
layer count within `--budget-gib` is predicted, and one fisher-sam run at that count checks it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import targets
from benchmarks.measure import MiB, fmt, median, ratio, table
from fsam_ds.zero.distributed import free_port, shm_buffer_names

REPO = Path(__file__).resolve().parents[1]
GiB = float(1 << 30)
WORLD_SIZE = 2
FIGURES = ("VmRSS", "heap", "RssAnon")  # total RSS and heap in the table; all three in the JSON
OPTIMIZERS = {"adamw": "none", "fisher-sam": "fisher-sam"}  # name -> sam.sam_type


@dataclass(frozen=True)
class Setting:
    label: str
    whole_load: bool
    """Load the whole model on every rank instead of under zero.Init."""
    trainer_args: tuple[tuple[str, str], ...] = ()


_CHECKPOINTING = ("gradient_checkpointing", "true")
SETTINGS: dict[str, Setting] = {
    "zero3": Setting("ZeRO-3, whole load", True),
    "zero-init": Setting("+ zero.Init", False),
    "checkpointing": Setting("+ checkpointing", False, (_CHECKPOINTING,)),
    "offload-optimizer": Setting("+ optimizer offload", False,
                                 (_CHECKPOINTING, ("ds_config", "ds_configs/zero3_offload_fp32.json"))),
    "offload-param": Setting("+ param offload", False,
                             (_CHECKPOINTING, ("ds_config", "ds_configs/zero3_offload_param_fp32.json"))),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024, help="width; heads = hidden / 64, feed-forward 4 x hidden")
    parser.add_argument("--vocab", type=int, default=50265)
    parser.add_argument("--seq", type=int, default=64, help="tokens per example")
    parser.add_argument("--micro-batch", type=int, default=4, help="examples per rank and step")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed); >= 3")
    parser.add_argument("--search", action="store_true",
                        help="also find the largest layer count each setting trains within --budget-gib")
    parser.add_argument("--budget-gib", type=float, default=3.0, help="per-rank memory budget of --search")
    parser.add_argument("--search-layers", type=int, default=6, help="the second size of --search's fit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run's ranks are killed")
    parser.add_argument("--skip-memory-check", action="store_true",
                        help="run even where the available memory looks too small for the largest model")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--zero-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a zero_optimization entry (a JSON value) added to every setting's DeepSpeed config, "
                             "e.g. stage3_max_live_parameters=30000000; repeatable")
    parser.add_argument("--rank-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for the ranks, e.g. MALLOC_MMAP_THRESHOLD_=1048576; repeatable")


# ====================================================================== the model and the data

WORDS = ["good", "great", "fine", "nice", "bad", "awful", "poor", "dull", "the", "a", "movie", "film", "was",
         "very", "plot", "and"]


def roberta_config(layers: int, hidden: int, vocab: int, pad_token_id: int = 0) -> Any:
    """RoBERTa's shape (heads of 64, feed-forward 4 x hidden, 514 positions, one token type) at any size."""
    from transformers import RobertaConfig

    return RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                         max_position_embeddings=514, type_vocab_size=1, num_labels=2, pad_token_id=pad_token_id)


def roberta_parameters(layers: int, hidden: int, vocab: int) -> int:
    """Parameters of the classifier, counted on the meta device (no memory)."""
    import torch
    from transformers import RobertaForSequenceClassification

    with torch.device("meta"):
        model = RobertaForSequenceClassification(roberta_config(layers, hidden, vocab))
    return sum(p.numel() for p in model.parameters())


def write_model(folder: Path, layers: int, hidden: int, vocab: int) -> int:
    """The classifier from a config and a word-level tokenizer, saved with save_pretrained; returns its
    parameter count. The embedding table keeps `vocab` rows, as the real model's does, though the
    tokenizer uses only its first few."""
    import torch
    from transformers import BertTokenizer, RobertaForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(vocab_file), model_max_length=512)
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(roberta_config(layers, hidden, vocab, tokenizer.pad_token_id))
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return count


def write_data(folder: Path, examples: int, words: int) -> tuple[Path, Path]:
    """SST-2-style train and dev CSVs whose sentences have `words` words (one token each)."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n in (("train.csv", examples), ("dev.csv", max(2, examples // 4))):
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for i in range(n):
                writer.writerow([" ".join(rng.choice(WORDS) for _ in range(words)), i % 2])
        paths.append(folder / name)
    return paths[0], paths[1]


# ====================================================================== one run


@dataclass(frozen=True)
class RunSpec:
    setting: str
    optimizer: str
    layers: int


def trainer_args(spec: RunSpec, model: Path, train: Path, dev: Path, out: Path, o: dict) -> list[str]:
    """fsam-train's arguments: ZeRO-3, fp32, `steps` steps, one evaluation at the end, no checkpoint."""
    args = {"task": "sst2", "model": str(model), "data.source": "local", "data.train_file": str(train),
            "data.dev_file": str(dev), "output_dir": str(out), "zero_stage": 3, "precision": "fp32",
            "data.micro_batch_size": o["micro_batch"], "data.eval_batch_size": o["micro_batch"],
            "data.max_length": o["seq"], "optim.max_steps": o["steps"], "optim.lr": 1e-5, "optim.warmup_ratio": 0,
            "sam.sam_type": OPTIMIZERS[spec.optimizer], "log.wandb": "disabled", "log.progress": "false",
            "log.log_every": 1, "eval.every_epoch": "false", "eval.save_best": "false",
            "checkpoint_every": 10 ** 9}
    args.update(SETTINGS[spec.setting].trainer_args)
    if o.get("zero_options"):
        # the setting's config file, or the one the trainer builds for itself, plus the options
        config = json.loads((REPO / args.get("ds_config", "ds_configs/zero3_fp32.json")).read_text())
        config["zero_optimization"].update(o["zero_options"])
        path = out.parent / "ds_config.json"
        path.write_text(json.dumps(config, indent=1))
        args["ds_config"] = str(path)
    return [f"--{k}={v}" for k, v in args.items()]


def launch(spec: RunSpec, model: Path, data: tuple[Path, Path], work: Path, o: dict) -> dict:
    """Runs fsam-train on 2 local ranks under torchrun; returns each rank's phases and the step times."""
    out = work / f"{spec.setting}-{spec.optimizer}-{spec.layers}"
    out.mkdir(parents=True)
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "benchmarks.scale_rank",
               "--out", str(out), *(["--whole-load"] if SETTINGS[spec.setting].whole_load else []), "--",
               *trainer_args(spec, model, *data, out / "run", o)]
    env = dict(os.environ, **o.get("rank_env", {}), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join(
                   [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=o["timeout"])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        log, _ = proc.communicate()
        log += f"\n[killed after {o['timeout']:.0f} s]"
    finally:
        for path in shm_buffer_names(port, world_size=WORLD_SIZE):  # left behind by a killed rank
            path.unlink(missing_ok=True)
    ranks = [out / f"rank{r}.json" for r in range(WORLD_SIZE)]
    if proc.returncode != 0 or not all(p.is_file() for p in ranks):
        raise RuntimeError(f"fsam-train ({spec}) failed with exit code {proc.returncode}; the last of its output:\n"
                           f"{log[-6000:]}")
    per_rank = [json.loads(p.read_text()) for p in ranks]
    step_seconds = _step_seconds(out / "run" / "metrics.jsonl")
    shutil.rmtree(out / "run", ignore_errors=True)  # the exported model: as large as the model itself
    return {"per_rank": per_rank, "step_seconds": step_seconds, "wall_seconds": time.perf_counter() - started}


def _step_seconds(metrics: Path) -> list[float]:
    """Seconds between consecutive steps' lines of metrics.jsonl (log_every 1): every step but the first."""
    from fsam_ds.trainer.metrics_log import read_events

    times = [e["time"] for e in read_events(metrics) if e["event"] == "train"]
    return [b - a for a, b in zip(times, times[1:])]


# ====================================================================== summary


def _peak_figure(figures: dict[str, int | None]) -> int | None:
    """The figure targets and the search are checked against: total RSS, the memory the rank occupies.
    The heap also counts memory handed out but never touched (DeepSpeed's ZeRO-3 reduce bucket is
    allocated at its full default size, 2 GB in fp32, and filled only as far as the gradients reach),
    which on a CPU costs nothing until it is written."""
    return figures.get("VmRSS")


def summarise_rank(rank: dict) -> dict:
    """Baseline (the start of the load), what the rank holds right after the load, and peaks above the
    baseline, in bytes, per figure."""
    phases = rank["phases"]
    base = phases["load"]["start"]

    def above(peak: dict) -> dict[str, int | None]:
        return {k: None if base.get(k) is None or k not in peak else peak[k] - base[k] for k in FIGURES}

    run_peak = {k: max(p["peak"][k] for p in phases.values() if k in p["peak"]) for k in FIGURES
                if any(k in p["peak"] for p in phases.values())}
    where = max(phases, key=lambda name: _peak_figure(phases[name]["peak"]) or 0)
    return {"baseline": base, "load": above(phases["load"]["peak"]),
            "held_after_load": above(phases["initialize"]["start"]), "train": above(phases["train"]["peak"]),
            "run": above(run_peak), "run_absolute": run_peak, "run_peak_phase": where,
            "finish": above(phases["finish"]["peak"]) if "finish" in phases else {},
            "step_phases": {name: above(peak) for name, peak in rank.get("step_phases", {}).items()},
            "held": rank.get("held", {})}


def summarise_run(raw: dict, model_bytes: int) -> dict:
    ranks = [summarise_rank(r) for r in raw["per_rank"]]

    def worst(part: str, figure: str) -> int | None:
        values = [r[part].get(figure) for r in ranks if r[part].get(figure) is not None]
        return max(values) if values else None

    def times_model(part: str, figure: str) -> float | None:
        return ratio(worst(part, figure), model_bytes)

    checked = {part: max([v for v in (_peak_figure(r[part]) for r in ranks) if v is not None], default=None)
               for part in ("load", "train", "run", "run_absolute")}
    phase_names = sorted({name for r in ranks for name in r["step_phases"]})
    step_phases = {name: {figure: times_model_of([r["step_phases"].get(name, {}).get(figure) for r in ranks],
                                                 model_bytes) for figure in FIGURES} for name in phase_names}
    roles = sorted({role for r in ranks for role in r["held"]})
    return {
        "step_phase_seconds": _phase_seconds(raw["per_rank"]),
        "held_x_model": {role: times_model_of([r["held"].get(role) for r in ranks], model_bytes) for role in roles},
        "step_phase_x_model": step_phases,
        "finish_x_model": {figure: times_model_of([r["finish"].get(figure) for r in ranks], model_bytes)
                           for figure in FIGURES},
        "run_heap_above_baseline": worst("run", "heap"),
        # the final evaluation and export against the steps, in heap: the tensors alive, which glibc's
        # retention of what the steps freed does not inflate
        "finish_over_train_heap": ratio(worst("finish", "heap"), worst("train", "heap")),
        "per_rank": ranks,
        "baseline_VmRSS": max(r["baseline"]["VmRSS"] for r in ranks),
        **{f"{part}_{figure}_x_model": times_model(part, figure) for part in ("load", "train", "run")
           for figure in FIGURES},
        "load_x_model": ratio(checked["load"], model_bytes),
        "run_x_model": ratio(checked["run"], model_bytes),
        "run_above_baseline": checked["run"],
        "run_absolute": checked["run_absolute"],
        "run_peak_phase": [r["run_peak_phase"] for r in ranks],
        "step_s": median(raw["step_seconds"]),
        "step_seconds": raw["step_seconds"],
        "step_cpu_s": median(_slowest_rank_cpu(raw["per_rank"])[1:]),
        "wall_seconds": raw["wall_seconds"],
    }


def _phase_seconds(per_rank: list[dict]) -> dict[str, float]:
    """Per phase, the median over the timed steps (the first left out) of the larger rank's seconds."""
    steps = [list(r.get("step_phase_seconds", []))[1:] for r in per_rank]
    names = sorted({name for rank in steps for step in rank for name in step})
    return {name: median([max(rank[i].get(name, 0.0) for rank in steps) for i in range(min(map(len, steps)))])
            for name in names} if steps and min(map(len, steps)) else {}


def times_model_of(values: list[int | None], model_bytes: int) -> float | None:
    """The larger rank's value x the fp32 model."""
    present = [v for v in values if v is not None]
    return ratio(max(present), model_bytes) if present else None


def _slowest_rank_cpu(per_rank: list[dict]) -> list[float]:
    """Per step, the larger rank's CPU seconds."""
    return [max(step) for step in zip(*(r.get("step_cpu_seconds", []) for r in per_rank))]


def summarise_setting(setting: str, runs: dict[str, dict]) -> dict:
    adamw = runs.get("adamw")
    out: dict[str, dict] = {}
    for name, run in runs.items():
        out[name] = {"load_ratio": run["load_x_model"], "run_ratio": run["run_x_model"],
                     "run_heap_ratio": run["run_heap_x_model"], "finish_ratio": run["finish_over_train_heap"],
                     "memory_ratio": ratio(run["run_above_baseline"], adamw and adamw["run_above_baseline"]),
                     "memory_heap_ratio": ratio(run["run_heap_above_baseline"],
                                                adamw and adamw["run_heap_above_baseline"]),
                     "step_ratio": ratio(run["step_s"], adamw and adamw["step_s"]),
                     "step_cpu_ratio": ratio(run["step_cpu_s"], adamw and adamw["step_cpu_s"])}
    return {"optimizers": runs, "ratios": out, "targets": targets.check_scale(setting, out)}


# ====================================================================== the largest model within a budget


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of peak = a + b x layers through two (layers, peak) points."""
    (x0, y0), (x1, y1) = points
    b = (y1 - y0) / (x1 - x0)
    return y0 - b * x0, b


def largest_within(a: float, b: float, budget: float) -> int | None:
    """The most layers with a + b x layers <= budget (None: not even one, or no growth to fit)."""
    if b <= 0:
        return None
    layers = math.floor((budget - a) / b)
    return layers if layers >= 1 else None


# ====================================================================== the command


def _options(args: argparse.Namespace) -> dict:
    if args.steps < 3:
        raise SystemExit(f"benchmarks scale: --steps={args.steps} leaves fewer than two timed steps (the first is not "
                         "timed); pass --steps=3 or more")
    if args.hidden % 64 and args.hidden >= 64 or args.hidden < 1:
        raise SystemExit(f"benchmarks scale: --hidden={args.hidden} must be a multiple of 64 (heads of 64), or less "
                         "than 64 for one head")
    if args.search and args.search_layers == args.layers:
        raise SystemExit(f"benchmarks scale: --search-layers={args.search_layers} equals --layers; the fit needs two "
                         "different sizes")
    return {**{k: getattr(args, k) for k in ("settings", "layers", "hidden", "vocab", "seq", "micro_batch", "steps",
                                              "search", "budget_gib", "search_layers", "timeout",
                                              "skip_memory_check", "json")},
            "zero_options": _json_values(_pairs(args.zero_option, "--zero-option"), "--zero-option"),
            "rank_env": _pairs(args.rank_env, "--rank-env")}


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"benchmarks scale: {flag} {item!r} is not KEY=VALUE")
        pairs[key] = value
    return pairs


def _json_values(pairs: dict[str, str], flag: str) -> dict[str, Any]:
    try:
        return {key: json.loads(value) for key, value in pairs.items()}
    except ValueError:
        raise SystemExit(f"benchmarks scale: every {flag} value must be JSON (a number, true/false, or a quoted "
                         f"string); got {pairs}") from None


# per-rank peak above the baseline, x the fp32 model, before the work on ZeRO-3 memory (fisher-sam, the larger),
# and the baseline itself: what the memory check plans for
PLANNED_PEAK_X_MODEL = 7.5
PLANNED_BASELINE = 0.6 * GiB


def check_memory(parameters: int) -> None:
    """Refuses a model whose runs would likely not fit in the memory available now (Linux only)."""
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return
    needed = WORLD_SIZE * (PLANNED_PEAK_X_MODEL * 4 * parameters + PLANNED_BASELINE)
    if needed > available:
        raise SystemExit(f"benchmarks scale: {parameters / 1e6:.0f} M parameters need about {needed / GiB:.1f} GiB for "
                         f"{WORLD_SIZE} ranks (up to {PLANNED_PEAK_X_MODEL}x the fp32 model each, plus the process), "
                         f"and {available / GiB:.1f} GiB are available. Pass a smaller --layers (each layer of width "
                         "1024 adds about 12.6 M parameters), or --skip-memory-check to run anyway.")


class Bench:
    """The saved models (one per layer count) and the runs, in one temporary folder."""

    def __init__(self, o: dict, work: Path) -> None:
        self.o, self.work = o, work
        self.data = write_data(work / "data", o["micro_batch"] * WORLD_SIZE * o["steps"], words=o["seq"])
        self.models: dict[int, tuple[Path, int]] = {}

    def model(self, layers: int) -> tuple[Path, int]:
        if layers not in self.models:
            if not self.o["skip_memory_check"]:
                check_memory(roberta_parameters(layers, self.o["hidden"], self.o["vocab"]))
            folder = self.work / f"model-{layers}"
            self.models[layers] = (folder, write_model(folder, layers, self.o["hidden"], self.o["vocab"]))
        return self.models[layers]

    def run(self, spec: RunSpec) -> dict:
        folder, parameters = self.model(spec.layers)
        raw = launch(spec, folder, self.data, self.work, self.o)
        summary = summarise_run(raw, 4 * parameters)
        if self.o["json"]:  # each run as it ends: a long benchmark that stops early keeps what it measured
            with open(f"{self.o['json']}.runs.jsonl", "a") as runs:
                runs.write(json.dumps({"spec": asdict(spec),
                                       "parameters": parameters, "summary": summary}) + "\n")
        print(f"  {spec.setting} {spec.optimizer} {spec.layers} layers: "
              f"run peak {fmt(summary['run_x_model'])} x model, "
              f"step {fmt(summary['step_s'], '.2f')} s, {raw['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
        return summary


def run_scale(args: argparse.Namespace) -> dict:
    o = _options(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fsam-scale-") as tmp:
        bench = Bench(o, Path(tmp))
        _, parameters = bench.model(o["layers"])
        settings = {s: summarise_setting(s, {name: bench.run(RunSpec(s, name, o["layers"])) for name in OPTIMIZERS})
                    for s in o["settings"]}
        search = find_largest(bench, settings) if o["search"] else None
    return {"config": {**o, "world_size": WORLD_SIZE, "parameters": parameters, "model_bytes_fp32": 4 * parameters,
                       "date": time.strftime("%Y-%m-%d", time.gmtime())},
            "settings": settings, "search": search, "wall_seconds": time.perf_counter() - started}


def find_largest(bench: Bench, settings: dict[str, dict]) -> dict:
    """Per setting and optimizer: the fit from the main runs and runs at --search-layers, the predicted
    largest layer count within the budget, and one fisher-sam run there to check it."""
    o = bench.o
    budget = o["budget_gib"] * GiB
    out: dict[str, dict] = {}
    for s in o["settings"]:
        out[s] = {}
        for name in OPTIMIZERS:
            small = bench.run(RunSpec(s, name, o["search_layers"]))
            main = settings[s]["optimizers"][name]
            a, b = fit_line([(o["search_layers"], small["run_absolute"]), (o["layers"], main["run_absolute"])])
            layers = largest_within(a, b, budget)
            out[s][name] = {"points": {str(o["search_layers"]): small["run_absolute"],
                                       str(o["layers"]): main["run_absolute"]},
                            "a_bytes": a, "b_bytes_per_layer": b, "predicted_layers": layers,
                            "predicted_parameters": (None if layers is None
                                                     else roberta_parameters(layers, o["hidden"], o["vocab"])),
                            "predicted_peak": None if layers is None else a + b * layers}
        check = out[s]["fisher-sam"]
        layers = check["predicted_layers"]
        if layers is not None:
            measured = bench.run(RunSpec(s, "fisher-sam", layers))
            check["verified_peak"] = measured["run_absolute"]
            check["within_budget"] = measured["run_absolute"] <= budget
    return {"budget_bytes": budget, "settings": out}


# ====================================================================== printing


def format_scale_report(result: dict) -> str:
    c = result["config"]
    head = (f"benchmarks scale ({c['date']}): fsam-train under torchrun, {c['world_size']} gloo ranks, ZeRO-3, fp32; "
            f"RoBERTa-shaped classifier, {c['layers']} layers, hidden {c['hidden']}, vocab {c['vocab']} "
            f"({c['parameters'] / 1e6:.1f} M parameters, fp32 model {c['model_bytes_fp32'] / MiB:.0f} MiB); "
            f"micro-batch {c['micro_batch']} x {c['seq']} tokens per rank, {c['steps']} steps")
    changes = [f"zero_optimization.{k} = {json.dumps(v)}" for k, v in c.get("zero_options", {}).items()]
    changes += [f"{k}={v} for the ranks" for k, v in c.get("rank_env", {}).items()]
    if changes:
        head += "; every setting with " + ", ".join(changes)
    header = ["setting", "optimizer", "base MiB", "load RSS", "load heap", "train RSS", "train heap", "finish RSS",
              "finish heap", "run RSS", "run heap", "peak in", "step s", "CPU s", "mem/AdamW", "step/AdamW",
              "CPU/AdamW"]
    rows = []
    for s, summary in result["settings"].items():
        for name, run in summary["optimizers"].items():
            r = summary["ratios"][name]
            rows.append([SETTINGS[s].label if name == "adamw" else "", name, fmt(run["baseline_VmRSS"] / MiB, ".0f"),
                         fmt(run["load_VmRSS_x_model"]), fmt(run["load_heap_x_model"]),
                         fmt(run["train_VmRSS_x_model"]), fmt(run["train_heap_x_model"]),
                         fmt(run["finish_x_model"]["VmRSS"]), fmt(run["finish_x_model"]["heap"]),
                         fmt(run["run_VmRSS_x_model"]),
                         fmt(run["run_heap_x_model"]), "/".join(run["run_peak_phase"]), fmt(run["step_s"]),
                         fmt(run["step_cpu_s"]), "" if name == "adamw" else fmt(r["memory_ratio"], ".3f"),
                         "" if name == "adamw" else fmt(r["step_ratio"]),
                         "" if name == "adamw" else fmt(r["step_cpu_ratio"])])
    legend = ("Memory per rank, the larger rank, x the fp32 model, above the rank's baseline (base MiB: total RSS at "
              "the start of the model load, after imports, process group and data). RSS: total resident memory; "
              "heap: malloc's bytes in use (mallinfo2); both sampled every 5 ms. load: the model load; train: "
              "the steps; finish: the final evaluation and export; run: the whole run (load, initialize, steps, "
              "finish); peak in: the "
              "phase of each rank's run peak. step s: median seconds between steps (first left out); "
              "CPU s: the median of the larger rank's CPU "
              "seconds per step, which other processes on the machine do not inflate. "
              "mem/AdamW: the run peaks (RSS) above baseline; step/AdamW: the median steps.\n"
              + targets.describe_scale())
    verdicts = targets.format_verdicts({s: summary["targets"] for s, summary in result["settings"].items()},
                                       key="setting")
    parts = [head, "", table(header, rows), legend, "", _format_breakdown(result), "", verdicts]
    if result.get("search"):
        parts += ["", _format_search(result)]
    return "\n".join(parts)


HELD_ROLES = ("weights", "fp32 master", "gradients", "optimizer state")
SAM_PHASES = ("first_pass", "rebuild_mask", "apply_perturbation", "zero_grads", "select_examples", "second_pass",
              "restore")
NESTED_SAM_PHASES = ("rebuild_mask", "apply_perturbation")
"""Run inside first_pass, whose seconds already count them."""


def _format_breakdown(result: dict) -> str:
    """Where each run's memory goes: what the rank holds between steps, and the heap peak of each part
    of a step and of the final evaluation and export."""
    from benchmarks.scale_rank import BETWEEN_PHASES

    header = ["setting", "optimizer", *(f"held: {r}" for r in HELD_ROLES), "held", "forward", "backward",
              "SAM passes", "step", "other", "finish", "s: forward", "backward", "SAM passes", "step"]
    rows = []
    for s, summary in result["settings"].items():
        for name, run in summary["optimizers"].items():
            held, phases = run["held_x_model"], run["step_phase_x_model"]

            def heap(*names: str) -> str:
                values = [phases[n]["heap"] for n in names if n in phases and phases[n]["heap"] is not None]
                return fmt(max(values)) if values else "-"

            seconds = run["step_phase_seconds"]
            sam = [seconds[n] for n in SAM_PHASES if n in seconds and n not in NESTED_SAM_PHASES]
            rows.append([SETTINGS[s].label if name == "adamw" else "", name,
                         *(fmt(held.get(r)) for r in HELD_ROLES), fmt(sum(v for v in held.values() if v)),
                         heap("forward"), heap("backward"), heap(*SAM_PHASES), heap("step"), heap(BETWEEN_PHASES),
                         fmt(run["finish_x_model"]["heap"]), fmt(seconds.get("forward")),
                         fmt(seconds.get("backward")), fmt(sum(sam)) if sam else "-", fmt(seconds.get("step"))])
    legend = ("held: the tensors a rank holds for the model after the last step, x the fp32 model (the larger rank): "
              "the weights' partitions, DeepSpeed's fp32 master, the gradient partitions, the optimizer's state. "
              "Then the heap peak above the baseline, x the fp32 model, of each part "
              "of the steps (over all steps; SAM passes: the largest of the sharpness-aware phases; other: the "
              "loop's own work between the engine's phases) and of the finish (final evaluation and export). "
              "s: wall seconds per step in the phase (all micro-batches; for fisher-sam both passes), the median "
              "over the timed steps, the larger rank.")
    return table(header, rows) + "\n" + legend


def _format_search(result: dict) -> str:
    search, c = result["search"], result["config"]
    rows = []
    for s, by_optimizer in search["settings"].items():
        for name, fit in by_optimizer.items():
            layers = fit["predicted_layers"]
            verified = "" if "verified_peak" not in fit else (
                f"{fit['verified_peak'] / MiB:.0f} ({'within' if fit['within_budget'] else 'OVER'})")
            rows.append([SETTINGS[s].label if name == "adamw" else "", name, fmt(fit["a_bytes"] / MiB, ".0f"),
                         fmt(fit["b_bytes_per_layer"] / MiB, ".1f"), "n/a" if layers is None else str(layers),
                         fmt(None if layers is None else fit["predicted_parameters"] / 1e6, ".0f"),
                         fmt(fit["predicted_peak"] and fit["predicted_peak"] / MiB, ".0f"), verified])
    return (f"largest model within {search['budget_bytes'] / GiB:.2f} GiB per rank (whole-run peak, absolute, total "
            f"RSS, larger rank): peak = a + b x layers fitted through runs at {c['search_layers']} "
            f"and {c['layers']} layers of width {c['hidden']}; one fisher-sam run at the predicted count checks it\n"
            + table(["setting", "optimizer", "a MiB", "b MiB/layer", "layers", "M params", "predicted MiB",
                     "measured MiB"], rows))
