"""Your own `accelerate` training loop with the SAM family under DeepSpeed: prepare as usual, then
`sam_engine.train_step` replaces `accelerator.backward` + `optimizer.step` for each optimizer step.

    python examples/accelerate_loop_sam.py --output_dir out                     # tiny BERT, CPU, offline
    accelerate launch --use_deepspeed --num_processes 8 examples/accelerate_loop_sam.py --output_dir out \
        --model_name_or_path bert-base-uncased --zero_stage 3 --sam_type fisher-sam

The data is a synthetic in-memory task (sequences of random tokens; the label is the first token modulo
the number of classes), so the script runs anywhere; put your own DataLoader in its place.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from torch.utils.data import DataLoader
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                          get_linear_schedule_with_warmup)

from fsam_ds.hf import SAMConfig, accumulation_windows, sam_engine_from_accelerator
from fsam_ds.zero.distributed import default_to_one_process

CLASSES = 3
VOCAB = 97


def examples(count: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                     "labels": ids[0] % CLASSES})
    return rows


def per_example_loss(model, batch) -> torch.Tensor:
    """One loss per example (reduction='none'): the SAM step averages them over the global batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--model_name_or_path", default=None, help="none: a tiny BERT built from a config")
    parser.add_argument("--zero_stage", type=int, default=2)
    parser.add_argument("--sam_type", default="fisher-sam")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per_device_batch_size", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    args = parser.parse_args()

    default_to_one_process()  # a plain `python` run; accelerate launch / torchrun set up their ranks
    ds_config = {"train_micro_batch_size_per_gpu": args.per_device_batch_size,
                 "gradient_accumulation_steps": args.gradient_accumulation_steps, "gradient_clipping": 1.0,
                 "zero_optimization": {"stage": args.zero_stage}, "zero_allow_untested_optimizer": True}
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))
    torch.manual_seed(0)
    if args.model_name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path, num_labels=CLASSES)
    else:
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, num_labels=CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    train = DataLoader(examples(96, 16, seed=1), batch_size=args.per_device_batch_size, shuffle=True)
    dev = DataLoader(examples(32, 16, seed=2), batch_size=args.per_device_batch_size)
    steps_per_epoch = -(-len(train) // accelerator.num_processes // args.gradient_accumulation_steps)
    # accelerate steps a prepared scheduler once per process and step: sized for steps x processes
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, args.epochs * steps_per_epoch * accelerator.num_processes)
    model, optimizer, train, dev, scheduler = accelerator.prepare(model, optimizer, train, dev, scheduler)

    sam_engine = sam_engine_from_accelerator(accelerator, model, SAMConfig(sam_type=args.sam_type, rho=args.rho))
    for epoch in range(args.epochs):
        for window in accumulation_windows(train, args.gradient_accumulation_steps):
            out = sam_engine.train_step(window, per_example_loss)  # both passes over the window, one update
            if not out.skipped:
                scheduler.step()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for batch in dev:
                predictions = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                hits = accelerator.gather_for_metrics(predictions.argmax(-1) == batch["labels"])
                correct, total = correct + int(hits.sum()), total + hits.numel()
        accelerator.print(f"epoch {epoch}: train loss {out.loss:.4f}, dev accuracy {correct / total:.4f}")

    # DeepSpeed's checkpoint, and beside it each rank's SAM state (Fisher mask shard, counters, generators)
    folder = os.path.join(args.output_dir, "checkpoint")
    accelerator.save_state(folder)
    sam_engine.save_sam_state(folder)
    accelerator.print(f"saved {folder}")


if __name__ == "__main__":
    main()
