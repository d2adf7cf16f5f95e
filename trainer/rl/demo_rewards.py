"""Verifiable rewards for the demo world's arithmetic questions ("What is 7 + 12?", "Add 7 and 12.")."""
from __future__ import annotations

import re

_QUESTION = re.compile(r"(?:What is (\d+) \+ (\d+)\?|Add (\d+) and (\d+)\.)")
_NUMBER = re.compile(r"-?\d+")


def expected_sum(prompt: str) -> int | None:
    m = _QUESTION.search(prompt)
    if m is None:
        return None
    x, y = (int(g) for g in m.groups() if g is not None)
    return x + y


def arithmetic_exact(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1 when the completion's last number is the sum asked for (the demo answers "x + y = z."), else 0."""
    rewards = []
    for prompt, completion in zip(prompts, completions):
        want = expected_sum(prompt)
        if want is None:
            raise ValueError(f"not an arithmetic question: {prompt!r}")
        numbers = _NUMBER.findall(completion)
        rewards.append(1.0 if numbers and int(numbers[-1]) == want else 0.0)
    return rewards


def arithmetic_format(prompts: list[str], completions: list[str], **_) -> list[float]:
    """1 when the completion has the demo's answer shape `x + y = z.` (a small shaping reward)."""
    return [1.0 if re.fullmatch(r"\s*\d+ \+ \d+ = -?\d+\.\s*", c) else 0.0 for c in completions]
