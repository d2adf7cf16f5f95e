"""GRPO and PPO losses as pure functions: GRPO against TRL's own GRPOTrainer._compute_loss, PPO against
plain loops written here."""
from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from trainer.rl.losses import (gae, group_advantages, grpo_token_losses, masked_whiten, normalized_loss,
                               normalizer_count, ppo_policy_loss, ppo_value_loss)


def _rollout(seed: int, B: int = 6, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g) * 3
    old = logps + 0.4 * torch.randn(B, T, generator=g)  # far enough off-policy for both clip branches
    ref = logps + 0.3 * torch.randn(B, T, generator=g)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2, 0.3, -0.8])[:B]  # both signs: both clip branches
    lengths = torch.tensor([T, 3, 1, 5, T, 2])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return logps, old, ref, advantages, mask


def _trl_loss(loss_type, logps, old, ref, advantages, mask, beta, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss itself, on an object carrying only what it reads; the model's
    per-token log-probs are handed in through `_get_per_token_logps_and_entropies`."""
    from trl import GRPOTrainer

    B, T = mask.shape
    trl_self = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=eps_low,
        epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=max_len, _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        accelerator=types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    return GRPOTrainer._compute_loss(trl_self, None, inputs), trl_self._metrics["train"]


@pytest.mark.parametrize("normalization,trl_type", [("grpo", "grpo"), ("dapo", "dapo"), ("dr_grpo", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(normalization, trl_type, beta):
    logps, old, ref, advantages, mask = _rollout(0)
    eps_low, eps_high, max_len = 0.2, 0.28, 9
    losses = grpo_token_losses(logps, old, advantages, eps_low=eps_low, eps_high=eps_high, beta=beta, ref_logps=ref)
    loss_sum, count = normalized_loss(losses.loss, mask, normalization, max_len)
    assert count == normalizer_count(mask, normalization, max_len)
    trl, metrics = _trl_loss(trl_type, logps, old, ref, advantages, mask, beta, eps_low, eps_high, max_len)
    assert (loss_sum / count).item() == pytest.approx(trl.item(), abs=1e-5, rel=1e-5)
    # Both clip branches occur, and the clipped shares agree with TRL's global token means.
    m = mask.bool()
    assert losses.low_clipped[m].any() and losses.high_clipped[m].any()
    assert losses.low_clipped[m].float().mean().item() == pytest.approx(metrics["clip_ratio/low_mean"][-1])
    assert losses.high_clipped[m].float().mean().item() == pytest.approx(metrics["clip_ratio/high_mean"][-1])
    if beta:
        assert losses.kl[m].mean().item() == pytest.approx(metrics["kl"][-1], rel=1e-5)


def test_on_policy_gradient_is_the_advantage_weighted_score_function():
    """At ratio 1 (old = detached current), d loss / d logp_t = -A (before normalization) for every token."""
    logps, _, _, advantages, mask = _rollout(1)
    logps = logps.clone().requires_grad_(True)
    losses = grpo_token_losses(logps, logps.detach(), advantages, eps_low=0.2, eps_high=0.2)
    loss_sum, _ = normalized_loss(losses.loss, mask, "dapo", 9)
    loss_sum.backward()
    expected = -advantages[:, None].expand_as(logps) * mask
    assert torch.allclose(logps.grad, expected)


def test_group_advantages_match_trl_formula():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, 3.0, -1.0, 0.0])
    G = 4
    groups = rewards.view(-1, G)
    mean = groups.mean(dim=1).repeat_interleave(G)
    std = nanstd(groups, dim=1).repeat_interleave(G)
    assert torch.allclose(group_advantages(rewards, G), (rewards - mean) / (std + 1e-4))
    assert torch.allclose(group_advantages(rewards, G, scale=False), rewards - mean)
    assert group_advantages(rewards, G)[4:8].abs().max() == 0  # equal rewards teach nothing
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


# --- PPO against plain loops -----------------------------------------------------------------------------------

def test_gae_equals_plain_loop():
    g = torch.Generator().manual_seed(2)
    B, T, gamma, lam = 3, 6, 0.99, 0.95
    rewards, values = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    lengths = [6, 4, 1]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        running = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            running = delta + gamma * lam * running
            assert adv[b, t].item() == pytest.approx(running, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(running + values[b, t].item(), abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()


def test_ppo_policy_and_value_losses_equal_plain_formulas():
    g = torch.Generator().manual_seed(3)
    logps, old = -torch.rand(50, generator=g), -torch.rand(50, generator=g)
    adv, clip = torch.randn(50, generator=g), 0.2
    loss, clipped = ppo_policy_loss(logps, old, adv, clip)
    for i in range(50):
        ratio = torch.exp(logps[i] - old[i]).item()
        plain = max(-adv[i].item() * ratio, -adv[i].item() * min(max(ratio, 1 - clip), 1 + clip))
        assert loss[i].item() == pytest.approx(plain, abs=1e-6)
    assert clipped.any() and not clipped.all()
    values, old_values, returns = (torch.randn(50, generator=g) for _ in range(3))
    vloss, vclipped = ppo_value_loss(values, old_values, returns, clip)
    for i in range(50):
        v_clip = old_values[i].item() + min(max(values[i].item() - old_values[i].item(), -clip), clip)
        plain = 0.5 * max((values[i].item() - returns[i].item()) ** 2, (v_clip - returns[i].item()) ** 2)
        assert vloss[i].item() == pytest.approx(plain, abs=1e-6)
    assert vclipped.any()


def test_masked_whiten_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    kept = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    expected = (kept - kept.mean()) / torch.sqrt(kept.var() + 1e-8)
    assert torch.allclose(masked_whiten(x, mask)[mask.bool()], expected, atol=1e-6)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[mask.bool()], expected + kept.mean(), atol=1e-6)


class _Ranks:
    """`n` threads standing in for ranks: `all_sum(rank)` sums a tensor over them, as a collective would."""

    def __init__(self, n: int):
        import threading

        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def all_sum(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
            return total
        return reduce

    def run(self, fn, *shares):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(shares)) as pool:
            return list(pool.map(lambda i: fn(shares[i], self.all_sum(i)), range(len(shares))))


def test_masked_whiten_over_ranks_equals_the_whole_buffer():
    """Each rank whitens its own rows with the statistics of every rank's rows together: the same numbers as
    whitening the whole buffer at once, not as each share on its own."""
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0], [9.0, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    whole = masked_whiten(x, mask)
    parts = _Ranks(2).run(lambda rows, all_sum: masked_whiten(x[rows], mask[rows], all_sum=all_sum),
                          slice(0, 1), slice(1, 3))
    assert torch.allclose(torch.cat(parts)[mask.bool()], whole[mask.bool()], atol=1e-6)
    alone = masked_whiten(x[1:], mask[1:])
    assert not torch.allclose(alone[mask[1:].bool()], whole[1:][mask[1:].bool()], atol=1e-3)
