"""Python reward functions named in the config (`module:function`), combined with weights.

A function is called as `fn(prompts=[...], completions=[...], **fields)`: `prompts` are the prompt rows'
texts (their last user message for chats), `completions` the decoded completions, and every other key of
the prompt rows arrives as a list aligned with them (`answer=[...]`). It returns one finite number per
completion. Anything else is a one-line error that names the function (and the row, where there is one).
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from trainer.config import ConfigError


@dataclass
class RewardFunction:
    name: str  # module:function as configured
    weight: float
    fn: Callable[..., Sequence[float]]

    @property
    def short_name(self) -> str:
        return self.name.rsplit(":", 1)[-1]


def load_reward_function(spec: str, weight: float, key: str) -> RewardFunction:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"defaults: {key}: '{spec}' is not of the form module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an import error of any kind inside the user's module
        raise ConfigError(f"defaults: {key}: cannot import module '{module_name}' "
                          f"({type(err).__name__}: {err})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"defaults: {key}: module '{module_name}' has no function '{attr}'")
    return RewardFunction(spec, weight, fn)


def load_reward_functions(sections) -> list[RewardFunction]:
    return [load_reward_function(s.function, s.weight, f"rl.rewards[{i}].function") for i, s in enumerate(sections)]


def score(functions: Sequence[RewardFunction], prompts: list[str], completions: list[str],
          fields: dict[str, list[Any]], where: list[str]) -> torch.Tensor:
    """(N, F) float32 rewards, one column per function, each checked: N finite numbers."""
    columns = []
    for f in functions:
        try:
            values = f.fn(prompts=prompts, completions=completions, **fields)
        except Exception as err:
            raise ValueError(f"reward function {f.name} raised {type(err).__name__}: {err} "
                             f"(first row {where[0]})") from None
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"reward function {f.name} must return a list of numbers, got "
                             f"{type(values).__name__}") from None
        if len(values) != len(completions):
            raise ValueError(f"reward function {f.name} returned {len(values)} values for {len(completions)} "
                             f"completions")
        for i, v in enumerate(values):
            if not math.isfinite(v):
                raise ValueError(f"reward function {f.name} returned {v} for row {where[i]}")
        columns.append(values)
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(completions), len(functions))


def combine(per_function: torch.Tensor, functions: Sequence[RewardFunction]) -> torch.Tensor:
    weights = torch.tensor([f.weight for f in functions], dtype=torch.float32)
    return (per_function * weights).sum(dim=1)
