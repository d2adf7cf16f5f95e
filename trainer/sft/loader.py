"""Batches of SFT examples: packed (many per row, no attention across them) or padded; rank-sharded, resumable.

Rows. Order, rank sharding, position and state are `StatefulSampler`'s (trainer/data/sampler.py)
with rows as its units: an epoch visits the examples in `permutation(n)` from
`numpy.random.default_rng([seed, epoch])` (stream order with `shuffle=False`). Packed: examples
are placed first-fit into rows of `seq_len` tokens in that order (a bounded set of open rows
keeps it linear-time); padded: one example per row. Each step consumes `batch_size * world_size`
rows; rank r takes every `world_size`-th starting at r. Rows left over at an epoch's end are not
used in it.

Validation. `SFTLoader(val_examples, ..., shuffle=False, validation=True)` is one pass that
evaluates every example exactly once, the same number of batches on every rank: the last
batch is padded with filler rows whose labels are all IGNORE_INDEX, so the loss and its token
count see exactly the examples' assistant tokens.

Batches. Packed rows are `seq_len` long; every example restarts `position_ids` at 0 and
has its own `document_ids` run, so the model's packed path keeps examples apart; the tail
padding is one more run whose labels are ignored. Padded rows are right-padded to the
longest row of the batch and carry no position/document ids (plain causal attention: a
real token never looks at the padding after it).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trainer.data.sampler import SampledLoader, StatefulSampler, mask_filler
from trainer.objectives import IGNORE_INDEX
from trainer.sft.data import Example

_OPEN_ROWS = 64  # rows still accepting examples while packing; more gains little fill, costs time


def fingerprint(examples: Sequence[Example]) -> str:
    """A short hash of the tokenized data, so a resumed run refuses different data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.input_ids.tobytes())
        h.update(ex.labels.tobytes())
    return h.hexdigest()[:16]


def pack_rows(lengths: Sequence[int], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Example indices per row: first-fit in `order` into rows of capacity `seq_len`."""
    rows: list[list[int]] = []
    free: list[int] = []  # remaining capacity of the open rows
    open_ids: list[int] = []  # which row each open slot is
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len {seq_len}")
        slot = next((s for s, cap in enumerate(free) if cap >= n), None)
        if slot is None:
            if len(open_ids) >= _OPEN_ROWS:
                fullest = int(np.argmin(free))
                del free[fullest], open_ids[fullest]
            rows.append([])
            open_ids.append(len(rows) - 1)
            free.append(seq_len)
            slot = len(free) - 1
        rows[open_ids[slot]].append(int(i))
        free[slot] -= n
    return rows


def collate_packed(examples: Sequence[Sequence[Example]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of packed examples -> (B, seq_len) input_ids, labels, position_ids, document_ids."""
    B = len(examples)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((B, seq_len), dtype=np.int64)
    document_ids = np.zeros((B, seq_len), dtype=np.int64)
    for b, row in enumerate(examples):
        at = 0
        for d, ex in enumerate(row):
            n = len(ex)
            input_ids[b, at:at + n] = ex.input_ids
            labels[b, at:at + n] = ex.labels
            position_ids[b, at:at + n] = np.arange(n)
            document_ids[b, at:at + n] = d
            at += n
        position_ids[b, at:] = np.arange(seq_len - at)
        document_ids[b, at:] = len(row)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(position_ids), "document_ids": torch.from_numpy(document_ids)}


def collate_padded(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the batch's longest (rounded up to a multiple)."""
    longest = max(len(ex) for ex in examples)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(examples), T), pad_id, dtype=np.int64)
    labels = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for b, ex in enumerate(examples):
        input_ids[b, :len(ex)] = ex.input_ids
        labels[b, :len(ex)] = ex.labels
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


class SFTLoader(SampledLoader):
    """Infinite (or one-epoch, or one validation pass) iterator of SFT batches, resumable exactly."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, pad_id: int, *,
                 packing: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 infinite: bool = True, validation: bool = False):
        if not examples:
            raise ValueError("no SFT examples to load")
        self.examples = list(examples)
        self.lengths = [len(ex) for ex in self.examples]
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.packing, self.seed, self.shuffle, self.infinite = packing, seed, shuffle, infinite
        self.rank, self.world_size, self.validation = rank, world_size, validation
        self.global_batch = batch_size * world_size
        self.fingerprint = fingerprint(self.examples)
        self.sampler = StatefulSampler(
            len(self.examples), batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
            infinite=infinite, validation=validation, group=self._rows, name="SFT loader",
            identity={"seq_len": seq_len, "packing": packing, "num_examples": len(self.examples),
                      "fingerprint": self.fingerprint})
        self.sampler.require_units(f"{len(self.examples)} examples make {len(self.epoch_rows(0))} rows",
                                   "lower the batch size or add data")

    def _rows(self, order: np.ndarray) -> list[list[int]]:
        return pack_rows(self.lengths, order, self.seq_len) if self.packing else [[int(i)] for i in order]

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Example indices of every row of `epoch` (identical on every rank)."""
        return self.sampler.epoch_units(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for rows, real in self.sampler:
            yield mask_filler(self.make_batch(rows), real)

    def make_batch(self, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return collate_packed([[self.examples[i] for i in row] for row in rows], self.seq_len, self.pad_id)
        return collate_padded([self.examples[row[0]] for row in rows], self.pad_id)
