"""The reward-model loss: pure functions, tensors in, tensors out (TRL's RewardTrainer is the oracle in tests)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float = 0.0) -> torch.Tensor:
    """Per pair: -log sigmoid(r_chosen - r_rejected - margin) + c * (r_chosen + r_rejected)^2, each (B,).

    The centring term is TRL's per-batch mean of (r_c + r_r)^2 written per pair, so the mean over pairs
    equals TRL's loss and a sum over pairs normalizes like every other objective here."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses
