"""The `reward` section of a reward-model recipe: the pairs (read as DPO reads them) and the loss."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.config import RunConfig
from trainer.dpo.config import PairDataSection


class RewardSection(PairDataSection):
    """Preference pairs and the Bradley-Terry loss of a scalar reward head."""

    method: Literal["full", "lora", "qlora"] = "lora"
    # A pair whose responses are equal teaches a reward model nothing and usually means broken data.
    on_identical: Literal["drop", "error"] = Field("error", description="pairs whose responses are identical")
    center_coefficient: float = Field(
        0.0, ge=0, description="weight of mean((r_chosen + r_rejected)^2), which keeps rewards centred at 0 "
                               "(TRL's center_rewards_coefficient; 0.01 is the usual choice)")


class RewardConfig(RunConfig):
    """A run config plus the `reward` section; `data.seq_len` bounds prompt + response."""

    reward: RewardSection = RewardSection()
