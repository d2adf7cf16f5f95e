"""Batches of preference pairs for one concatenated forward: rows [chosen_1..chosen_B, rejected_1..rejected_B].

Each row is prompt + response, right-padded to the batch's longest; `labels` are next-token
targets (already shifted) on response tokens only, so a row's summed log-probability over
its labels is log p(response | prompt). Right padding needs no attention mask: real tokens
never look at the padding after them.

Training epochs visit pairs in `permutation(n)` from `numpy.random.default_rng([seed, epoch])`;
each step consumes `batch_size * world_size` pairs and rank r takes every `world_size`-th
from r, so all ranks run the same number of forwards (ZeRO-3 needs that). Validation
(`PairBatches`) visits every pair exactly once, padding the last batches with masked repeats.
With a reference table (precomputed log-probs, (n, 2)), batches carry `ref_chosen_logps`
and `ref_rejected_logps`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trainer.dpo.data import TokenPair
from trainer.objectives import IGNORE_INDEX

_MUST_MATCH = ("seed", "shuffle", "num_pairs", "fingerprint")


def fingerprint(pairs: Sequence[TokenPair]) -> str:
    """A short hash of the tokenized pairs: a resumed run refuses different data, a cache different inputs."""
    h = hashlib.sha256()
    for p in pairs:
        for part in (p.prompt, p.chosen, p.rejected):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part.tobytes())
    return h.hexdigest()[:16]


def collate_pairs(pairs: Sequence[TokenPair], pad_id: int, pad_to_multiple_of: int = 8,
                  ref_logps: torch.Tensor | None = None, indices: Sequence[int] | None = None,
                  pair_mask: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """(2B, T) input_ids/labels for B pairs, chosen rows first; `pair_mask` (B,) marks real pairs."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    longest = max(len(prompt) + len(resp) - 1 for prompt, resp in rows)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    labels = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    for b, (prompt, resp) in enumerate(rows):
        seq = np.concatenate([prompt, resp])
        n = len(seq) - 1  # the last token is only a target
        input_ids[b, :n] = seq[:-1]
        labels[b, len(prompt) - 1:n] = resp
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "pair_mask": torch.tensor(pair_mask if pair_mask is not None else [1.0] * len(pairs))}
    if ref_logps is not None:
        picked = ref_logps[torch.as_tensor(list(indices), dtype=torch.long)]  # (B, 2)
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = picked[:, 0].clone(), picked[:, 1].clone()
    return batch


def _check_table(ref_logps: torch.Tensor | None, n: int) -> None:
    if ref_logps is not None and tuple(ref_logps.shape) != (n, 2):
        raise ValueError(f"reference log-prob table has shape {tuple(ref_logps.shape)}, expected ({n}, 2)")


class PairLoader:
    """Infinite iterator of training batches with `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, pairs: Sequence[TokenPair], batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, ref_logps: torch.Tensor | None = None,
                 pad_to_multiple_of: int = 8):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.pairs = list(pairs)
        self.global_batch = batch_size * world_size
        if len(self.pairs) < self.global_batch:
            raise ValueError(f"{len(self.pairs)} preference pairs are fewer than one global batch ({batch_size} x "
                             f"{world_size} rank(s)); lower train.micro_batch_size or add data")
        _check_table(ref_logps, len(self.pairs))
        self.batch_size, self.pad_id, self.pad_to_multiple_of = batch_size, pad_id, pad_to_multiple_of
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.ref_logps = ref_logps
        self.fingerprint = fingerprint(self.pairs)
        self.epoch, self.cursor = 0, 0  # cursor: pairs consumed in this epoch by all ranks together

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.pairs)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.epoch_order(self.epoch)
        while True:
            if self.cursor + self.global_batch > len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
                order = self.epoch_order(self.epoch)
                continue
            mine = order[self.cursor:self.cursor + self.global_batch][self.rank::self.world_size].tolist()
            self.cursor += self.global_batch
            yield collate_pairs([self.pairs[i] for i in mine], self.pad_id, self.pad_to_multiple_of,
                                self.ref_logps, mine)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle,
                "num_pairs": len(self.pairs), "fingerprint": self.fingerprint, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in ("epoch", "cursor", *_MUST_MATCH) if k not in state]
        if missing:
            raise ValueError(f"preference loader state lacks key(s) {', '.join(missing)}")
        mine = self.state_dict()
        for key in _MUST_MATCH:
            if state[key] != mine[key]:
                raise ValueError(f"preference loader state does not match this data: {key} is {state[key]!r} in the "
                                 f"saved state but {mine[key]!r} now")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


class PairBatches:
    """Every pair once, rank-sharded (pair i on rank i % world_size), the same number of batches on every rank."""

    def __init__(self, pairs: Sequence[TokenPair], batch_size: int, pad_id: int, *, rank: int = 0,
                 world_size: int = 1, ref_logps: torch.Tensor | None = None, pad_to_multiple_of: int = 8):
        _check_table(ref_logps, len(pairs))
        self.pairs, self.batch_size, self.pad_id = list(pairs), batch_size, pad_id
        self.rank, self.world_size, self.ref_logps = rank, world_size, ref_logps
        self.pad_to_multiple_of = pad_to_multiple_of
        per_rank = -(-len(self.pairs) // world_size)
        self.num_batches = -(-per_rank // batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        mine = list(range(self.rank, len(self.pairs), self.world_size))
        for b in range(self.num_batches):
            chunk = mine[b * self.batch_size:(b + 1) * self.batch_size]
            mask = [1.0] * len(chunk) + [0.0] * (self.batch_size - len(chunk))
            chunk = chunk + [chunk[0] if chunk else 0] * (self.batch_size - len(chunk))
            yield collate_pairs([self.pairs[i] for i in chunk], self.pad_id, self.pad_to_multiple_of,
                                self.ref_logps, chunk, mask)

