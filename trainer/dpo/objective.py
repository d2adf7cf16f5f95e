"""The preference objective: one concatenated forward of chosen and rejected rows, a loss from `LOSSES`.

Statistics are summable per-pair figures (the loop sums them over micro-batches and ranks and
divides by `count`): loss, chosen/rejected rewards, reward accuracy and margin, the policy's
summed log-probs, and `policy_accuracy`, the share of pairs where the policy alone puts more
probability on the chosen response than on the rejected one.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from trainer.dpo.losses import LOSSES, LossParams, PairLogps, preference_loss
from trainer.objectives import IGNORE_INDEX, Stats
from trainer.token_logps import LossChunking, label_logps, lm_head_of


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                   chunking: LossChunking = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens (fp32) and how many there are, each (R,).

    `chunking` (`train.loss_chunking`): only `off` computes the logits of every position; otherwise the
    head runs over the response positions alone, in chunks when their logits would be large."""
    mask = labels != IGNORE_INDEX  # (R, T)
    if chunking == "off":
        logits = model(input_ids)  # (R, T, V)
        token_logps = -F.cross_entropy(logits[mask].float(), labels[mask], reduction="none")  # (N,)
    else:
        h = model(input_ids, return_hidden=True)  # (R, T, dim)
        token_logps = label_logps(h[mask], labels[mask], lm_head_of(model), chunking)  # (N,)
    rows = torch.arange(labels.size(0), device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    summed = torch.zeros(labels.size(0), dtype=torch.float32, device=labels.device).index_add(0, rows, token_logps)
    return summed, mask.sum(dim=1).float()


class Reference(Protocol):
    """Where reference log-probs come from: (chosen, rejected), each (B,), for a batch."""

    def logps(self, policy: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


def count_pairs(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The targets of a preference objective: real pairs (validation pads its last batch with masked ones)."""
    mask = batch.get("pair_mask")
    return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].size(0) // 2)


class PreferenceObjective:
    """`objective(model, batch) -> (loss_sum, stats)` for the loop, for any loss in `LOSSES`."""

    def __init__(self, loss: str, params: LossParams, reference: Reference | None, *,
                 chunking: LossChunking = "auto"):
        if loss not in LOSSES:
            raise ValueError(f"dpo.loss: unknown loss '{loss}' (choose {', '.join(LOSSES)})")
        if LOSSES[loss].needs_reference and reference is None:
            raise ValueError(f"dpo.loss '{loss}' needs a reference model (dpo.reference)")
        self.loss, self.params, self.chunking = loss, params, chunking
        self.reference = reference if LOSSES[loss].needs_reference else None

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logps, tokens = sequence_logps(model, batch["input_ids"], batch["labels"],
                                      chunking=self.chunking)  # (2B,), (2B,)
        chosen, rejected = logps.chunk(2)
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        ref_chosen = ref_rejected = None
        if self.reference is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected = self.reference.logps(model, batch)
        pair = PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected)
        losses, chosen_rewards, rejected_rewards = preference_loss(self.loss, pair, self.params)
        mask = batch.get("pair_mask")
        mask = torch.ones_like(losses) if mask is None else mask.to(losses.dtype)
        count = mask.sum()
        loss_sum = (losses * mask).sum()
        margin = chosen_rewards - rejected_rewards

        def total(x: torch.Tensor) -> torch.Tensor:
            return (x.detach().float() * mask).sum()

        stats = {
            "loss_sum": total(losses),
            "count": count.detach(),
            "chosen_reward_sum": total(chosen_rewards),
            "rejected_reward_sum": total(rejected_rewards),
            "reward_accuracy_sum": total((margin > 0).float()),
            "reward_margin_sum": total(margin),
            "chosen_logps_sum": total(chosen),
            "rejected_logps_sum": total(rejected),
            "policy_accuracy_sum": total((chosen > rejected).float()),
        }
        return loss_sum, stats
