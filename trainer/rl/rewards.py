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
    wants_messages: bool = False  # also called with `prompt_messages` (the whole prompt conversations)

    @property
    def short_name(self) -> str:
        return "reward_model" if self.wants_messages else self.name.rsplit(":", 1)[-1]


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
          fields: dict[str, list[Any]], where: list[str], messages: list[list[dict]] | None = None) -> torch.Tensor:
    """(N, F) float32 rewards, one column per function, each checked: N finite numbers."""
    columns = []
    for f in functions:
        extra = {"prompt_messages": messages} if f.wants_messages else {}
        try:
            values = f.fn(prompts=prompts, completions=completions, **fields, **extra)
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


class RewardModelScores:
    """A reward model as a reward: each prompt conversation + completion rendered and tokenized by the
    reward model's OWN tokenizer and chat template, exactly as `launch/score.py` and reward training
    render a pair, and scored at its last token. Policy token ids never reach it, so the two tokenizers
    may differ."""

    def __init__(self, path: str, device: torch.device, dtype: torch.dtype, batch_size: int):
        from trainer.data.tokenizer import load_tokenizer
        from trainer.score import find_classifier, length_limits, load_scoring_model

        source = find_classifier(path)
        if source.num_labels != 1:
            raise ConfigError(f"defaults: rl.reward_model.path: {path} scores {source.num_labels} labels; a reward "
                              "model has one")
        if source.tokenizer is None:
            raise ConfigError(f"defaults: rl.reward_model.path: {path} has no tokenizer to render text with")
        self.tokenizer = load_tokenizer(source.tokenizer)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_len, self.max_prompt_len = length_limits(source, None, None)
        self.model = load_scoring_model(source, device, dtype)
        self.batch_size = batch_size

    def __call__(self, prompts, completions, prompt_messages, **_):
        from trainer.dpo.data import PreferencePair
        from trainer.score import ScoreReport, ScoreRow, score_sequences, tokenize_score_rows

        rows = [ScoreRow(where="", row={}, pair=PreferencePair(m, c, c)) for m, c in zip(prompt_messages, completions)]
        seqs = tokenize_score_rows(self.tokenizer, rows, max_len=self.max_len, max_prompt_len=self.max_prompt_len,
                                   chat_template="auto", report=ScoreReport())
        logits = score_sequences(self.model, seqs, batch_size=self.batch_size, pad_id=self.tokenizer.pad_token_id)
        return logits[:, 0].tolist()


def reward_model_function(section, device: torch.device, dtype: torch.dtype) -> RewardFunction:
    scorer = RewardModelScores(section.path, device, dtype, section.batch_size)
    return RewardFunction(f"reward_model:{section.path}", section.weight, scorer, wants_messages=True)
