"""The SFT objective: next-token cross-entropy on assistant tokens only, token-weighted.

The loader has already shifted the labels and set IGNORE_INDEX on prompt tokens, padding and
each example's last position, so a packed row's loss is exactly the sum of its examples'
losses: `loss_sum / tokens` summed over micro-batches and ranks by the loop is the
token-weighted mean over every assistant token seen.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.objectives import Stats, token_cross_entropy


def sft_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
    logits = model(
        batch["input_ids"],
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
    )  # (B, T, V)
    loss_sum, tokens = token_cross_entropy(logits, batch["labels"])
    loss = loss_sum / tokens.clamp(min=1)
    return loss, {"loss_sum": loss_sum.detach(), "tokens": tokens.detach().to(loss_sum.dtype)}
