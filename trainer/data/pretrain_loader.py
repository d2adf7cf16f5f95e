"""The pretraining loader: [B, T+1] windows of a token stream, sharded over ranks, resumable exactly.

Windows. The split's flat stream is cut into `num_windows = (num_tokens - 1) // T` windows;
window i covers tokens [i*T, i*T + T + 1). Windows overlap by one token (stride T), so the
last token of one window is the first input of the next and every token is predicted once.
A window's inputs are its first T tokens, its labels the last T (the next tokens).

Epochs and ranks. The order, rank sharding, position and state are `StatefulSampler`'s
(trainer/data/sampler.py) with windows as its units: epoch e visits the windows in
`permutation(num_windows)` from `numpy.random.default_rng([seed, e])`; each step consumes the
next `B * world_size` of them and rank r takes every `world_size`-th from r. The
`num_windows % (B * world_size)` windows left at the end of an epoch are not used in that
epoch (they are in others, being shuffled). By default (`infinite=True`) iteration never
ends and the trainer counts steps; `infinite=False` stops at the end of the current epoch.
`shuffle=False` visits windows in stream order in every epoch.

Validation. `PretrainLoader(val_shards, ..., shuffle=False, validation=True)` evaluates every
window of the split exactly once, the same number of batches on every rank: the last batch
is padded with filler windows whose labels are all IGNORE_INDEX, so they add no target.

Document boundaries. `position_ids` restart at 0 at every document start inside a window
(the document cut by the window's left edge counts from 0 at the edge); `document_ids`
number the documents of a window 0, 1, 2, ... A label crossing a boundary (the input is a
document's EOS, the label the next document's BOS) is kept: it is always predictable and
masks would need a pad value for no gain.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trainer.data.sampler import SampledLoader, StatefulSampler, mask_filler
from trainer.data.token_shards import TokenShards


class PretrainLoader(SampledLoader):
    """Batches of `input_ids`, `labels`, `position_ids`, `document_ids` (LongTensors of shape (B, T))."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, infinite: bool = True, validation: bool = False):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        self.shards = shards
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle, self.infinite = rank, world_size, shuffle, infinite
        self.validation = validation
        self.num_windows = max(0, (shards.num_tokens - 1) // seq_len)
        self.global_batch = batch_size * world_size
        self.sampler = StatefulSampler(
            self.num_windows, batch_size, seed=seed, rank=rank, world_size=world_size, shuffle=shuffle,
            infinite=infinite, validation=validation, name="loader",
            identity={"seq_len": seq_len, "num_tokens": shards.num_tokens, "tokenizer_hash": shards.tokenizer_hash})
        self.sampler.require_units(f"{shards.folder}: {shards.num_tokens} tokens make {self.num_windows} windows of "
                                   f"{seq_len + 1} tokens", "lower batch_size/seq_len or add data")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch `epoch` visits them (identical on every rank)."""
        return self.sampler.epoch_order(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for windows, real in self.sampler:
            yield mask_filler(self.make_batch(windows), real)

    def make_batch(self, windows: Sequence[int]) -> dict[str, torch.Tensor]:
        """The batch for the given window indices."""
        T = self.seq_len
        tokens = np.stack([self.shards.read(int(w) * T, int(w) * T + T + 1) for w in windows])  # (B, T+1)
        starts = np.asarray(windows, dtype=np.int64)[:, None] * T
        positions = starts + np.arange(T)  # (B, T) stream offsets of the inputs
        doc = self.shards.document_of(positions)
        doc_start = np.maximum(self.shards.doc_starts[doc], starts)
        return {
            "input_ids": torch.from_numpy(tokens[:, :-1].copy()),
            "labels": torch.from_numpy(tokens[:, 1:].copy()),
            "position_ids": torch.from_numpy(positions - doc_start),
            "document_ids": torch.from_numpy(doc - doc[:, :1]),
        }

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly (the same on every rank); batch_size and world_size
        may differ on resume: the rest of the epoch's order is then split with the new layout."""
        return {**super().state_dict(), "num_windows": self.num_windows}
