"""Preference losses against TRL as the oracle, on random log-probabilities."""
from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from trainer.dpo.losses import LOSSES, LossParams, PairLogps, dpo_loss, hinge_loss, ipo_loss, orpo_loss, simpo_loss

N_PAIRS = 6


@pytest.fixture(scope="module")
def trl_dpo(tmp_path_factory):
    """A real (tiny, offline) TRL DPOTrainer whose loss code is called with log-probabilities we choose."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", *"abcdef"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], use_cpu=True, bf16=False,
                     save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tok,
                         train_dataset=Dataset.from_list([{"prompt": "ab", "chosen": "cd", "rejected": "ef"}]))
    trainer.precompute_ref_logps = True  # reference log-probs come with the inputs, as ours do
    return trainer


def _trl_pair(trainer, loss_type: str, beta: float, pc, pr, rc, rr, lc: int, lr: int) -> dict[str, float]:
    """TRL's loss and reward metrics for one pair whose summed response log-probs are (pc, pr), lengths (lc, lr)."""
    T = max(lc, lr) + 2
    completion = torch.zeros(2, T + 1, dtype=torch.long)
    completion[0, 1:1 + lc] = 1
    completion[1, 1:1 + lr] = 1
    shifted = completion[:, 1:].float()
    per_token = shifted * torch.stack([pc / lc, pr / lr]).view(2, 1)  # (2, T) summing to (pc, pr)
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros(2, T), mean_logits=torch.zeros(2, T),
                                    is_top1=torch.zeros(2, T, dtype=torch.bool))
    inputs = {"input_ids": torch.zeros(2, T + 1, dtype=torch.long), "attention_mask": torch.ones(2, T + 1),
              "completion_mask": completion, "ref_chosen_logps": rc.view(1), "ref_rejected_logps": rr.view(1)}
    trainer.beta, trainer.loss_types, trainer.loss_weights = beta, [loss_type], [1.0]
    trainer._metrics["train"].clear()
    loss = trainer._compute_loss(lambda **_: outputs, inputs, False)
    m = trainer._metrics["train"]
    return {"loss": loss.item(), "chosen": m["rewards/chosen"][-1], "rejected": m["rewards/rejected"][-1],
            "accuracy": m["rewards/accuracies"][-1], "margin": m["rewards/margins"][-1]}


def _random_logps(seed: int):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(N_PAIRS, generator=g, dtype=torch.float64) * 40 for _ in range(4))
    lc = torch.randint(1, 30, (N_PAIRS,), generator=g)
    lr = torch.randint(1, 30, (N_PAIRS,), generator=g)
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 0.7),
                                            ("hinge", 0.3)])
def test_reference_losses_and_rewards_equal_trl(trl_dpo, loss_type, beta):
    pc, pr, rc, rr, lc, lr = _random_logps(seed=int(beta * 10))
    logps = PairLogps(pc, pr, lc, lr, rc, rr)
    losses, chosen_r, rejected_r = LOSSES[loss_type].fn(logps, LossParams(beta=beta))
    assert losses.shape == (N_PAIRS,)
    for i in range(N_PAIRS):
        ref = _trl_pair(trl_dpo, loss_type, beta, pc[i], pr[i], rc[i], rr[i], int(lc[i]), int(lr[i]))
        assert losses[i].item() == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
        assert chosen_r[i].item() == pytest.approx(ref["chosen"], rel=1e-5, abs=1e-6)
        assert rejected_r[i].item() == pytest.approx(ref["rejected"], rel=1e-5, abs=1e-6)
        assert (chosen_r[i] > rejected_r[i]).item() == bool(ref["accuracy"])
        assert (chosen_r[i] - rejected_r[i]).item() == pytest.approx(ref["margin"], rel=1e-4, abs=1e-5)
    # The case that makes IPO differ from DPO: its gap is per token, so length matters.
    if loss_type == "ipo":
        longer = ipo_loss(pc, pr, rc, rr, lc * 2, lr, beta=beta)[0]
        assert not torch.allclose(longer, losses)


def test_conservative_dpo_is_the_label_flip_mixture_of_trl_sigmoid(trl_dpo):
    eps, beta = 0.2, 0.25
    pc, pr, rc, rr, lc, lr = _random_logps(seed=7)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(N_PAIRS):
        straight = _trl_pair(trl_dpo, "sigmoid", beta, pc[i], pr[i], rc[i], rr[i], 1, 1)["loss"]
        flipped = _trl_pair(trl_dpo, "sigmoid", beta, pr[i], pc[i], rr[i], rc[i], 1, 1)["loss"]
        assert losses[i].item() == pytest.approx((1 - eps) * straight + eps * flipped, rel=1e-5)


def test_simpo_and_orpo_equal_trl_reference_free_trainers():
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, _, _, lc, lr = _random_logps(seed=3)
    beta, gamma, eps = 2.0, 0.7, 0.1
    cpu = types.SimpleNamespace(device=torch.device("cpu"))
    # Both TRL trainers take per-token average log-probs (their `average_log_prob` path for these losses).
    cpo_self = types.SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo",
                                     alpha=0.0, accelerator=cpu)
    want, want_c, want_r = CPOTrainer.cpo_loss(cpo_self, pc / lc, pr / lr)
    got, got_c, got_r = simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma, label_smoothing=eps)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_c, want_c)
    torch.testing.assert_close(got_r, want_r)

    lam = 0.25
    pc, pr = pc.float(), pr.float()  # TRL's ORPO computes in float32
    orpo_self = types.SimpleNamespace(beta=lam, accelerator=cpu)
    ratio_term, want_c, want_r, *_ = ORPOTrainer.odds_ratio_loss(orpo_self, pc / lc, pr / lr)
    got, got_c, got_r = orpo_loss(pc, pr, lc, lr, beta=lam)
    # ORPO = NLL(chosen) - lambda * log sigmoid(log odds); TRL returns the second term's negation.
    torch.testing.assert_close(got, -(pc / lc) - ratio_term)
    torch.testing.assert_close(got_c, want_c)
    torch.testing.assert_close(got_r, want_r)


def test_orpo_is_finite_near_probability_one():
    tiny = torch.tensor([-1e-7, -1e-3], dtype=torch.float32)
    losses, _, _ = orpo_loss(tiny, torch.tensor([-5.0, -5.0]), torch.ones(2), torch.ones(2), beta=0.1)
    assert torch.isfinite(losses).all()


def test_gradients_push_chosen_up_and_rejected_down():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    ref = torch.tensor([-10.0])
    for fn in (lambda: dpo_loss(pc, pr, ref, ref, beta=0.1)[0], lambda: hinge_loss(pc, pr, ref, ref, beta=0.1)[0],
               lambda: ipo_loss(pc, pr, ref, ref, torch.ones(1), torch.ones(1), beta=0.1)[0],
               lambda: simpo_loss(pc, pr, torch.ones(1), torch.ones(1), beta=2.0, gamma=0.5)[0]):
        pc.grad = pr.grad = None
        fn().sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item()


def test_dpo_at_equal_policy_and_reference_is_log_two():
    x = torch.tensor([-3.0, -20.0])
    losses, c, r = dpo_loss(x, x + 1, x, x + 1, beta=0.5)
    torch.testing.assert_close(losses, torch.full((2,), F.softplus(torch.tensor(0.0)).item()))
    assert c.abs().max() == 0 and r.abs().max() == 0
