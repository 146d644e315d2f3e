"""Supervised fine-tuning of a chat model with TRL's `SFTTrainer` and the SAM family under DeepSpeed: the usual
TRL script, `sam_trainer(SFTTrainer)` for `SFTTrainer`, SAMConfig's fields on the command line.

    python examples/trl_sft_sam.py --output_dir out                               # SmolLM2-135M, CPU, offline
    torchrun --nproc_per_node 8 examples/trl_sft_sam.py --output_dir out --model_name_or_path MODEL \
        --train_file chats.jsonl --deepspeed ds_configs/zero3_bf16.json --bf16 true --sam_type fisher-sam

The training file is JSON lines of chats, {"messages": [{"role": ..., "content": ...}, ...]}. Each chat
becomes a prompt (every turn but the last) and a completion (the last, the assistant's answer), so the
loss is on the answer only (TRL's completion-only loss). Offline defaults, to try it on a CPU:
SmolLM2-135M-Instruct and the spelling-correction chats of `fsam-demo --demo spelling` (both from the
packages `install.sh` installs; converted or written into the cache at first use), 4 steps of 2 chats,
96 tokens, fp32 at ZeRO-2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser
from trl import SFTConfig, SFTTrainer

from fsam_ds.hf import SAMArguments, sam_trainer
from fsam_ds.zero.distributed import default_to_one_process

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2_fp32.json"
# what the offline CPU run needs; anything on the command line wins (argparse keeps the last value given)
CPU_DEFAULTS = ["--max_steps", "4", "--per_device_train_batch_size", "2", "--max_length", "96",
                "--learning_rate", "1e-4", "--bf16", "false", "--logging_steps", "1", "--save_strategy", "no",
                "--report_to", "none", "--rho", "0.02", "--keep_ratio", "0.1", "--mask_interval", "4"]


@dataclass
class DataArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A model on the hub or a local folder; none: SmolLM2-135M-Instruct from the installed package"})
    train_file: str | None = field(default=None, metadata={"help": "JSON lines of chats; none: the spelling chats"})
    validation_file: str | None = field(default=None, metadata={"help": "Like train_file; evaluated at the end"})
    max_eval_chats: int = field(default=8, metadata={"help": "At most this many validation chats are evaluated"})


def prompt_and_completion(chats: Dataset) -> Dataset:
    """The last turn is the completion, the turns before it the prompt (TRL's conversational prompt-completion
    format, whose loss is on the completion)."""
    return chats.map(lambda row: {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]},
                     remove_columns=chats.column_names)


def main() -> None:
    default_to_one_process()  # a plain `python` run; torchrun and the deepspeed launcher set up their ranks
    parser = HfArgumentParser((DataArguments, SFTConfig, SAMArguments))
    data_args, sft_args, sam_args = parser.parse_args_into_dataclasses(
        CPU_DEFAULTS + ["--deepspeed", str(DEFAULT_DS_CONFIG)] + sys.argv[1:])
    if data_args.model_name_or_path is None or data_args.train_file is None:
        from fsam_ds.cli.demo import spelling_chats
        from fsam_ds.cli.generation_assets import smollm2_path

        data_args.model_name_or_path = data_args.model_name_or_path or str(smollm2_path())
        if data_args.train_file is None:
            data_args.train_file, data_args.validation_file = map(str, spelling_chats())
    files = {"train": data_args.train_file, **({"validation": data_args.validation_file}
                                                if data_args.validation_file else {})}
    data = {name: prompt_and_completion(split) for name, split in load_dataset("json", data_files=files).items()}
    if "validation" in data:
        data["validation"] = data["validation"].select(range(min(data_args.max_eval_chats, len(data["validation"]))))

    tokenizer = AutoTokenizer.from_pretrained(data_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(data_args.model_name_or_path)
    trainer = sam_trainer(SFTTrainer)(model=model, args=sft_args, train_dataset=data["train"],
                                      eval_dataset=data.get("validation"), processing_class=tokenizer, sam=sam_args)
    trainer.train()
    trainer.save_model()  # the model and its tokenizer, into output_dir
    if "validation" in data:
        print({name: round(value, 4) for name, value in trainer.evaluate().items()})


if __name__ == "__main__":
    main()
