"""`python -m benchmarks core|zero|scale|cheap|lora|quality|trainer|checkpoints ...`, from the repository root.

    python -m benchmarks core --threads 1                 # one process: ours vs pytorch-optimizer's SAM
    python -m benchmarks zero --stages 1 2 3 --steps 30   # 2 DeepSpeed ZeRO ranks over gloo (CPU)
    python -m benchmarks zero --backend nccl --world-size 1   # the same on GPUs, one rank per GPU
    python -m benchmarks scale [--search]                 # fsam-train at ZeRO-3 on a 355M model: memory, step time
    python -m benchmarks cheap --stages 2 3 --steps 30    # schedules, LookSAM, MSAM against AdamW and fisher-sam
    python -m benchmarks trainer --stages 2 3 --steps 40  # fisher-sam in Hugging Face's Trainer against its AdamW
    python -m benchmarks quality --output_dir runs/quality   # dev quality and CPU time per run on the demos
    python -m benchmarks lora --stages 2 3 --steps 5      # LoRA vs full fine-tuning, AdamW vs fisher-sam, a Llama
    python -m benchmarks checkpoints                      # manifest cost per save and resume: rank 0 vs every rank
    python -m benchmarks.gpu_check OUT_DIR                # GPU readiness: CUDA tests + ratios (scripts/gpu_check.sh)

`core` compares against pytorch-optimizer, which the dev extra installs (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import cheap, checkpoints, core, lora, quality, scale, trainer, zero
from benchmarks.measure import write_json


COMMANDS = {  # name: (module with add_arguments, run_<name>, format_<name>_report; its help)
    "core": (core, "one process: ours vs pytorch-optimizer's SAM, on CPU"),
    "zero": (zero, "DeepSpeed ZeRO stages on local gloo ranks (CPU) or NCCL ranks (GPUs)"),
    "scale": (scale, "fsam-train at ZeRO-3 on 2 local ranks: per-rank memory by phase and step time, AdamW vs "
                     "fisher-sam, per setting"),
    "cheap": (cheap, "schedules that skip the second pass, LookSAM and MSAM against AdamW and fisher-sam on ZeRO "
                     "stages"),
    "trainer": (trainer, "fisher-sam through Hugging Face's Trainer against the same Trainer with AdamW, beside "
                         "fsam-train's engine path"),
    "quality": (quality, "the demos' dev metric (mean ± std over seeds) and CPU time per run: AdamW, fisher-sam and "
                         "the cheaper variants"),
    "lora": (lora, "LoRA vs full fine-tuning, AdamW vs fisher-sam, on a Llama-class decoder on ZeRO stages"),
    "checkpoints": (checkpoints, "a checkpoint's manifest per save and per resume: hashed by rank 0 afterwards vs by "
                                 "each rank as it writes"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Step time, memory and "
                                     "communication benchmarks of the SAM family.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = COMMANDS[args.command][0]
    result = getattr(module, f"run_{args.command}")(args)
    print(getattr(module, f"format_{args.command}_report")(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
