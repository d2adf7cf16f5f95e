"""Preference losses: summed response log-probabilities in, per-pair losses and rewards out.

Each loss is one small pure function with TRL's shape,

    loss_fn(policy_chosen_logps, policy_rejected_logps, ..., beta=...) -> (losses, chosen_rewards, rejected_rewards)

every tensor (B,) with one entry per pair. `LOSSES` maps a config name to the function
and says whether it needs a reference model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LossOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO's sigmoid loss (Rafailov et al. 2023, eq. 7); `label_smoothing` > 0 is conservative DPO (cDPO):
    the preference label is assumed flipped with that probability."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_logratios - rejected_logratios)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17): squared distance of the log-ratio gap from 1/(2*beta).

    The gap uses per-token averages so beta means the same for short and long responses
    (what the IPO authors' results use, and TRL's convention); rewards stay sequence-level.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    gap = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
    losses = (gap - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """SLiC's hinge on the reward margin (Zhao et al. 2023): zero once beta * margin exceeds 1."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = torch.relu(1 - beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO (Meng et al. 2024, eq. 6): reference-free; the reward is beta times the per-token average
    log-probability, and the chosen reward must beat the rejected one by a margin `gamma`."""
    chosen_rewards = beta * policy_chosen_logps / chosen_tokens.clamp(min=1)
    rejected_rewards = beta * policy_rejected_logps / rejected_tokens.clamp(min=1)
    logits = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> LossOutput:
    """ORPO (Hong et al. 2024, eq. 6): the chosen response's NLL plus `beta` (the paper's lambda) times
    -log sigmoid of the log odds ratio, on per-token average log-probabilities; reference-free."""
    chosen_avg = policy_chosen_logps / chosen_tokens.clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_tokens.clamp(min=1)
    # log(p / (1 - p)) with p = exp(avg)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, switching form at -log 2 so neither branch cancels catastrophically."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@dataclass(frozen=True)
class PairLogps:
    """What a preference loss may read: summed response log-probs and response lengths, each (B,)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[PairLogps, LossParams], LossOutput]
    needs_reference: bool
    doc: str


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(
        lambda x, p: dpo_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected,
                              beta=p.beta, label_smoothing=p.label_smoothing),
        needs_reference=True, doc="DPO; with label_smoothing > 0, conservative DPO"),
    "ipo": LossSpec(
        lambda x, p: ipo_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected,
                              x.chosen_tokens, x.rejected_tokens, beta=p.beta),
        needs_reference=True, doc="IPO"),
    "hinge": LossSpec(
        lambda x, p: hinge_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, beta=p.beta),
        needs_reference=True, doc="SLiC hinge"),
    "simpo": LossSpec(
        lambda x, p: simpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens,
                                beta=p.beta, gamma=p.simpo_gamma, label_smoothing=p.label_smoothing),
        needs_reference=False, doc="SimPO (reference-free)"),
    "orpo": LossSpec(
        lambda x, p: orpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_tokens, x.rejected_tokens, beta=p.beta),
        needs_reference=False, doc="ORPO (reference-free)"),
}


def preference_loss(name: str, logps: PairLogps, params: LossParams) -> LossOutput:
    spec = LOSSES[name]
    if spec.needs_reference and (logps.ref_chosen is None or logps.ref_rejected is None):
        raise ValueError(f"dpo.loss '{name}' needs reference log-probabilities, but none were given")
    return spec.fn(logps, params)
