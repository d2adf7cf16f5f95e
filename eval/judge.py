"""Judges of two models' answers to the same prompts.

Pairwise LLM-as-judge: any local chat model reads the question and both answers and is asked which is
better. Its verdict is read from its next-token probabilities for "1" and "2" (no sampling, no
parsing of free text), and every pair is judged in both orders: an answer wins only when it wins in
both, so a judge that prefers a position produces ties, not wins. Win, tie and loss rates come with a
percentile bootstrap interval over prompts.

Reward model as judge: a reward model (launch/reward.py) scores each answer; mean scores and the share
of prompts where A scores above B, with the same bootstrap interval.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

JUDGE_QUESTION = ("Here is a question and two answers.\n\nQuestion: {prompt}\n\nAnswer 1: {first}\n\n"
                  "Answer 2: {second}\n\nWhich answer is more correct and helpful? Reply with 1 or 2.")


@dataclass
class Interval:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def bootstrap(outcomes: Sequence[float], samples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Mean of per-prompt outcomes with a percentile bootstrap interval (prompts resampled with replacement)."""
    values = np.asarray(outcomes, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no outcomes to bootstrap")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(samples, values.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return Interval(float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def combine_orders(a_first: Sequence[int], a_second: Sequence[int]) -> list[int]:
    """Per prompt: +1 when A wins in both orders, -1 when B does, 0 otherwise.

    `a_first[i]` is the judge's choice (1 or 2) with A shown first, `a_second[i]` with A shown second."""
    outcomes = []
    for first, second in zip(a_first, a_second, strict=True):
        a_wins, b_wins = (first == 1) + (second == 2), (first == 2) + (second == 1)
        outcomes.append(1 if a_wins == 2 else -1 if b_wins == 2 else 0)
    return outcomes


def rates(outcomes: Sequence[int], samples: int = 2000, seed: int = 0) -> dict[str, Any]:
    arr = np.asarray(outcomes)
    return {"win": bootstrap(arr == 1, samples, seed).as_dict(), "tie": bootstrap(arr == 0, samples, seed).as_dict(),
            "loss": bootstrap(arr == -1, samples, seed).as_dict(), "n": int(arr.size)}


def read_judge_prompts(path: str | Path) -> list[str]:
    """The questions both models answer: JSONL whose rows each hold a `prompt` string (other keys are
    ignored, so a held-out preference-pair file or an IFEval prompt file serves as it is)."""
    import json

    prompts = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{line_no}: not valid JSON (judge prompts are JSONL rows with a 'prompt')") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}:{line_no}: needs 'prompt' as a non-empty string")
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no judge prompts")
    return prompts


def judge_tokenizer(model_path: str | Path, tokenizer_dir: str | Path | None = None):
    """The judge's tokenizer and the ids of its two verdicts; reads no weights, so a judge that cannot
    judge is refused before any model is evaluated."""
    from eval.lm_eval_model import find_tokenizer
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir or find_tokenizer(model_path))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_path}: the judge's tokenizer has no chat template; a judge must be a chat model")
    choices = []
    for label in ("1", "2"):
        ids = tokenizer.encode(label, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{model_path}: the judge's tokenizer splits '{label}' into {len(ids)} tokens")
        choices.append(ids[0])
    return tokenizer, choices


class ChatJudge:
    """A local causal LM with a chat template, answering "1" or "2"."""

    def __init__(self, model_path: str | Path, tokenizer_dir: str | Path | None = None, device: str = "cpu"):
        from trainer.export import load_model

        self.tokenizer, self.choices = judge_tokenizer(model_path, tokenizer_dir)
        try:
            self.model = load_model(model_path).to(device).eval()
        except (OSError, KeyError, RuntimeError) as err:
            raise ValueError(f"{model_path}: the judge cannot be loaded ({str(err).splitlines()[0]})") from None
        self.device = device

    @torch.no_grad()
    def choose(self, prompt: str, first: str, second: str) -> int:
        from trainer.chat import prompt_ids

        ids = prompt_ids(self.tokenizer, [{"role": "user", "content": JUDGE_QUESTION.format(
            prompt=prompt, first=first, second=second)}])
        ids = ids[-self.model.cfg.max_seq_len:]
        logits = self.model(torch.tensor([ids], device=self.device))[0, -1]
        return 1 if logits[self.choices[0]] >= logits[self.choices[1]] else 2


def pairwise(judge: ChatJudge, prompts: Sequence[str], answers_a: Sequence[str], answers_b: Sequence[str],
             samples: int = 2000) -> dict[str, Any]:
    """Win/tie/loss of A against B, both orders judged."""
    a_first = [judge.choose(p, a, b) for p, a, b in zip(prompts, answers_a, answers_b, strict=True)]
    a_second = [judge.choose(p, b, a) for p, a, b in zip(prompts, answers_a, answers_b, strict=True)]
    result = rates(combine_orders(a_first, a_second), samples)
    # How often the verdict follows the position rather than the answer: the bias both orders cancel.
    result["same_position"] = sum(f == s for f, s in zip(a_first, a_second)) / max(len(prompts), 1)
    return result


class RewardJudge:
    """A reward model (one output) scoring each (prompt, answer) as RL rollouts are scored
    (trainer.rl.rewards: its own tokenizer and chat template, as its training rendered pairs).

    Construction reads configs only, so a classifier with several outputs or no tokenizer is refused
    in one line before any model is evaluated; the weights load on the first `scores`."""

    def __init__(self, reward_model: str | Path, batch_size: int = 8, device: str = "cpu"):
        from trainer.score import find_classifier

        self.path, self.batch_size, self.device = str(reward_model), batch_size, torch.device(device)
        source = find_classifier(reward_model)
        if source.num_labels != 1:
            raise ValueError(f"{reward_model}: the model has {source.num_labels} outputs; a reward model has one")
        if source.tokenizer is None:
            raise FileNotFoundError(f"{reward_model}: no tokenizer found beside the reward model")
        self.scorer = None

    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> np.ndarray:
        from trainer.rl.rewards import RewardModelScores

        if self.scorer is None:
            self.scorer = RewardModelScores(self.path, self.device, torch.float32, self.batch_size)
        messages = [[{"role": "user", "content": p}] for p in prompts]
        return np.asarray(self.scorer(prompts, list(answers), messages), dtype=np.float64)


def opponents(labels: Sequence[str], against: str) -> list[tuple[str, str]]:
    """(model, the model it is judged against): every later model against the first (a baseline and its
    variants), or each against the one before it (a pipeline: what each stage added)."""
    if against == "first":
        return [(label, labels[0]) for label in labels[1:]]
    if against == "previous":
        return list(zip(labels[1:], labels[:-1]))
    raise ValueError(f"judge against '{against}': expected 'first' or 'previous'")


def reward_judge(scores_a: np.ndarray, scores_b: np.ndarray, samples: int = 2000) -> dict[str, Any]:
    """Mean reward of each side and A's win rate (ties, equal scores, count as half)."""
    wins = np.where(scores_a > scores_b, 1.0, np.where(scores_a == scores_b, 0.5, 0.0))
    return {"mean_a": bootstrap(scores_a, samples).as_dict(), "mean_b": bootstrap(scores_b, samples).as_dict(),
            "win_rate_a": bootstrap(wins, samples).as_dict(), "n": len(wins)}
