"""Preference pairs laid out for a scoring head: rows [chosen_1..chosen_B, rejected_1..rejected_B].

Each row is the whole prompt + response (its last token included: the head reads the hidden
state there), right-padded, with an `attention_mask`; `pair_mask` (B,) marks real pairs
(validation pads its last batch with masked repeats) and `margin` (B,) carries the rows'
margins. Used with the DPO loaders through their `collate` argument.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from trainer.dpo.data import TokenPair


def collate_scored_pairs(pairs: Sequence[TokenPair], pad_id: int, pad_to_multiple_of: int = 8,
                         ref_logps: torch.Tensor | None = None, indices: Sequence[int] | None = None,
                         pair_mask: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """(2B, T) input_ids and attention_mask for B pairs, chosen rows first. `ref_logps`/`indices` are the
    DPO collate's arguments and mean nothing to a reward model."""
    rows = [np.concatenate([p.prompt, p.chosen]) for p in pairs] + [np.concatenate([p.prompt, p.rejected])
                                                                     for p in pairs]
    longest = max(len(r) for r in rows)
    T = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, seq in enumerate(rows):
        input_ids[b, :len(seq)] = seq
        attention_mask[b, :len(seq)] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "pair_mask": torch.tensor(pair_mask if pair_mask is not None else [1.0] * len(pairs)),
            "margin": torch.tensor([p.margin for p in pairs], dtype=torch.float32)}
