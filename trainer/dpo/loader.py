"""Batches of preference pairs for one concatenated forward: rows [chosen_1..chosen_B, rejected_1..rejected_B].

Each row is prompt + response, right-padded to the batch's longest; `labels` are next-token
targets (already shifted) on response tokens only, so a row's summed log-probability over
its labels is log p(response | prompt). Right padding needs no attention mask: real tokens
never look at the padding after them.

Order and rank sharding are `StatefulSampler`'s (trainer/data/sampler.py) with pairs as its
units: training epochs visit pairs in `permutation(n)` from `numpy.random.default_rng([seed, epoch])`;
each step consumes `batch_size * world_size` pairs and rank r takes every `world_size`-th
from r, so all ranks run the same number of forwards (ZeRO-3 needs that). Validation
(`PairBatches`) is the sampler's validation pass: every pair exactly once, the last batches
padded with repeats that `pair_mask` marks 0.
With a reference table (precomputed log-probs, (n, 2)), batches carry `ref_chosen_logps`
and `ref_rejected_logps`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from trainer.data.sampler import SampledLoader, StatefulSampler
from trainer.dpo.data import TokenPair
from trainer.objectives import IGNORE_INDEX


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


class PairLoader(SampledLoader):
    """Infinite iterator of training batches with `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, pairs: Sequence[TokenPair], batch_size: int, pad_id: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, ref_logps: torch.Tensor | None = None,
                 pad_to_multiple_of: int = 8, collate: Callable[..., dict[str, torch.Tensor]] = collate_pairs):
        self.collate = collate  # how a task lays pairs out (DPO: labelled responses; reward: scored sequences)
        self.pairs = list(pairs)
        self.global_batch = batch_size * world_size
        self.fingerprint = fingerprint(self.pairs)
        self.sampler = StatefulSampler(len(self.pairs), batch_size, seed=seed, rank=rank, world_size=world_size,
                                       shuffle=shuffle, name="preference loader",
                                       identity={"num_pairs": len(self.pairs), "fingerprint": self.fingerprint})
        self.sampler.require_units(f"{len(self.pairs)} preference pairs", "lower train.micro_batch_size or add data")
        _check_table(ref_logps, len(self.pairs))
        self.batch_size, self.pad_id, self.pad_to_multiple_of = batch_size, pad_id, pad_to_multiple_of
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.ref_logps = ref_logps

    def epoch_order(self, epoch: int) -> np.ndarray:
        return self.sampler.epoch_order(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for mine, _ in self.sampler:
            yield self.collate([self.pairs[i] for i in mine], self.pad_id, self.pad_to_multiple_of,
                               self.ref_logps, mine)


class PairBatches:
    """Every pair once, rank-sharded (pair i on rank i % world_size), the same number of batches on every rank."""

    def __init__(self, pairs: Sequence[TokenPair], batch_size: int, pad_id: int, *, rank: int = 0,
                 world_size: int = 1, ref_logps: torch.Tensor | None = None, pad_to_multiple_of: int = 8,
                 collate: Callable[..., dict[str, torch.Tensor]] = collate_pairs):
        self.collate = collate
        _check_table(ref_logps, len(pairs))
        self.pairs, self.batch_size, self.pad_id = list(pairs), batch_size, pad_id
        self.rank, self.world_size, self.ref_logps = rank, world_size, ref_logps
        self.pad_to_multiple_of = pad_to_multiple_of
        # Unshuffled, the sampler's step stride gives rank r the pairs r, r + world_size, ... in batch order,
        # which is how compute_reference_logps maps rows back to pairs.
        self.sampler = StatefulSampler(len(self.pairs), batch_size, rank=rank, world_size=world_size,
                                       shuffle=False, validation=True)
        self.num_batches = len(self.sampler)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for chunk, real in self.sampler:
            mask = [1.0] * real + [0.0] * (self.batch_size - real)
            yield self.collate([self.pairs[i] for i in chunk], self.pad_id, self.pad_to_multiple_of,
                               self.ref_logps, chunk, mask)
