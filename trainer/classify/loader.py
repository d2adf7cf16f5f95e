"""Batches of classification examples: one text per row, right-padded; rank-sharded, resumable.

Order, rank sharding, position and state are `StatefulSampler`'s (trainer/data/sampler.py) with
examples as its units, as in the SFT loader's padded mode: epoch e visits the examples in
`permutation(n)` from `numpy.random.default_rng([seed, e])` (index order with `shuffle=False`),
each step consumes `batch_size * world_size` of them and rank r takes every `world_size`-th from
r. Examples left over at an epoch's end are not used in it.

Validation. `ClassifyLoader(val_examples, ..., shuffle=False, validation=True)` is one pass that
sees every example exactly once across ranks, the same number of batches on every rank: the
last batch is filled up with repeats whose `example_mask` is 0 and whose label is IGNORE_INDEX,
so they count in no loss, normalizer or metric.

Batch:
  input_ids       (B, T) int64    right-padded with `pad_id`; T = the longest row rounded up to
                                  a multiple of `pad_to_multiple_of`
  attention_mask  (B, T) int64    1 on real tokens; the last 1 of a row is its EOS, where the
                                  classifier pools
  labels          (B,)   int64    class ids (IGNORE_INDEX on filler rows)
  example_mask    (B,)   float32  1.0 for real examples, 0.0 for filler rows
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trainer.classify.data import ClassExample
from trainer.data.sampler import SampledLoader, StatefulSampler, mask_filler


def fingerprint(examples: Sequence[ClassExample]) -> str:
    """A short hash of the tokens and labels, so a resumed run refuses different data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.input_ids.tobytes())
        h.update(int(ex.label).to_bytes(8, "little", signed=True))
    return h.hexdigest()[:16]


def collate_classify(examples: Sequence[ClassExample], pad_id: int,
                     pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """One example per row, right-padded to the batch's longest (rounded up to a multiple); every row real."""
    longest = max(len(ex) for ex in examples)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    B = len(examples)
    input_ids = np.full((B, T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((B, T), dtype=np.int64)
    for b, ex in enumerate(examples):
        input_ids[b, :len(ex)] = ex.input_ids
        attention_mask[b, :len(ex)] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.tensor([ex.label for ex in examples], dtype=torch.int64),
            "example_mask": torch.ones(B, dtype=torch.float32)}


class ClassifyLoader(SampledLoader):
    """Infinite (or one-epoch, or one validation pass) iterator of classification batches, resumable exactly."""

    def __init__(self, examples: Sequence[ClassExample], batch_size: int, pad_id: int, *,
                 pad_to_multiple_of: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, infinite: bool = True, validation: bool = False):
        if not examples:
            raise ValueError("no classification examples to load")
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.examples = list(examples)
        self.batch_size, self.pad_id, self.pad_to_multiple_of = batch_size, pad_id, pad_to_multiple_of
        self.seed, self.shuffle, self.infinite = seed, shuffle, infinite
        self.rank, self.world_size, self.validation = rank, world_size, validation
        self.global_batch = batch_size * world_size
        self.fingerprint = fingerprint(self.examples)
        self.sampler = StatefulSampler(
            len(self.examples), batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
            infinite=infinite, validation=validation, name="classification loader",
            identity={"num_examples": len(self.examples), "fingerprint": self.fingerprint})
        self.sampler.require_units(f"{len(self.examples)} examples", "lower the batch size or add data")

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for indices, real in self.sampler:
            batch = self.make_batch(indices)
            batch["example_mask"][real:] = 0.0
            yield mask_filler(batch, real)

    def make_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        return collate_classify([self.examples[i] for i in indices], self.pad_id, self.pad_to_multiple_of)
