"""Token ids of rows, and the padded batches a model trains and evaluates on. A row's label
is one integer (classification) or a list of per-token targets (a causal LM's: IGNORE where
no token is predicted), padded with IGNORE."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

IGNORE = -100  # a per-token target that is not scored (torch's cross_entropy ignore_index)


@dataclass(frozen=True)
class EncodedSet:
    """Token ids (unpadded, truncated, with special tokens) and labels of a dataset."""

    input_ids: list[list[int]]
    labels: list  # per row: an int, or a list of per-token targets as long as its input ids

    def select(self, index: Sequence[int]) -> EncodedSet:
        """The rows at `index`, in that order."""
        return EncodedSet([self.input_ids[i] for i in index], [self.labels[i] for i in index])


def encode(rows, tokenizer, max_length: int) -> EncodedSet:
    """Token ids of every row, truncated to `max_length`; padding happens per batch.
    `rows`: TextRows or a datasets.Dataset (anything whose columns slice to lists)."""
    if len(rows) == 0:
        return EncodedSet([], [])
    ids = tokenizer(rows["text"][:], truncation=True, max_length=max_length)["input_ids"]
    return EncodedSet([list(row) for row in ids], [int(label) for label in rows["label"][:]])


def _pad(rows: list[list[int]], labels: list[int], pad_token_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """One batch, padded to its longest row rounded up to a multiple of `multiple`."""
    length = -(-max(len(row) for row in rows) // multiple) * multiple
    if labels and isinstance(labels[0], list):
        labels = [row + [IGNORE] * (length - len(row)) for row in labels]
    return {
        "input_ids": torch.tensor([row + [pad_token_id] * (length - len(row)) for row in rows], dtype=torch.long),
        "attention_mask": torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows], dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


# Rows are grouped by length within windows of this many batches (as Hugging Face
# Trainer's group_by_length does): batches stay random, padding mostly goes.
GROUP_WINDOW_BATCHES = 50


def _epoch_order(encoded: EncodedSet, batch_size: int, shuffle: bool, group_by_length: bool,
                 rng: random.Random) -> list[int]:
    """Row order of one epoch. Grouped by length: without shuffle, longest first; with
    shuffle, sorted within shuffled windows whose batches are then shuffled."""
    order = list(range(len(encoded.labels)))
    length = lambda i: len(encoded.input_ids[i])  # noqa: E731
    if shuffle:
        rng.shuffle(order)
    if not group_by_length:
        return order
    if not shuffle:
        return sorted(order, key=length, reverse=True)
    window = batch_size * GROUP_WINDOW_BATCHES
    grouped = [i for s in range(0, len(order), window) for i in sorted(order[s:s + window], key=length, reverse=True)]
    batches = [grouped[s:s + batch_size] for s in range(0, len(grouped), batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def iterate_batches(
    encoded: EncodedSet, batch_size: int, pad_token_id: int, *, shuffle: bool, seed: int = 0,
    num_batches: int | None = None, group_by_length: bool = False, length_multiple: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of input_ids, attention_mask and labels, each padded to its longest row
    (rounded up to a multiple of `length_multiple`): one pass over the data, or exactly
    `num_batches` cycling over reshuffled epochs. `group_by_length` puts rows of similar
    length together, so less compute goes to padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(encoded.labels)
    if n == 0:
        return
    produced, epoch = 0, 0
    while num_batches is None or produced < num_batches:
        order = _epoch_order(encoded, batch_size, shuffle, group_by_length, random.Random(seed + epoch))
        for start in range(0, n, batch_size):
            if num_batches is not None and produced == num_batches:
                return
            index = order[start : start + batch_size]
            yield _pad([encoded.input_ids[i] for i in index], [encoded.labels[i] for i in index], pad_token_id,
                       length_multiple)
            produced += 1
        epoch += 1
        if num_batches is None:
            return
