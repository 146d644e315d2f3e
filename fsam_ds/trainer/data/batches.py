"""A normalised split as batches: tokenized with `Dataset.map`, padded per batch, sharded across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from datasets import ClassLabel, Dataset, Value
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fsam_ds.trainer.data.checks import LABEL, TEXT_A, TEXT_B, DataError, quoted

if TYPE_CHECKING:
    from fsam_ds.trainer.run_config import TrainConfig


def tokenize(dataset: Dataset, tokenizer: Any, *, max_length: int = 128) -> Dataset:
    """Token ids of each example (a pair when the split has `text_b`), truncated to `max_length`.

    Returns a torch-formatted Dataset with `input_ids`, `attention_mask`, `token_type_ids` when
    the tokenizer produces them, and `labels` (int64 classes or float32 scores) when the split has
    labels (`prediction_split`'s have none). Not padded.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise DataError(f"max_length = {max_length!r} must be an integer >= 1.")
    if TEXT_A not in dataset.column_names:
        raise DataError(f"tokenize expects a split from load_task_splits or prediction_split (columns "
                        f"{TEXT_A!r}, [{TEXT_B!r}], [{LABEL!r}]); {TEXT_A!r} is missing from "
                        f"{quoted(dataset.column_names)}.")
    pair = TEXT_B in dataset.column_names
    labelled = LABEL in dataset.column_names

    def encode(batch: dict[str, list]) -> dict[str, list]:
        # the tokenizer returns the inputs its model takes (its model_input_names), token types or not
        enc = tokenizer(batch[TEXT_A], batch[TEXT_B] if pair else None, truncation=True, max_length=max_length)
        return {**enc, "labels": batch[LABEL]} if labelled else dict(enc)

    tokenized = dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="tokenizing")
    if labelled:
        regression = not isinstance(dataset.features[LABEL], ClassLabel)
        tokenized = tokenized.cast_column("labels", Value("float32" if regression else "int64"))
    return tokenized.with_format("torch")


def padding_collator(tokenizer: Any, *, pad_to_multiple_of: int | None = None) -> Callable[[list], dict]:
    """transformers' DataCollatorWithPadding: each batch padded to its own longest sequence (optionally
    rounded up to a multiple) with the tokenizer's pad token, token type and padding side; labels keep
    their dtype (int64 classes, float32 scores)."""
    from transformers import DataCollatorWithPadding

    if tokenizer.pad_token_id is None:
        raise DataError(f"{type(tokenizer).__name__} has no pad token, so batches cannot be padded; set "
                        "tokenizer.pad_token (e.g. to its eos token) before building the collator.")
    return DataCollatorWithPadding(tokenizer, padding="longest", pad_to_multiple_of=pad_to_multiple_of,
                                   return_tensors="pt")


class ShardSampler(Sampler[int]):
    """Rank r's evaluation shard: indices r, r + world_size, ... in order.

    The shards are disjoint and together hold every index once. With `even` (the default) each
    shard is padded, by repeating its first index, to ceil(n / world_size) so that every rank runs
    the same number of forward passes (ZeRO-3 gathers weights collectively inside each one); the
    trainer keeps only the first `num_real` predictions of its shard.
    """

    def __init__(self, length: int, *, rank: int, world_size: int, even: bool = True) -> None:
        _check_rank(rank, world_size)
        self.indices = list(range(rank, length, world_size))
        self.num_real = len(self.indices)
        if even and length:
            target = -(-length // world_size)
            self.indices += [self.indices[0] if self.indices else 0] * (target - self.num_real)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _check_rank(rank: int, world_size: int) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size = {world_size!r} must be an integer >= 1.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank!r} must be an integer in [0, world_size) = [0, {world_size}).")


def build_dataloader(dataset: Any, collate_fn: Callable[[list], Any], *, batch_size: int, train: bool, seed: int = 0,
                     rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
    """A loader over this rank's shard of `dataset` (`batch_size` is per rank).

    train=True: a seeded shuffle, the same permutation on every rank, cut into disjoint equal
    shards; call `set_epoch(loader, epoch)` before each epoch to reshuffle. When len(dataset) is
    not a multiple of world_size the last (< world_size) examples of each epoch's permutation are
    left out rather than repeated, so no example is seen twice in an epoch.
    train=False: the examples in order, in `ShardSampler` shards (see there for `num_real`).
    """
    _check_rank(rank, world_size)
    sampler: Sampler[int]
    if train:
        if len(dataset) < world_size:
            raise DataError(f"{len(dataset)} training example(s) cannot fill {world_size} ranks; use more data "
                            "or fewer processes.")
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                     drop_last=True)
    else:
        sampler = ShardSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=num_workers)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseeds the training shuffle for `epoch` (a no-op for evaluation loaders)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


# ------------------------------------------------------------------------------------ the run's data

@dataclass
class Data:
    train: DataLoader
    dev: dict[str, DataLoader]
    steps_per_epoch: int


def build_data(cfg: TrainConfig, tokens: dict[str, Dataset], collate: Callable[[list], Any], train_split: str,
               rank: int, world: int) -> Data:
    """The run's loaders over an objective's tokenized splits (`Objective.prepare_splits`): the training split
    shuffled and sharded, each other split in order."""
    d = cfg.data
    common = {"rank": rank, "world_size": world, "num_workers": d.num_workers, "seed": cfg.seed}
    train = build_dataloader(tokens[train_split], collate, batch_size=d.micro_batch_size, train=True, **common)
    dev = {s: build_dataloader(tokens[s], collate, batch_size=d.eval_batch_size, train=False, **common)
           for s in tokens if s != train_split}
    for loader in (train, *dev.values()):
        # creating an iterator draws a seed; from its own generator it leaves the global one (dropout,
        # restored on resume) alone
        loader.generator = torch.Generator().manual_seed(cfg.seed)
    steps = len(train) // d.grad_accum
    if steps == 0:
        n = len(tokens[train_split])
        raise DataError(f"{n} training examples give each of the {world} process(es) {len(train)} micro-batch(es) "
                        f"of at most {d.micro_batch_size}, fewer than data.grad_accum = {d.grad_accum}, so not "
                        "one step fits in an epoch. Use more data, a smaller data.micro_batch_size or "
                        "data.grad_accum, or fewer processes.")
    return Data(train, dev, steps)
