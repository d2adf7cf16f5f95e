"""The GRPO and PPO objectives for the loop: the policy's per-token log-probs of a rollout micro-batch and the loss.

Statistics are summable: `loss_sum` with its `loss_normalizer` (the loss normalization's count),
per-completion figures summed over completions (`count`): reward, advantage, response length, and
per-token figures (KL, entropy, clip fractions, PPO's losses, values and returns) summed over completion
tokens with their token count as `<name>_count`, so the loop's global sums give token-weighted means over
every micro-batch and rank (a long completion weighs as many tokens as it has, as in the loss).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.objectives import IGNORE_INDEX, Stats
from trainer.rl.config import RLSection
from trainer.rl.losses import grpo_token_losses, normalized_loss, normalizer_count, ppo_policy_loss, ppo_value_loss
from trainer.rl.value_head import value_head_of
from trainer.token_logps import LossChunking, _max_over_ranks, chunk_tokens_for, label_logps, lm_head_of, vocab_size_of


def per_token_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                    chunking: LossChunking = "auto", entropy: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T) fp32 log-probs of the labelled tokens under logits / temperature (0 elsewhere), and their
    entropies when asked (no gradient). The head is linear and bias-free, so scaling the hidden states
    by 1 / temperature scales the logits the same way, chunked head included."""
    h = model(input_ids, return_hidden=True)  # (B, T, dim)
    return logps_from_hidden(model, h, labels, temperature=temperature, chunking=chunking, entropy=entropy)


def logps_and_values(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                     chunking: LossChunking = "auto", entropy: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """`per_token_logps` plus the value head's (B, T) fp32 estimates at the same positions (the state before
    each completion token), from one forward of the shared trunk (0 where there is no label)."""
    h = model(input_ids, return_hidden=True)
    logps, ent = logps_from_hidden(model, h, labels, temperature=temperature, chunking=chunking, entropy=entropy)
    values = value_head_of(model)(h).squeeze(-1).float() * (labels != IGNORE_INDEX)
    return logps, ent, values


def logps_from_hidden(model: nn.Module, h: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                      chunking: LossChunking, entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    mask = labels != IGNORE_INDEX
    h_sel = h[mask]
    if temperature != 1.0:
        h_sel = h_sel / temperature
    head = lm_head_of(model)
    tok = label_logps(h_sel, labels[mask], head, chunking)  # (N,)
    logps = torch.zeros(labels.shape, dtype=tok.dtype, device=tok.device).masked_scatter(mask, tok)
    ent = None
    if entropy:
        ent = torch.zeros(labels.shape, dtype=torch.float32, device=tok.device).masked_scatter(
            mask, token_entropy(h_sel.detach(), head))
    return logps, ent


def token_sums(fmask: torch.Tensor, **figures: torch.Tensor) -> Stats:
    """`<name>_sum` over the masked tokens and `<name>_count` (those tokens) for each (B, T) figure."""
    count = fmask.sum().detach()
    stats = {}
    for name, x in figures.items():
        stats[f"{name}_sum"] = (x.detach().float() * fmask).sum()
        stats[f"{name}_count"] = count
    return stats


@torch.no_grad()
def token_entropy(h: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """Entropy of softmax(head(h)) per row of h (N, dim), a chunk of logits at a time; (N,) fp32."""
    size = chunk_tokens_for(vocab_size_of(head))
    n_chunks = max(1, math.ceil(_max_over_ranks(h.size(0), head, h.device) / size))  # equal head calls (ZeRO-3)
    out = []
    for i in range(n_chunks):
        logits = head(h[i * size:(i + 1) * size]).float()
        logp = logits.log_softmax(dim=-1)
        out.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(out)


class GRPOObjective:
    """`objective(model, batch) -> (loss_sum, stats)` over rollout micro-batches (see trainer.rl.rollout)."""

    def __init__(self, rl: RLSection, chunking: LossChunking = "auto"):
        self.rl, self.chunking = rl, chunking

    def count_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return normalizer_count(batch["labels"] != IGNORE_INDEX, self.rl.loss_normalization, self.rl.max_new_tokens)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        r = self.rl
        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        logps, entropy = per_token_logps(model, batch["input_ids"], labels, temperature=r.temperature,
                                         chunking=self.chunking, entropy=True)
        # One update per rollout: the sampling policy is this very policy (ratio 1, gradients of the ratio).
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        advantages = batch["advantages"]
        losses = grpo_token_losses(logps, old, advantages, eps_low=r.epsilon, eps_high=r.clip_high, beta=r.beta,
                                   ref_logps=batch.get("ref_logps"))
        loss_sum, normalizer = normalized_loss(losses.loss, mask, r.loss_normalization, r.max_new_tokens)
        fmask = mask.float()
        stats = {
            "loss_sum": loss_sum.detach(),
            "loss_normalizer": normalizer.detach().float(),
            "count": torch.tensor(float(labels.size(0)), device=labels.device),
            "reward_sum": batch["rewards"].float().sum(),
            "advantage_sum": advantages.float().sum(),
            "response_length_sum": fmask.sum(),
            **token_sums(fmask, entropy=entropy, clip_low=losses.low_clipped, clip_high=losses.high_clipped,
                         clip_fraction=losses.low_clipped | losses.high_clipped),
        }
        if losses.kl is not None:
            stats.update(token_sums(fmask, kl=losses.kl))
        for key, value in batch.items():
            if key.startswith("reward/"):
                stats[f"{key}_sum"] = value.float().sum()
            elif key.startswith("rollout_"):  # buffer-level figures, on the buffer's first micro-batch only
                stats[key] = value.float()
        return loss_sum, stats


class PPOObjective:
    """PPO's clipped surrogate + `vf_coef` x clipped value loss per completion token; the step's loss is the
    sum over its tokens divided by their count (TRL's masked mean, made global over micro-batches and ranks).
    Batches carry per-token `advantages`, `returns`, `old_values` and `old_logps` (trainer.rl.rollout)."""

    def __init__(self, rl: RLSection, chunking: LossChunking = "auto"):
        self.rl, self.chunking = rl, chunking

    def count_targets(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (batch["labels"] != IGNORE_INDEX).sum().float()

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        r = self.rl
        labels = batch["labels"]
        fmask = (labels != IGNORE_INDEX).float()
        logps, entropy, values = logps_and_values(model, batch["input_ids"], labels, temperature=r.temperature,
                                                  chunking=self.chunking, entropy=True)
        policy_loss, policy_clipped = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], r.epsilon)
        value_loss, value_clipped = ppo_value_loss(values, batch["old_values"], batch["returns"], r.value_clip)
        loss_sum = ((policy_loss + r.vf_coef * value_loss) * fmask).sum()
        stats = {
            "loss_sum": loss_sum.detach(),
            "loss_normalizer": fmask.sum(),
            "count": torch.tensor(float(labels.size(0)), device=labels.device),
            "reward_sum": batch["rewards"].float().sum(),
            "response_length_sum": fmask.sum(),
            **token_sums(fmask, entropy=entropy, policy_loss=policy_loss, value_loss=value_loss,
                         clip_fraction=policy_clipped, value_clip_fraction=value_clipped, value=values,
                         **{"return": batch["returns"]}),
        }
        if "ref_logps" in batch:  # the KL the rewards were penalized with (k1 of the sampling policy)
            stats.update(token_sums(fmask, kl=batch["old_logps"] - batch["ref_logps"]))
        for key, value in batch.items():
            if key.startswith("reward/"):
                stats[f"{key}_sum"] = value.float().sum()
            elif key.startswith("rollout_"):
                stats[key] = value.float()
        return loss_sum, stats
