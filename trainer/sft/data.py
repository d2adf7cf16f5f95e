"""SFT inputs -> conversations -> token examples with assistant-only labels.

Row shapes (`sft.format`, or `auto` to tell them apart by their keys):
  messages           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  alpaca             {"instruction": str, "input": str (optional), "output": str, "system": str (optional)}
  prompt_completion  {"prompt": str | messages, "completion": str | messages}
  self_instruct      {"instruction": str, "instances": [{"input": str, "output": str}, ...]}  (one example per instance)

Inputs are JSONL / JSON files (optionally .gz) or folders written by `datasets.save_to_disk`.
A malformed row raises `DataError` naming `file:line` (`file:row N` for dataset folders),
or is skipped and counted with `skip_bad_rows`.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.chat import ChatFormatError, Message, tokenize_conversation, validate_messages
from trainer.data.sources import DataError
from trainer.objectives import IGNORE_INDEX

FORMATS = ("messages", "alpaca", "prompt_completion", "self_instruct")


@dataclass
class Example:
    """One training sequence: `input_ids` and next-token `labels` (already shifted; IGNORE_INDEX off-target)."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataReport:
    """What reading and tokenizing found; printed at the start of a run."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    skipped_rows: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_target: int = 0
    formats: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.rows} rows -> {self.examples} examples, {self.tokens} tokens "
                 f"({self.target_tokens} trained on)",
                 "formats " + ", ".join(f"{k}: {v}" for k, v in sorted(self.formats.items()))]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the sequence length")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} over-long dropped")
        if self.dropped_no_target:
            parts.append(f"{self.dropped_no_target} dropped with no assistant token left")
        if self.skipped_rows:
            parts.append(f"{self.skipped_rows} malformed rows skipped (e.g. {self.skipped_examples[0]})")
        return " | ".join(parts)


# ----------------------------------------------------------------------------- reading


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of a JSONL/JSON file, a save_to_disk folder or a Hub dataset
    (`owner/name[:config][@split]`, see trainer.hub); `where` is 'file:line' or 'source:row N'."""
    from trainer.hub import hub_dataset_spec, load_hub_dataset

    if hub_dataset_spec(path) is not None:
        for i, row in enumerate(load_hub_dataset(str(path))):
            yield f"{path}:row {i + 1}", row
        return
    path = Path(path)
    if path.is_dir():
        from trainer.data.sources import load_disk_dataset

        for i, row in enumerate(load_disk_dataset(path)):
            yield f"{path}:row {i + 1}", row
        return
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    stem_suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    try:
        with _open_text(path) as f:
            if stem_suffix == ".json":
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(rows, list):
                    raise DataError(f"{path}: a .json input must hold a list of rows")
                for i, row in enumerate(rows):
                    yield f"{path}:row {i + 1}", row
                return
            if stem_suffix not in (".jsonl", ".ndjson"):
                raise DataError(f"{path}: unknown input type (expected .jsonl, .json[.gz] or a save_to_disk folder)")
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{path}:{lineno}", _BadRow(f"not valid JSON ({exc.msg} at column {exc.colno})")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


@dataclass
class _BadRow:
    problem: str


# ----------------------------------------------------------------------------- row shapes


def detect_format(row: dict) -> str:
    if "messages" in row:
        return "messages"
    if "instances" in row:
        return "self_instruct"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise ChatFormatError(f"cannot tell the row's format from its keys ({', '.join(sorted(row)) or 'none'}); "
                          "expected messages, instruction+output, instruction+instances or prompt+completion")


def _text(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise ChatFormatError(f"missing '{key}'")
        return ""
    if not isinstance(row[key], str):
        raise ChatFormatError(f"'{key}' is {type(row[key]).__name__}, expected a string")
    return row[key]


def _user_turn(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def _system(row: dict) -> list[Message]:
    system = _text(row, "system", required=False)
    return [{"role": "system", "content": system}] if system else []


def _as_messages(value: Any, role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise ChatFormatError(f"expected a string or a list of messages for the {role} side, got {type(value).__name__}")


def row_conversations(row: Any, fmt: str = "auto") -> tuple[str, list[list[Message]]]:
    """The conversation(s) one row holds, and the format it was read as."""
    if not isinstance(row, dict):
        raise ChatFormatError(f"expected a JSON object, got {type(row).__name__}")
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt == "messages":
        convs = [row["messages"]] if "messages" in row else None
        if convs is None:
            raise ChatFormatError("missing 'messages'")
    elif fmt == "alpaca":
        convs = [_system(row) + [
            {"role": "user", "content": _user_turn(_text(row, "instruction"), _text(row, "input", required=False))},
            {"role": "assistant", "content": _text(row, "output")},
        ]]
    elif fmt == "prompt_completion":
        if "prompt" not in row or "completion" not in row:
            raise ChatFormatError("missing 'prompt' or 'completion'")
        convs = [_as_messages(row["prompt"], "user") + _as_messages(row["completion"], "assistant")]
    elif fmt == "self_instruct":
        instruction = _text(row, "instruction")
        instances = row.get("instances")
        if not isinstance(instances, list) or not instances:
            raise ChatFormatError("'instances' must be a non-empty list of {input, output}")
        convs = []
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict):
                raise ChatFormatError(f"instances[{j}] must be an object")
            try:
                convs.append([
                    {"role": "user", "content": _user_turn(instruction, _text(inst, "input", required=False))},
                    {"role": "assistant", "content": _text(inst, "output")},
                ])
            except ChatFormatError as err:
                raise ChatFormatError(f"instances[{j}]: {err}") from None
    else:
        raise ChatFormatError(f"unknown format '{fmt}' (choose auto, {', '.join(FORMATS)})")
    for conv in convs:
        validate_messages(conv)
        # An empty reply still renders its end-of-turn token: the model would learn to say nothing.
        empty = [i for i, m in enumerate(conv) if m["role"] == "assistant" and not m["content"].strip()]
        if empty:
            raise ChatFormatError(f"assistant message {empty[0]} is empty: nothing to learn from it")
    return fmt, convs


def load_conversations(files: list[str | Path], fmt: str = "auto", skip_bad_rows: bool = False,
                       report: DataReport | None = None) -> list[list[Message]]:
    """Every conversation in `files`, in order. Malformed rows raise DataError naming file:line, or are counted."""
    if not files:
        raise DataError("sft.train_files: no input files given")
    report = report if report is not None else DataReport()
    out: list[list[Message]] = []
    for file in files:
        for where, row in iter_rows(file):
            report.rows += 1
            try:
                if isinstance(row, _BadRow):
                    raise ChatFormatError(row.problem)
                found, convs = row_conversations(row, fmt)
            except ChatFormatError as err:
                if not skip_bad_rows:
                    raise DataError(f"{where}: {err} (set sft.skip_bad_rows=true to skip such rows)") from None
                report.skipped_rows += 1
                if len(report.skipped_examples) < 5:
                    report.skipped_examples.append(f"{where}: {err}")
                continue
            report.formats[found] = report.formats.get(found, 0) + len(convs)
            out.extend(convs)
    return out


# ----------------------------------------------------------------------------- tokenizing


def make_example(ids: list[int], labels: list[int]) -> Example:
    """Shift labels left by one so position i predicts token i+1; the last position predicts nothing."""
    shifted = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    shifted[:-1] = labels[1:]
    return Example(np.asarray(ids, dtype=np.int64), shifted)


def tokenize_examples(tokenizer: PreTrainedTokenizerBase, conversations: list[list[Message]], *, seq_len: int,
                      overlong: str = "truncate", train_on_prompt: bool = False,
                      report: DataReport | None = None) -> list[Example]:
    """Token examples of at most `seq_len` tokens; over-long ones truncated or dropped (and counted)."""
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong '{overlong}' is not one of truncate, drop")
    report = report if report is not None else DataReport()
    examples = []
    for conv in conversations:
        enc = tokenize_conversation(tokenizer, conv, train_on_prompt=train_on_prompt)
        ids, labels = enc["input_ids"], enc["labels"]
        if len(ids) > seq_len:
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            report.truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        example = make_example(ids, labels)
        n_target = int((example.labels != IGNORE_INDEX).sum())
        if n_target == 0:
            report.dropped_no_target += 1
            continue
        report.examples += 1
        report.tokens += len(example)
        report.target_tokens += n_target
        examples.append(example)
    return examples


def load_sft_examples(files: list[str | Path], tokenizer: PreTrainedTokenizerBase, *, seq_len: int,
                      fmt: str = "auto", overlong: str = "truncate", train_on_prompt: bool = False,
                      skip_bad_rows: bool = False) -> tuple[list[Example], DataReport]:
    """Read, validate and tokenize SFT files; the report counts rows, skips, truncations and drops."""
    report = DataReport()
    conversations = load_conversations(files, fmt=fmt, skip_bad_rows=skip_bad_rows, report=report)
    examples = tokenize_examples(tokenizer, conversations, seq_len=seq_len, overlong=overlong,
                                 train_on_prompt=train_on_prompt, report=report)
    if not examples:
        raise DataError(f"{', '.join(map(str, files))}: no usable example ({report.summary()})")
    return examples, report
