"""The stateful pretraining sampler: [B, T+1] windows of a token stream, sharded over ranks, resumable exactly.

Windows. The split's flat stream is cut into `num_windows = (num_tokens - 1) // T` windows;
window i covers tokens [i*T, i*T + T + 1). Windows overlap by one token (stride T), so the
last token of one window is the first input of the next and every token is predicted once.
A window's inputs are its first T tokens, its labels the last T (the next tokens).

Epochs and ranks. Epoch e visits the windows in the order `permutation(num_windows)` drawn
from `numpy.random.default_rng([seed, e])`. Each step consumes the next `B * world_size`
windows of that order; rank r takes every `world_size`-th of them starting at r, so ranks
are disjoint and together cover the step. The `num_windows % (B * world_size)` windows left
at the end of an epoch are not used in that epoch (they are in others, being shuffled).

Iteration. By default (`infinite=True`) iteration never ends: after the last batch of an
epoch the next epoch starts with its own permutation, and the trainer counts steps. The
position is (epoch, cursor = windows consumed in the epoch by all ranks together), kept on
the loader itself: `state_dict()` after receiving k batches resumes at batch k+1, and a
new `iter()` continues where the last one stopped. With `infinite=False` iteration stops
at the end of the current epoch (the next `iter()` runs the next epoch).
`shuffle=False` visits windows in stream order in every epoch; a fresh
`PretrainLoader(val_shards, ..., shuffle=False, infinite=False)` is the validation pass:
deterministic, every window of the split at most once, to be cut at N batches with
`itertools.islice` when a full pass is not wanted.

Document boundaries. `position_ids` restart at 0 at every document start inside a window
(the document cut by the window's left edge counts from 0 at the edge); `document_ids`
number the documents of a window 0, 1, 2, ... A label crossing a boundary (the input is a
document's EOS, the label the next document's BOS) is kept: it is always predictable and
masks would need a pad value for no gain.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from trainer.data.token_shards import TokenShards

# State keys that must agree for a resumed stream to continue the interrupted one.
_MUST_MATCH = ("seed", "seq_len", "shuffle", "num_tokens", "tokenizer_hash")


class PretrainLoader:
    """Batches of `input_ids`, `labels`, `position_ids`, `document_ids` (LongTensors of shape (B, T))."""

    def __init__(self, shards: TokenShards, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, infinite: bool = True):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.shards = shards
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle, self.infinite = rank, world_size, shuffle, infinite
        self.num_windows = max(0, (shards.num_tokens - 1) // seq_len)
        self.global_batch = batch_size * world_size
        if self.num_windows < self.global_batch:
            raise ValueError(
                f"{shards.folder}: {shards.num_tokens} tokens make {self.num_windows} windows of {seq_len + 1} tokens, "
                f"fewer than one global batch ({batch_size} x {world_size} rank(s)); lower batch_size/seq_len or add data")
        self.epoch = 0
        self.cursor = 0  # windows consumed in this epoch by all ranks together
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per epoch for each rank."""
        return self.num_windows // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch `epoch` visits them (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_windows)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows))
        return self._order_cache[1]

    def _rank_windows(self, order: np.ndarray, cursor: int) -> np.ndarray:
        return order[cursor:cursor + self.global_batch][self.rank::self.world_size]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            # State is re-read every step, so load_state_dict() takes effect even on a live iterator.
            if self.cursor + self.global_batch > self.num_windows:
                self.epoch, self.cursor = self.epoch + 1, 0
                if not self.infinite:
                    return
            windows = self._rank_windows(self.epoch_order(self.epoch), self.cursor)
            self.cursor += self.global_batch
            yield self.make_batch(windows)

    def make_batch(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
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
        """Everything needed to continue the stream exactly (the same on every rank)."""
        return {
            "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "seq_len": self.seq_len,
            "shuffle": self.shuffle, "batch_size": self.batch_size, "world_size": self.world_size,
            "num_windows": self.num_windows, "num_tokens": self.shards.num_tokens,
            "tokenizer_hash": self.shards.tokenizer_hash,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. batch_size and world_size may differ from the saved run: the rest of the
        epoch's order is then split with the new layout (still no window twice)."""
        missing = [k for k in ("epoch", "cursor", *_MUST_MATCH) if k not in state]
        if missing:
            raise ValueError(f"loader state lacks key(s) {', '.join(missing)}")
        mine = self.state_dict()
        for key in _MUST_MATCH:
            if state[key] != mine[key]:
                raise ValueError(f"loader state does not match this data: {key} is {state[key]!r} in the saved "
                                 f"state but {mine[key]!r} now")
        if not 0 <= int(state["cursor"]) <= self.num_windows:
            raise ValueError(f"loader state cursor {state['cursor']} is outside 0..{self.num_windows}")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
