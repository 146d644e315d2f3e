"""Fine-tune a sequence classifier with the SAM family under Hugging Face's Trainer and DeepSpeed, in the
style of transformers' run_glue.py: the same script, `SAMTrainer` for `Trainer`, SAMConfig's fields on the
command line.

    python examples/run_glue_sam.py --output_dir out --model_name_or_path bert-base-uncased \
        --train_file train.csv --validation_file dev.csv --sam_type fisher-sam --rho 0.05 --num_train_epochs 3
    torchrun --nproc_per_node 8 examples/run_glue_sam.py ... --deepspeed ds_configs/zero3_bf16.json
    python examples/run_glue_sam.py ... --resume_from_checkpoint out/checkpoint-500   # or true: the newest

The CSV files have a `label` column (numbers or names) and a `sentence` column, or `sentence1` and
`sentence2` for pairs. Offline defaults, to try it on a CPU: without --model_name_or_path a tiny BERT is
built from a config, with a word-level vocabulary read off the training data; without --train_file a small
synthetic task (is "good" more frequent than "bad"?) is the data. --deepspeed defaults to
ds_configs/zero2_fp32.json.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, BertTokenizerFast, DataCollatorWithPadding,
                          HfArgumentParser, TrainingArguments)

from fsam_ds.hf import SAMArguments, SAMTrainer
from fsam_ds.zero.distributed import default_to_one_process

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2_fp32.json"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class DataArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "A model on the hub or a local folder; none: a tiny BERT built from a config"})
    train_file: str | None = field(default=None, metadata={"help": "CSV: label, sentence (or sentence1, sentence2)"})
    validation_file: str | None = field(default=None, metadata={"help": "CSV like train_file; evaluated at the end"})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated"})


def synthetic_task(rows: int, seed: int) -> Dataset:
    """Sentences of filler words with some "good" and "bad"; label 1 where "good" is more frequent."""
    rng = random.Random(seed)
    words = ["the", "movie", "plot", "actors", "was", "very", "quite", "and", "but"]
    sentences, labels = [], []
    for _ in range(rows):
        good, bad = rng.randint(0, 3), rng.randint(0, 3)
        tokens = rng.choices(words, k=6) + ["good"] * good + ["bad"] * bad
        rng.shuffle(tokens)
        sentences.append(" ".join(tokens))
        labels.append(int(good > bad))
    return Dataset.from_dict({"sentence": sentences, "label": labels})


def read_data(args: DataArguments, seed: int) -> DatasetDict:
    if args.train_file is None:
        return DatasetDict(train=synthetic_task(64, seed), validation=synthetic_task(32, seed + 1))
    files = {"train": args.train_file, **({"validation": args.validation_file} if args.validation_file else {})}
    return load_dataset("csv", data_files=files)


def word_tokenizer(texts: list[str], folder: Path) -> BertTokenizerFast:
    """A BERT tokenizer whose vocabulary is the words of `texts` (lower-cased): offline, for the tiny model."""
    words = sorted({w for text in texts for w in text.lower().split()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL_TOKENS + words) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def main() -> None:
    default_to_one_process()  # a plain `python` run; torchrun and the deepspeed launcher set up their ranks
    argv = sys.argv[1:]
    if not any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv):
        argv += ["--deepspeed", str(DEFAULT_DS_CONFIG)]
    parser = HfArgumentParser((DataArguments, TrainingArguments, SAMArguments))
    data_args, training_args, sam_args = parser.parse_args_into_dataclasses(argv)

    raw = read_data(data_args, training_args.seed)
    text_columns = ["sentence1", "sentence2"] if "sentence1" in raw["train"].column_names else ["sentence"]
    label_names = sorted(set(raw["train"]["label"]))
    label_ids = {name: i for i, name in enumerate(label_names)}

    if data_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(data_args.model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(data_args.model_name_or_path,
                                                                   num_labels=len(label_names))
    else:
        texts = [t for column in text_columns for t in raw["train"][column]]
        tokenizer = word_tokenizer(texts, Path(training_args.output_dir) / "tokenizer")
        model = BertForSequenceClassification(BertConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=data_args.max_seq_length, num_labels=len(label_names)))
    model.config.id2label = {i: str(name) for i, name in enumerate(label_names)}
    model.config.label2id = {str(name): i for i, name in enumerate(label_names)}

    def encode(batch: dict) -> dict:
        encoded = tokenizer(*(batch[c] for c in text_columns), truncation=True, max_length=data_args.max_seq_length)
        encoded["labels"] = [label_ids[label] for label in batch["label"]]
        return encoded

    data = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}

    trainer = SAMTrainer(model=model, args=training_args, train_dataset=data["train"],
                         eval_dataset=data.get("validation"), processing_class=tokenizer,
                         data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy, sam=sam_args)
    resume = training_args.resume_from_checkpoint
    result = trainer.train(resume_from_checkpoint=True if resume == "true" else resume)
    trainer.log_metrics("train", result.metrics)
    trainer.save_model()
    if "validation" in data:
        trainer.log_metrics("eval", trainer.evaluate())


if __name__ == "__main__":
    main()
