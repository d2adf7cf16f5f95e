"""Preference inputs -> (prompt, chosen, rejected) conversations -> token pairs.

Row shapes (told apart by their keys):
  explicit      {"prompt": str | messages, "chosen": str | [assistant message], "rejected": ...}
  transcript    {"chosen": str, "rejected": str}: two whole dialogues ("\\n\\nHuman: ...\\n\\nAssistant: ...",
                the hh-rlhf shape) that share a prefix; the prompt is everything up to and including the
                last "Assistant:" marker they share, the responses are what follows it in each
  conversation  {"chosen": messages, "rejected": messages} sharing leading messages; the prompt is the shared
                part, each response the one assistant message after it

Pairs that cannot teach a preference are counted and handled as configured, never silently:
identical responses, an empty prompt or response (`on_identical`/`on_empty`: drop or error), and
pairs over the length limits (`overlong`: truncate, drop or error). Malformed rows raise
`DataError` naming `file:line`, or are skipped and counted with `skip_bad_rows`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.chat import ChatFormatError, Message, tokenize_conversation
from trainer.data.sources import DataError
from trainer.objectives import IGNORE_INDEX
from trainer.sft.data import iter_rows

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = ("system", "user", "assistant")

Overlong = Literal["truncate", "drop", "error"]
Unusable = Literal["drop", "error"]


@dataclass
class PreferencePair:
    """One preference: a prompt conversation and two single-message assistant responses."""

    prompt: list[Message]
    chosen: str
    rejected: str
    where: str = ""
    margin: float = 0.0  # how much better chosen is, when the data says (reward models subtract it)


@dataclass
class TokenPair:
    """Token ids of the shared prompt (rendered up to the assistant header) and of each response."""

    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    margin: float = 0.0

    @property
    def longest(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairReport:
    """What reading and tokenizing found; printed at the start of a run."""

    rows: int = 0
    pairs: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    skipped_rows: int = 0
    identical: int = 0
    empty: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    examples: list[str] = field(default_factory=list)

    def note(self, where: str, problem: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {problem}")

    def summary(self) -> str:
        parts = [f"{self.rows} rows -> {self.pairs} pairs",
                 "shapes " + ", ".join(f"{k}: {v}" for k, v in sorted(self.shapes.items()))]
        for count, what in ((self.identical, "identical responses dropped"), (self.empty, "empty dropped"),
                            (self.truncated, "truncated to the length limits"),
                            (self.dropped_overlong, "over-long dropped"),
                            (self.skipped_rows, "malformed rows skipped")):
            if count:
                parts.append(f"{count} {what}")
        if self.examples:
            parts.append(f"e.g. {self.examples[0]}")
        return " | ".join(parts)


# ----------------------------------------------------------------------------- row shapes


def split_transcript(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two transcripts, split after the last shared
    "Assistant:" marker."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise ChatFormatError(f"'chosen' and 'rejected' share no '{ASSISTANT.strip()}' turn to split the prompt at")
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def transcript_messages(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user/assistant messages (the
    trailing empty assistant marker is the generation prompt, not a turn)."""
    pieces = _TURN.split(text)
    messages: list[Message] = []
    if pieces[0].strip():
        messages.append({"role": "system", "content": pieces[0].strip()})
    for speaker, content in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _messages(value: Any, key: str) -> list[Message]:
    if not isinstance(value, list):
        raise ChatFormatError(f"'{key}' must be a string or a list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"{key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise ChatFormatError(f"{key}[{i}].role '{m['role']}' is not one of {', '.join(_ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"{key}[{i}].content must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    messages = _messages(value, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ChatFormatError(f"'{key}' must be a string or a list of exactly one assistant message")
    return messages[0]["content"]


def parse_row(row: Any) -> tuple[str, PreferencePair]:
    """The shape a row was read as, and its preference pair (with the row's `margin`, if it has one)."""
    shape, pair = _parse_pair(row)
    margin = row.get("margin")
    if margin is not None:
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
            raise ChatFormatError(f"'margin' must be a number, got {margin!r}")
        pair.margin = float(margin)
    return shape, pair


def _parse_pair(row: Any) -> tuple[str, PreferencePair]:
    if not isinstance(row, dict):
        raise ChatFormatError(getattr(row, "problem", None) or f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row or row[k] is None]
    if missing:
        raise ChatFormatError(f"missing {' and '.join(repr(k) for k in missing)} "
                              "(expected prompt/chosen/rejected, or chosen/rejected transcripts)")
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")
        return "explicit", PreferencePair(messages, _response(chosen, "chosen"), _response(rejected, "rejected"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        prompt_text, c, r = split_transcript(chosen, rejected)
        return "transcript", PreferencePair(transcript_messages(prompt_text), c.strip(), r.strip())
    c_msgs, r_msgs = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared = 0
    while shared < min(len(c_msgs), len(r_msgs)) - 1 and c_msgs[shared] == r_msgs[shared]:
        shared += 1
    c_rest, r_rest = c_msgs[shared:], r_msgs[shared:]
    if len(c_rest) != 1 or len(r_rest) != 1 or c_rest[0]["role"] != "assistant" or r_rest[0]["role"] != "assistant":
        raise ChatFormatError("'chosen' and 'rejected' conversations must differ only in their last message, "
                              "an assistant turn")
    return "conversation", PreferencePair(c_msgs[:shared], c_rest[0]["content"], r_rest[0]["content"])


def _unusable(pair: PreferencePair) -> tuple[str, str] | None:
    """(kind, description) when the pair cannot teach a preference."""
    if not pair.prompt or not any(m["content"].strip() for m in pair.prompt):
        return "empty", "empty prompt"
    if not pair.chosen.strip() or not pair.rejected.strip():
        return "empty", "empty chosen or rejected response"
    if pair.chosen.strip() == pair.rejected.strip():
        return "identical", "chosen and rejected responses are identical"
    return None


def load_pairs(files: list[str | Path], *, skip_bad_rows: bool = False, on_identical: Unusable = "drop",
               on_empty: Unusable = "drop", report: PairReport | None = None,
               key: str | None = None, section: str = "dpo") -> list[PreferencePair]:
    """Every usable preference pair in `files`, in order; the rest counted in `report` or raised as DataError.
    `section` is the task's config section (dpo, reward, ...), named in messages."""
    key = key or f"{section}.train_files"
    if not files:
        raise DataError(f"{key}: no input files given")
    report = report if report is not None else PairReport()
    policy = {"identical": on_identical, "empty": on_empty}
    pairs = []
    for file in files:
        for where, row in iter_rows(file):
            report.rows += 1
            try:
                shape, pair = parse_row(row)
            except ChatFormatError as err:
                if not skip_bad_rows:
                    raise DataError(f"{where}: {err} (set {section}.skip_bad_rows=true to skip such rows)") from None
                report.skipped_rows += 1
                report.note(where, str(err))
                continue
            problem = _unusable(pair)
            if problem is not None:
                kind, text = problem
                if policy[kind] == "error":
                    raise DataError(f"{where}: {text} (set {section}.on_{kind}=drop to drop and count such pairs)")
                setattr(report, kind, getattr(report, kind) + 1)
                report.note(where, text)
                continue
            report.shapes[shape] = report.shapes.get(shape, 0) + 1
            pair.where = where
            pairs.append(pair)
    report.pairs = len(pairs)
    return pairs


# ----------------------------------------------------------------------------- tokenizing


def _prompt_and_response(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """Split a tokenized conversation at its last assistant turn: the final run of target tokens."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids[:start], ids[start:end]


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, pair: PreferencePair) -> TokenPair:
    """Prompt ids (through the assistant header) and each response's ids (content + end-of-turn token)."""
    sides = []
    for response in (pair.chosen, pair.rejected):
        enc = tokenize_conversation(tokenizer, pair.prompt + [{"role": "assistant", "content": response}])
        sides.append(_prompt_and_response(enc["input_ids"], enc["labels"]))
    (prompt_c, chosen), (prompt_r, rejected) = sides
    if prompt_c != prompt_r:
        raise ChatFormatError("the chat template renders the shared prompt differently for chosen and rejected")
    as_array = lambda ids: np.asarray(ids, dtype=np.int64)  # noqa: E731
    return TokenPair(as_array(prompt_c), as_array(chosen), as_array(rejected), pair.margin)


def fit_lengths(pair: TokenPair, max_len: int, max_prompt_len: int) -> TokenPair:
    """Keep the prompt's last `max_prompt_len` tokens (the turn being answered), then cut each response
    so prompt + response fits `max_len`."""
    prompt = pair.prompt[-max_prompt_len:]
    room = max_len - len(prompt)
    return TokenPair(prompt, pair.chosen[:room], pair.rejected[:room], pair.margin)


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], *, max_len: int,
                   max_prompt_len: int, overlong: Overlong = "truncate",
                   report: PairReport | None = None, section: str = "dpo") -> list[TokenPair]:
    """Token pairs within the limits; over-long pairs truncated, dropped or refused (and counted)."""
    if not 0 < max_prompt_len < max_len:
        raise DataError(f"{section}.max_prompt_len ({max_prompt_len}) must be positive and below data.seq_len ({max_len})")
    report = report if report is not None else PairReport()
    out = []
    for pair in pairs:
        try:
            tokens = tokenize_pair(tokenizer, pair)
        except ChatFormatError as err:
            raise DataError(f"{pair.where}: {err}") from None
        if len(tokens.prompt) > max_prompt_len or tokens.longest > max_len:
            if overlong == "error":
                raise DataError(f"{pair.where}: pair has {len(tokens.prompt)} prompt and {tokens.longest} total "
                                f"tokens, over {section}.max_prompt_len={max_prompt_len} or data.seq_len={max_len}")
            if overlong == "drop":
                report.dropped_overlong += 1
                report.note(pair.where, "over the length limits")
                continue
            report.truncated += 1
            tokens = fit_lengths(tokens, max_len, max_prompt_len)
        out.append(tokens)
    report.pairs = len(out)
    return out


def load_token_pairs(files: list[str | Path], tokenizer: PreTrainedTokenizerBase, *, max_len: int,
                     max_prompt_len: int, overlong: Overlong = "truncate", on_identical: Unusable = "drop",
                     on_empty: Unusable = "drop", skip_bad_rows: bool = False,
                     key: str | None = None, section: str = "dpo") -> tuple[list[TokenPair], PairReport]:
    """Read, validate and tokenize preference files; the report counts every pair not used as given."""
    report = PairReport()
    pairs = load_pairs(files, skip_bad_rows=skip_bad_rows, on_identical=on_identical, on_empty=on_empty,
                       report=report, key=key, section=section)
    tokens = tokenize_pairs(tokenizer, pairs, max_len=max_len, max_prompt_len=max_prompt_len, overlong=overlong,
                            report=report, section=section)
    if not tokens:
        raise DataError(f"{', '.join(map(str, files))}: no usable preference pair ({report.summary()})")
    return tokens, report


@dataclass
class PreferenceData:
    train: list[TokenPair]
    val: list[TokenPair] | None
    train_report: PairReport
    val_report: PairReport | None

    def report_lines(self, section: str) -> list[str]:
        """What was read, as a pairwise task prints it under its banner."""
        lines = [f"train pairs: {self.train_report.summary()}"]
        if self.val_report is not None:
            lines.append(f"val pairs: {self.val_report.summary()}")
        elif self.val:
            lines.append(f"val pairs: {len(self.val)} held out of the train files ({section}.val_fraction)")
        return lines


def load_preference_data(d, tokenizer, *, seq_len: int, seed: int, section: str) -> PreferenceData:
    """Train and validation token pairs of a pair-data section (`dpo`, `reward`, ...); without `val_files`,
    `val_fraction` of the pairs (a fixed seeded draw) is held out."""
    common = dict(max_len=seq_len, max_prompt_len=d.max_prompt_len, overlong=d.overlong, section=section,
                  on_identical=d.on_identical, on_empty=d.on_empty, skip_bad_rows=d.skip_bad_rows)
    train_pairs, train_report = load_token_pairs(d.train_files, tokenizer, **common)
    if d.val_files:
        val_pairs, val_report = load_token_pairs(d.val_files, tokenizer, key=f"{section}.val_files", **common)
        return PreferenceData(train_pairs, val_pairs, train_report, val_report)
    if d.val_fraction > 0:
        order = np.random.default_rng([seed, 1]).permutation(len(train_pairs))
        n_val = max(1, int(len(train_pairs) * d.val_fraction))
        held = set(order[:n_val].tolist())
        val = [p for i, p in enumerate(train_pairs) if i in held]
        train = [p for i, p in enumerate(train_pairs) if i not in held]
        return PreferenceData(train, val, train_report, None)
    return PreferenceData(train_pairs, None, train_report, None)
