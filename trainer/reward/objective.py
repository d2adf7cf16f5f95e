"""The reward objective: score chosen and rejected rows in one forward, Bradley-Terry loss, summable stats.

Statistics are per-pair sums the loop adds over micro-batches and ranks and divides by `count`:
loss, accuracy (chosen scored above rejected), margin, and the mean chosen and rejected scores.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.objectives import Stats
from trainer.reward.losses import bradley_terry_loss


class RewardObjective:
    """`objective(model, batch) -> (loss_sum, stats)` for a model returning one score per row."""

    def __init__(self, center_coefficient: float = 0.0):
        self.center_coefficient = center_coefficient

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        scores = model(batch["input_ids"], attention_mask=batch["attention_mask"]).squeeze(-1).float()  # (2B,)
        chosen, rejected = scores.chunk(2)
        margin = batch.get("margin")
        losses = bradley_terry_loss(chosen, rejected, margin, self.center_coefficient)
        mask = batch["pair_mask"].to(losses.dtype)

        def total(x: torch.Tensor) -> torch.Tensor:
            return (x.detach().float() * mask).sum()

        stats = {
            "loss_sum": total(losses),
            "count": mask.sum().detach(),
            "accuracy_sum": total((chosen > rejected).float()),
            "margin_sum": total(chosen - rejected),
            "chosen_score_sum": total(chosen),
            "rejected_score_sum": total(rejected),
        }
        return (losses * mask).sum(), stats
