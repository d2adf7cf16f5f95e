"""Policy-gradient losses as pure functions of per-token tensors (B, T) and masks, like the DPO family.

GRPO (and its DAPO / Dr. GRPO normalizations), as TRL's `GRPOTrainer` computes it:

    ratio_t = exp(logp_t - old_logp_t)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          (k3, always >= 0)

`normalized_loss` returns the loss SUM and its normalizer COUNT, so the loop can divide the whole step's
sum by the whole step's count over micro-batches and ranks:

    grpo     sum over completions of (their token mean)       / completions
    dapo     sum over every token                              / tokens
    dr_grpo  sum over every token                              / (completions x max_new_tokens)

PPO pieces (for a critic-based rollout): reward whitening, GAE, the clipped surrogate and the clipped
value loss, each checked against a plain loop in the tests.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

AllSum = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over ranks (the identity on one)
NORMALIZATIONS = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """(N,) rewards in consecutive groups of `group_size` -> (r - group mean) [/ (group std + 1e-4)].

    The std is the unbiased one, as TRL's `nanstd`; a group whose rewards are all equal gets 0 everywhere."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


@dataclass
class TokenLosses:
    loss: torch.Tensor  # (B, T) per-token loss (undefined where mask is 0)
    kl: torch.Tensor | None  # (B, T) k3 estimate to the reference, None at beta 0
    low_clipped: torch.Tensor  # (B, T) bool: ratio below 1 - eps_low with a negative advantage
    high_clipped: torch.Tensor  # (B, T) bool: ratio above 1 + eps_high with a positive advantage


def grpo_token_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, *,
                      eps_low: float, eps_high: float, beta: float = 0.0,
                      ref_logps: torch.Tensor | None = None) -> TokenLosses:
    """logps, old_logps, ref_logps: (B, T) log-probs of the sampled tokens; advantages: (B,)."""
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
    return TokenLosses(loss, kl, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0))


def normalized_loss(token_loss: torch.Tensor, mask: torch.Tensor, normalization: str,
                    max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss sum, normalizer) of a micro-batch; the step's loss is sum(loss sums) / sum(normalizers)."""
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    if normalization == "grpo":
        per_completion = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_completion.sum(), torch.tensor(float(mask.size(0)), device=mask.device)
    if normalization == "dapo":
        return masked.sum(), mask.sum()
    if normalization == "dr_grpo":
        return masked.sum(), torch.tensor(float(mask.size(0) * max_new_tokens), device=mask.device)
    raise ValueError(f"rl.loss_normalization: unknown '{normalization}' (choose {', '.join(NORMALIZATIONS)})")


def normalizer_count(mask: torch.Tensor, normalization: str, max_new_tokens: int) -> torch.Tensor:
    """The normalizer alone, from the mask: what the loop sums over the step before any forward."""
    if normalization == "grpo":
        return torch.tensor(float(mask.size(0)))
    if normalization == "dapo":
        return mask.sum().float()
    if normalization == "dr_grpo":
        return torch.tensor(float(mask.size(0) * max_new_tokens))
    raise ValueError(f"rl.loss_normalization: unknown '{normalization}' (choose {', '.join(NORMALIZATIONS)})")


# --- PPO ------------------------------------------------------------------------------------------------------

def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_sum: AllSum | None = None) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries (unbiased variance); the mean is added back
    when `shift_mean` is False (rewards keep their sign, as in the InstructGPT recipe). `all_sum` sums a
    tensor over ranks, so that the statistics are those of the whole buffer, every rank's rows together."""
    all_sum = all_sum or (lambda t: t)
    mask = mask.to(values.dtype)
    n, total = all_sum(torch.stack([mask.sum(), (values * mask).sum()])).unbind()
    mean = total / n
    var = all_sum((((values - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1.0)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each row's masked (contiguous, left-aligned) tokens.

    rewards, values: (B, T); returns (advantages, returns), zero outside the mask."""
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    T = values.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate (B, T) and whether the clipped branch was taken; advantages are per token."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    return torch.max(unclipped, clipped), clipped > unclipped


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 0.5 * max((v - R)^2, (clip(v, v_old +- clip) - R)^2) and whether the clipped term won."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return 0.5 * torch.max(plain, clipped), clipped > plain


def ppo_advantages(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor | None,
                   values: torch.Tensor, mask: torch.Tensor, *, beta: float, gamma: float, lam: float,
                   whiten_rewards: bool = False, all_sum: AllSum | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rollout buffer's PPO targets, as TRL's `PPOTrainer` builds them: per-token rewards
    `-beta * (logp - ref_logp)` with the sequence score added on each row's last masked token, optionally
    whitened (mean kept), then GAE; the advantages are whitened over the buffer's tokens. With `all_sum`
    (a sum over ranks) both whitenings use the statistics of every rank's share of the buffer together.

    scores: (B,); logps, ref_logps, values, mask: (B, T). Returns (per-token rewards, advantages, returns)."""
    fmask = mask.to(values.dtype)
    rewards = torch.zeros_like(values)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference's log-probs")
        rewards = -beta * (logps - ref_logps) * fmask
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=1)  # (B,) each completion's last token
    if bool((last < 0).any()):
        raise ValueError("a completion without tokens has no last token to reward")
    rewards[torch.arange(mask.size(0), device=mask.device), last] += scores.to(rewards.dtype)
    if whiten_rewards:
        rewards = masked_whiten(rewards, fmask, shift_mean=False, all_sum=all_sum) * fmask
    advantages, returns = gae(rewards, values, fmask, gamma, lam)
    advantages = masked_whiten(advantages, fmask, all_sum=all_sum) * fmask
    return rewards, advantages, returns
