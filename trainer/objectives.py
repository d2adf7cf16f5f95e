"""Objectives: a batch in, a scalar loss and metrics out. The loop knows nothing else about them.

An objective returns `(loss, stats)` where `loss` is what is backpropagated (mean over
this micro-batch's target tokens) and `stats` holds summable tensors (e.g. `loss_sum`,
`tokens`) that the loop all-reduces across ranks and micro-batches, so logged figures
are global token-weighted means, not rank 0's.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100

Stats = dict[str, torch.Tensor]


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]: ...


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over labelled tokens (fp32 for stability) and the number of them."""
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


def causal_lm_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
    """Next-token prediction; labels are already shifted by the data loader."""
    logits = model(
        batch["input_ids"],
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
    )  # (B, T, V)
    loss_sum, tokens = token_cross_entropy(logits, batch["labels"])
    loss = loss_sum / tokens.clamp(min=1)
    return loss, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach().to(loss_sum.dtype)}


def across_documents(objective: Objective) -> Objective:
    """The same objective with plain causal attention over the whole window (no document masks)."""

    def plain_causal(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        return objective(model, {k: v for k, v in batch.items() if k not in ("position_ids", "document_ids")})

    return plain_causal
