"""Reference strategies: the same step-0 loss from all four, frozen copies stay frozen, the precompute cache
key misses on any change of its inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from tests.sft_fixtures import tiny_model
from trainer.dpo.data import TokenPair
from trainer.dpo.loader import collate_pairs
from trainer.dpo.losses import LossParams
from trainer.dpo.objective import PreferenceObjective
from trainer.dpo.precompute import (cached_reference_logps, compute_reference_logps, reference_cache_key,
                                    weights_fingerprint)
from trainer.dpo.reference import (AdapterReference, FrozenCopyReference, PrecomputedReference, frozen_copy)

VOCAB = 64


@pytest.fixture(scope="module")
def accelerator():
    from accelerate.state import AcceleratorState

    # Accelerate's state is process-wide: another test's Accelerator may have left bf16 autocast behind.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True, mixed_precision="no")


def _pairs(n: int) -> list[TokenPair]:
    rng = np.random.default_rng(0)
    return [TokenPair(rng.integers(1, VOCAB, rng.integers(3, 9)), rng.integers(1, VOCAB, rng.integers(2, 7)),
                      rng.integers(1, VOCAB, rng.integers(2, 7))) for _ in range(n)]


def _lora(model):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv", "w1", "w2"]))
    with torch.no_grad():  # a policy that already differs from its base, so the reference matters
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return policy


def _direct_logp(model, pair: TokenPair, response: np.ndarray) -> float:
    """log p(response | prompt) the plain way: one forward over prompt + response."""
    seq = torch.as_tensor(np.concatenate([pair.prompt, response]))[None]
    logp = F.log_softmax(model(seq).float(), -1)[0, :-1]  # (T - 1, V)
    targets = seq[0, 1:]
    start = len(pair.prompt) - 1
    return logp[torch.arange(start, len(targets)), targets[start:]].sum().item()


def test_all_four_strategies_give_the_same_step0_loss(accelerator):
    base = tiny_model(VOCAB, seed=1)
    pairs = _pairs(7)
    resident = FrozenCopyReference(frozen_copy(base), accelerator, offload=False)
    offload = FrozenCopyReference(frozen_copy(base), accelerator, offload=True)
    assert hasattr(offload.model, "_hf_hook")  # Accelerate's streaming hooks, not a plain module
    table = compute_reference_logps(accelerator, FrozenCopyReference(frozen_copy(base), accelerator, offload=False),
                                    pairs, batch_size=3, pad_id=0)
    reference_base = frozen_copy(base)
    policy = _lora(base)

    idx = [4, 1, 6, 0]
    batch = collate_pairs([pairs[i] for i in idx], pad_id=0, ref_logps=table, indices=idx)
    # The precomputed table holds log p(response | prompt) under the base weights (up to float summation
    # order: the padded batch and the single sequence take different kernels).
    for j, i in enumerate(idx):
        assert batch["ref_chosen_logps"][j].item() == pytest.approx(_direct_logp(reference_base, pairs[i],
                                                                                 pairs[i].chosen), rel=1e-4)
        assert batch["ref_rejected_logps"][j].item() == pytest.approx(_direct_logp(reference_base, pairs[i],
                                                                                   pairs[i].rejected), rel=1e-4)

    results = {}
    for name, ref in {"adapter": AdapterReference(accelerator), "precompute": PrecomputedReference(),
                      "offload": offload, "resident": resident}.items():
        for loss in ("sigmoid", "ipo"):
            objective = PreferenceObjective(loss, LossParams(beta=0.3), ref)
            value, stats = objective(policy, batch)
            results[name, loss] = (value.item(), stats["chosen_reward_sum"].item(), stats["reward_margin_sum"].item())
            pairs_in_batch = stats["count"].item()
    for loss in ("sigmoid", "ipo"):
        want = results["precompute", loss]
        for name in ("adapter", "offload", "resident"):
            assert results[name, loss] == pytest.approx(want, rel=1e-5, abs=1e-6), (name, loss)
    # The objective returns the summed loss; at the reference itself each pair's sigmoid loss is log 2.
    assert abs(results["precompute", "sigmoid"][0] - pairs_in_batch * math.log(2)) > 1e-3


def test_frozen_copy_gets_no_gradient_and_policy_does(accelerator):
    base = tiny_model(VOCAB, seed=2)
    ref = FrozenCopyReference(frozen_copy(base), accelerator, offload=False)
    batch = collate_pairs(_pairs(3), pad_id=0)
    loss, _ = PreferenceObjective("sigmoid", LossParams(), ref)(base, batch)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in ref.model.parameters())
    assert all(p.grad is not None for p in base.parameters() if p.requires_grad)
    assert not set(map(id, ref.model.parameters())) & set(map(id, base.parameters()))


def test_cache_key_changes_with_each_input():
    parts = dict(weights="w" * 64, tokenizer="t1", data="d1", template="{{ x }}", max_len=512, max_prompt_len=256)
    key = reference_cache_key(**parts)
    assert reference_cache_key(**dict(parts)) == key
    for field, other in [("weights", "v" * 64), ("tokenizer", "t2"), ("data", "d2"), ("template", "{{ y }}"),
                         ("max_len", 1024), ("max_prompt_len", 128)]:
        assert reference_cache_key(**{**parts, field: other}) != key, field
    model = tiny_model(VOCAB, seed=3)
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.norm.weight[0] += 1e-6
    assert weights_fingerprint(model) != before


def test_cache_hits_only_its_own_key(accelerator, tmp_path):
    calls = []

    def compute(value: float):
        def run():
            calls.append(value)
            return torch.full((5, 2), value)
        return run

    first, hit = cached_reference_logps(accelerator, tmp_path, "k1", 5, compute(1.0), {"a": 1})
    assert not hit and calls == [1.0] and first[0, 0] == 1.0
    again, hit = cached_reference_logps(accelerator, tmp_path, "k1", 5, compute(9.0), {"a": 1})
    assert hit and calls == [1.0] and torch.equal(again, first)
    other, hit = cached_reference_logps(accelerator, tmp_path, "k2", 5, compute(2.0), {"a": 2})
    assert not hit and calls == [1.0, 2.0] and other[0, 0] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.safetensors", "k2.safetensors"]  # no temp leftovers
    with pytest.raises(ValueError, match="expected \\(6, 2\\)"):
        cached_reference_logps(accelerator, tmp_path, "k1", 6, compute(3.0), {})


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_need_no_reference_and_train(loss):
    model = tiny_model(VOCAB, seed=4)
    batch = collate_pairs(_pairs(4), pad_id=0)
    objective = PreferenceObjective(loss, LossParams(beta=2.0 if loss == "simpo" else 0.2), reference=None)
    value, stats = objective(model, batch)
    value.backward()
    assert torch.isfinite(value) and stats["count"].item() == 4
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="needs a reference"):
        PreferenceObjective("sigmoid", LossParams(), reference=None)
