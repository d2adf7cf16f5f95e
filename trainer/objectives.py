"""Objectives: a batch in, a scalar loss and metrics out. The loop knows nothing else about them.

An objective returns `(loss_sum, stats)`: `loss_sum` is the SUM of the per-target losses of
this micro-batch (targets: tokens with labels, or pairs), and `stats` holds summable tensors
(`loss_sum`, and `tokens` or `count`, the number of targets) that the loop all-reduces across
ranks and micro-batches, so logged figures are global means, not rank 0's.

The loop divides every micro-batch's `loss_sum` by the number of targets of the whole step
(all micro-batches, all ranks), counted from the batches before any forward by the task's
`count_targets`: the gradient is then that of one big batch's mean, whatever the
accumulation and rank count, and equals what is logged (the per-micro-batch mean that
transformers < 4.46 averaged weighted short and long examples differently).

Token objectives take `chunking` (`train.loss_chunking`: auto | on | off, see `trainer/token_logps.py`):
except with `off` they ask the model for hidden states and score only the labelled positions, in
chunks when the logits would be large, so the [tokens x vocab] logits never exist whole.
"""
from __future__ import annotations

from functools import partial
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from trainer.token_logps import LossChunking, label_ce_sum, lm_head_of

IGNORE_INDEX = -100

Stats = dict[str, torch.Tensor]


class Objective(Protocol):
    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]: ...


def count_label_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The targets of a token-level objective: positions with a label."""
    return (batch["labels"] != IGNORE_INDEX).sum()


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over labelled tokens (fp32 for stability) and the number of them."""
    loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, (labels != IGNORE_INDEX).sum()


def causal_lm_objective(model: nn.Module, batch: dict[str, torch.Tensor], *,
                        chunking: LossChunking = "auto") -> tuple[torch.Tensor, Stats]:
    """Next-token prediction; labels are already shifted by the data loader."""
    inputs = {"position_ids": batch.get("position_ids"), "document_ids": batch.get("document_ids")}
    labels = batch["labels"]
    if chunking == "off":
        logits = model(batch["input_ids"], **inputs)  # (B, T, V)
        loss_sum, tokens = token_cross_entropy(logits, labels)
    else:
        h = model(batch["input_ids"], **inputs, return_hidden=True)  # (B, T, dim)
        mask = labels != IGNORE_INDEX  # (B, T)
        loss_sum = label_ce_sum(h[mask], labels[mask], lm_head_of(model), chunking)  # h[mask]: (N, dim)
        tokens = mask.sum()
    return loss_sum, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach().to(loss_sum.dtype)}


def causal_lm(chunking: LossChunking = "auto") -> Objective:
    """`causal_lm_objective` with `train.loss_chunking` bound, for a task's `build`."""
    return partial(causal_lm_objective, chunking=chunking)


def across_documents(objective: Objective) -> Objective:
    """The same objective with plain causal attention over the whole window (no document masks)."""

    def plain_causal(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        return objective(model, {k: v for k, v in batch.items() if k not in ("position_ids", "document_ids")})

    return plain_causal
