"""Examples to tensors: the seeded stream of micro-batches (with a position to resume from) and collation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import torch

from worker.data import IGNORE_INDEX, Example, Ints

MEGABATCH_MULT = 50  # batches per megabatch in length grouping (transformers' LengthGroupedSampler)


class _BatchKeys(TypedDict):
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None  # None for packed blocks: the model masks by ``position_ids``


class Batch(_BatchKeys, total=False):
    """A collated micro-batch, as keyword arguments of ``CausalLMLoss`` (``collate``)."""

    position_ids: torch.Tensor  # packed blocks only


def length_grouped_order(order: list[int], lengths: Ints, batch_size: int) -> list[int]:
    """A shuffled ``order`` regrouped so that each batch holds examples of similar length, as transformers'
    ``LengthGroupedSampler`` does: cut into megabatches of up to 50 batches, sort each by length (longest
    first), and move the longest example of all to the front, so a batch that does not fit in memory fails
    at the first step rather than hours in. The shuffle keeps the epochs different; sorting only within a
    megabatch keeps each batch a random draw of the data in all but its length."""
    mult = max(1, min(len(order) // (batch_size * 4), MEGABATCH_MULT))
    size = mult * batch_size
    megabatches = [sorted(order[i : i + size], key=lambda k: -int(lengths[k])) for i in range(0, len(order), size)]
    longest = max(range(len(megabatches)), key=lambda m: int(lengths[megabatches[m][0]]))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for megabatch in megabatches for i in megabatch]


class BatchStream:
    """An endless stream of micro-batches: each epoch a fresh permutation from one seeded generator, so the
    order depends on the seed alone (not on global RNG use elsewhere). The last short batch of an epoch is
    kept: small datasets would otherwise lose rows. ``position`` (micro-batches handed out) is all a
    checkpoint needs: ``skip(position)`` replays the permutations to the same place. With ``lengths`` (the
    examples' token counts) each permutation is length-grouped (``length_grouped_order``): less padding."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, lengths: Ints | None = None) -> None:
        self.examples, self.batch_size, self.lengths = examples, batch_size, lengths
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0
        self.epochs_done = 0  # full passes handed out
        self._order: list[int] = []
        self._next = 0

    def __next__(self) -> list[Example]:
        return [self.examples[i] for i in self._take()]

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._take()

    def _take(self) -> list[int]:
        if not self._order:
            self._order = torch.randperm(len(self.examples), generator=self.generator).tolist()
            if self.lengths is not None:
                self._order = length_grouped_order(self._order, self.lengths, self.batch_size)
            self._next = 0
        chunk = self._order[self._next : self._next + self.batch_size]
        self._next += self.batch_size
        self.position += 1
        if self._next >= len(self._order):  # this batch ends the pass: count it now, not on the next take
            self.epochs_done += 1
            self._order, self._next = [], 0
        return chunk


def collate(batch: list[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-padded tensors; padding has attention 0 and label IGNORE_INDEX. Packed blocks: ``collate_packed``."""
    if any(ex.segments is not None for ex in batch):
        return collate_packed(batch, pad_id, device)
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = as_tensor(ex.input_ids)
        labels[row, :n] = as_tensor(ex.labels)
        attention_mask[row, :n] = 1
    return {
        "input_ids": to_device(input_ids, device),
        "labels": to_device(labels, device),
        "attention_mask": to_device(attention_mask, device),
    }


def collate_packed(batch: list[Example], pad_id: int, device: torch.device) -> Batch:
    """Packed blocks as transformers' flattening convention (``DataCollatorWithFlattening``) has them:
    ``position_ids`` restart at 0 at each example and ``attention_mask`` is None, from which the model builds
    a block-diagonal causal mask (eager and sdpa: a 4-D mask; flash-attention: cu_seqlens), so no token
    attends across examples. A row's padding tail is one more segment (its own positions from 0) that no real
    token attends to; its labels are IGNORE_INDEX. The first token of every segment is no target."""
    width = max(len(ex.input_ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        input_ids[row, :n] = as_tensor(ex.input_ids)
        labels[row, :n] = as_tensor(ex.labels)
        start = 0
        for length in [*(ex.segments if ex.segments is not None else [n]), width - n]:
            if length:
                position_ids[row, start : start + length] = torch.arange(length)
                labels[row, start] = IGNORE_INDEX
            start += length
    return {
        "input_ids": to_device(input_ids, device),
        "labels": to_device(labels, device),
        "position_ids": to_device(position_ids, device),
        "attention_mask": None,
    }


def as_tensor(values: Ints) -> torch.Tensor:
    """A row's tokens as int64, from a list or from a (read-only, memory-mapped) int32 numpy view."""
    return torch.from_numpy(np.asarray(values, dtype=np.int64))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To a GPU from pinned host memory without blocking the host (the copy overlaps the queued kernels)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def batch_tokens(batch: list[Example]) -> int:
    """Real (non-padding) tokens of a micro-batch."""
    return sum(len(ex.input_ids) for ex in batch)


def trainable_tokens(batch: Batch) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # position 0 is never a target
