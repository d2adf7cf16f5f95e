"""Reward functions the RL tests name in their configs (module:function)."""
from __future__ import annotations

from trainer.rl.demo_rewards import arithmetic_exact  # noqa: F401  (named by the configs)


def digits(prompts, completions, **_):
    """A dense reward a random tiny model can improve on: the share of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def uses_answer(prompts, completions, answer, **_):
    assert len(answer) == len(completions)
    return [1.0 if a in c else 0.0 for a, c in zip(answer, completions)]


def raises(prompts, completions, **_):
    raise RuntimeError("reward server down")


def wrong_count(prompts, completions, **_):
    return [0.0]


def not_finite(prompts, completions, **_):
    return [float("nan")] * len(completions)
