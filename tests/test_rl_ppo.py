"""PPO: the rollout's targets (log-probs, values, KL-penalized rewards, GAE, whitening) against a plain loop,
and one run through the real CLI that checkpoints, resumes bitwise and leaves the value head beside the policy."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.sft_fixtures import tiny_model
from tests.test_rl import _config, _run, _train_rows, work  # noqa: F401  (work: the shared RL fixture)
from tests.test_rl_losses import _Ranks
from trainer.objectives import IGNORE_INDEX
from trainer.rl.losses import ppo_advantages
from trainer.rl.objective import logps_and_values, per_token_logps
from trainer.rl.rollout import training_rows
from trainer.rl.value_head import add_value_head, split_value_head


def _plain_targets(model, ref, prompts, completions, scores, *, temperature, beta, gamma, lam, whiten_rewards):
    """One row at a time, one token at a time, in Python floats: what PPO's rollout must produce."""
    rows = []
    for p, c, score in zip(prompts, completions, scores):
        seq = torch.from_numpy(np.concatenate([p, c]))[None]
        h = model(seq, return_hidden=True)[0]
        logp = (model.output(h) / temperature).log_softmax(-1)
        ref_logp = (ref(seq)[0] / temperature).log_softmax(-1)
        steps = []
        for j, token in enumerate(c):
            pos = len(p) - 1 + j  # the hidden state that predicts completion token j
            lp, rp = logp[pos, token].item(), ref_logp[pos, token].item()
            steps.append({"logp": lp, "value": model.value_head(h[pos]).item(), "reward": -beta * (lp - rp)})
        steps[-1]["reward"] += score
        rows.append(steps)
    flat = [s for row in rows for s in row]

    def whiten(key, keep_mean):
        xs = [s[key] for s in flat]
        mean = sum(xs) / len(xs)
        std = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) + 1e-8) ** 0.5
        for s in flat:
            s[key] = (s[key] - mean) / std + (mean if keep_mean else 0.0)

    if whiten_rewards:
        whiten("reward", keep_mean=True)
    for steps in rows:
        running = 0.0
        for t in reversed(range(len(steps))):
            next_value = steps[t + 1]["value"] if t + 1 < len(steps) else 0.0
            running = steps[t]["reward"] + gamma * next_value - steps[t]["value"] + gamma * lam * running
            steps[t]["advantage"], steps[t]["return"] = running, running + steps[t]["value"]
    whiten("advantage", keep_mean=False)
    return rows


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("whiten_rewards", [False, True])
def test_ppo_rollout_targets_equal_a_plain_loop(whiten_rewards, ranks):
    """Rows of different prompt and completion lengths (so the completion tokens start at different
    columns): log-probs and values from one forward, rewards with the score on each last token minus the
    per-token KL penalty, GAE and whitening, all equal to the one-token-at-a-time loop. On 2 ranks (row 0 on
    one, rows 1-2 on the other) the whitening is over the whole buffer, as the loop over all rows does."""
    model, ref = tiny_model(64, seed=0).eval(), tiny_model(64, seed=1).eval()
    add_value_head(model)
    torch.nn.init.normal_(model.value_head.weight, std=0.5)  # a trained head: values that matter
    prompts = [np.array([5, 9, 11]), np.array([7]), np.array([3, 4, 5, 6])]
    completions = [np.array([20, 21]), np.array([30, 31, 32, 33]), np.array([40, 41, 42])]
    scores = torch.tensor([1.0, -0.5, 0.25])
    knobs = {"temperature": 0.7, "beta": 0.1, "gamma": 0.9, "lam": 0.8, "whiten_rewards": whiten_rewards}
    batch = training_rows(prompts, completions, pad_id=0)
    with torch.no_grad():
        logps, _, values = logps_and_values(model, batch["input_ids"], batch["labels"], temperature=0.7)
        ref_logps, _ = per_token_logps(ref, batch["input_ids"], batch["labels"], temperature=0.7)
        mask = batch["labels"] != IGNORE_INDEX
        args = {k: v for k, v in knobs.items() if k != "temperature"}
        if ranks == 1:
            rewards, advantages, returns = ppo_advantages(scores, logps, ref_logps, values, mask, **args)
        else:
            shares = _Ranks(2).run(lambda rows, all_sum: ppo_advantages(
                scores[rows], logps[rows], ref_logps[rows], values[rows], mask[rows], all_sum=all_sum, **args),
                slice(0, 1), slice(1, 3))
            rewards, advantages, returns = (torch.cat(parts) for parts in zip(*shares))
        expected = _plain_targets(model, ref, prompts, completions, scores.tolist(), **knobs)
    for b, (p, steps) in enumerate(zip(prompts, expected)):
        for j, step in enumerate(steps):
            pos = len(p) - 1 + j
            assert mask[b, pos]
            for key, got in (("logp", logps), ("value", values), ("reward", rewards), ("advantage", advantages),
                             ("return", returns)):
                assert got[b, pos].item() == pytest.approx(step[key], abs=1e-5), (b, j, key)
    for got in (values, rewards, advantages, returns):
        assert (got[~mask] == 0).all()


def test_ppo_and_grpo_settings_that_do_not_fit_are_config_problems():
    from trainer.rl.config import RLConfig, rl_config_problems

    def problems(**rl):
        return rl_config_problems(RLConfig(rl={"train_files": ["t.jsonl"], "rewards": [{"function": "m:f"}], **rl}))

    assert problems(algorithm="ppo", num_generations=1) == []
    assert problems(algorithm="grpo", num_generations=1) == [
        "defaults: rl.num_generations: grpo needs at least 2 completions per prompt (a group), got 1"]
    assert problems(algorithm="ppo", num_generations=1, epsilon_high=0.28) == [
        "defaults: rl.epsilon_high: GRPO's clip-higher; ppo clips both sides with rl.epsilon"]


@pytest.mark.slow
def test_ppo_run_resumes_bitwise_and_saves_the_value_head(work):  # noqa: F811
    """Six PPO steps, one completion per prompt, four steps per rollout buffer (rl.epochs 2 x rl.minibatches
    2), KL penalty to a resident reference, whitened rewards. Resuming from step 3 restores the half-used
    buffer and the value head: steps 4-6 and the final policy and value head equal the straight run's."""
    from safetensors.torch import load_file

    out = work / "ppo"
    config = _config(work, out, algorithm="ppo", num_generations=1, minibatches=2, beta=0.05,
                     whiten_rewards=True, vf_coef=0.5)
    log = _run(["--config", str(config)]).stdout
    assert "held-out prompts (greedy), step 0 -> step 6: reward" in log
    straight = _train_rows(out)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert [("rollout_reward_mean" in straight[s]) for s in range(1, 7)] == [True, False, False, False, True, False]
    assert "rollout_zero_std_groups" not in straight[1]
    for step in straight.values():
        assert step["value_loss"] > 0 and step["kl"] is not None and 0 <= step["clip_fraction"] <= 1
    assert straight[1]["clip_fraction"] == 0  # the first update of a buffer: ratio 1 everywhere
    assert any(straight[s]["value_clip_fraction"] > 0 or straight[s]["clip_fraction"] > 0 for s in (2, 3, 4))
    policy = load_file(out / "model" / "model.safetensors")
    head = load_file(out / "value_head" / "value_head.safetensors")["weight"]
    assert head.shape == (1, 32) and head.abs().sum() > 0  # zero-initialized, then trained
    assert not any("value_head" in k for k in policy)
    ckpt = load_file(out / "checkpoints" / "step_00000006" / "model.safetensors")
    assert torch.equal(split_value_head(ckpt)[1]["value_head.weight"], head)

    for later in ("step_00000004", "step_00000005", "step_00000006"):
        shutil.rmtree(out / "checkpoints" / later)
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["loader"]["position"] == 6 and "old_values" in state["loader"]["buffer"]
    (out / "COMPLETED").unlink()
    (out / "metrics.jsonl").write_text("")
    shutil.rmtree(out / "model")
    _run(["--config", str(config), "--resume", "auto"])
    resumed = _train_rows(out)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "reward", "kl", "value_loss", "policy_loss", "entropy"):
            assert resumed[step][key] == straight[step][key], (step, key)
    again = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(policy[k], again[k]) for k in policy)
    assert torch.equal(load_file(out / "value_head" / "value_head.safetensors")["weight"], head)


@pytest.mark.slow
def test_ppo_two_ranks_zero3(work):  # noqa: F811
    """2-rank CPU ZeRO-3: the value head is sharded like every other weight, gathered for the rollout's and
    the update's forwards, and consolidated into value_head/ at the end."""
    from safetensors.torch import load_file

    from tests.pretrain_run import launch_command, metrics, run

    out = work / "ppo_zero3"
    config = _config(work, out, algorithm="ppo", num_generations=1, beta=0.05, epochs=1, val_files=[])
    run(launch_command("rl.py", ["--config", str(config), "train.max_steps=2", "checkpoint.every=2",
                                 "train.eval_at_start=false"], ranks=2, zero_stage=3))
    train = metrics(out)
    assert [r["step"] for r in train] == [1, 2] and all(r["world_size"] == 2 for r in train)
    assert all(r["value_loss"] > 0 and r["rollout_tokens_per_s"] > 0 for r in train)
    assert train[1]["kl"] != 0  # step 2 sampled with updated weights, scored against the untouched copy
    head = load_file(out / "value_head" / "value_head.safetensors")["weight"]
    assert head.shape == (1, 32) and head.abs().sum() > 0


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_per_token_figures_are_global_token_means(algorithm):
    """Entropy, KL, clip fractions (and PPO's values): summed per token with their token count, so the
    loop's sums over micro-batches (or ranks) give the mean over every completion token of the step, not a
    mean of per-completion (or per-rank) means. Rows of 2, 4 and 1 tokens, split 1 + 2 as two ranks."""
    from trainer.loop import summarize
    from trainer.rl.config import RLSection
    from trainer.rl.objective import GRPOObjective, PPOObjective

    model = tiny_model(64, seed=0).eval()
    add_value_head(model)
    torch.nn.init.normal_(model.value_head.weight, std=0.5)
    batch = training_rows([np.array([5, 9, 11]), np.array([7]), np.array([3, 4, 5, 6])],
                          [np.array([20, 21]), np.array([30, 31, 32, 33]), np.array([40])], pad_id=0)
    mask = batch["labels"] != IGNORE_INDEX
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logps, entropy, values = logps_and_values(model, batch["input_ids"], batch["labels"], temperature=0.7,
                                                  entropy=True)

    def noise():
        return torch.randn(mask.shape, generator=gen) * mask

    batch.update(old_logps=logps + 0.3 * noise(), ref_logps=logps + noise(), old_values=values + noise(),
                 returns=noise(), advantages=noise() if algorithm == "ppo" else torch.tensor([1.0, -1.0, 0.5]),
                 rewards=torch.tensor([1.0, 0.0, 0.5]))
    rl = RLSection(algorithm=algorithm, temperature=0.7, epsilon=0.1, beta=0.04, reference="resident")
    objective = (PPOObjective if algorithm == "ppo" else GRPOObjective)(rl)
    totals: dict[str, float] = {}
    for rows in (slice(0, 1), slice(1, 3)):
        with torch.no_grad():
            _, stats = objective(model, {k: v[rows] for k, v in batch.items()})
        for k, v in stats.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    got = summarize(totals)

    def token_mean(x):
        return float((x * mask).sum() / mask.sum())

    kl = batch["old_logps"] - batch["ref_logps"] if algorithm == "ppo" else (
        torch.exp(batch["ref_logps"] - logps) - (batch["ref_logps"] - logps) - 1)
    assert got["entropy"] == pytest.approx(token_mean(entropy), rel=1e-5)
    assert got["kl"] == pytest.approx(token_mean(kl), rel=1e-4, abs=1e-6)
    assert got["response_length"] == pytest.approx(7 / 3)
    completion_means = float(((kl * mask).sum(1) / mask.sum(1)).mean())
    assert got["kl"] != pytest.approx(completion_means, rel=1e-3)  # the old per-completion figure
    if algorithm == "ppo":
        assert got["value"] == pytest.approx(token_mean(values), rel=1e-5)
        ratio = torch.exp(logps - batch["old_logps"])
        clipped = (-batch["advantages"] * ratio.clamp(0.9, 1.1)) > (-batch["advantages"] * ratio)
        assert got["clip_fraction"] == pytest.approx(token_mean(clipped.float()), abs=1e-6)
        assert 0 < got["clip_fraction"] < 1
