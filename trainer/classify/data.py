"""Labelled text -> token examples for sequence classification.

Inputs, one `{text, label}` row each:
  .jsonl / .ndjson / .json (optionally .gz), save_to_disk folders   read as SFT reads them
  .csv   comma-separated, RFC 4180 quoting ("a ""quoted"", field")
  .tsv   tab-separated, literal: a quote is just a character (the IANA TSV rule; a field holds no
         tab or newline). Quote-aware reading would glue or strip the quotes that real SMS/tweet
         text starts with.
CSV/TSV files start with a header row, or pass `columns` to name the columns of a header-less
file. `text_column` / `label_column` pick the fields (default "text" / "label"); the SMS Spam
Collection reads with `text_column="msg"`.

Labels are strings (an integer label becomes its decimal string). `label2id` comes from the
training rows only, in sorted order (numeric order when every label is an integer, so labels
0..N-1 keep their ids) and is reused for validation, where an unseen label is an error.

Each text is `tokenizer(text)["input_ids"]` (BOS where the tokenizer adds it) + EOS, so the
last real token, where the classifier pools, is always the same end token. Texts longer than
`max_len` keep their start and end in EOS.

A malformed row raises `DataError` naming `file:line` (`file:row N` for .json lists and dataset
folders), or is skipped and counted with `skip_bad_rows`.
"""
from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.data.sources import DataError
from trainer.sft.data import iter_rows as iter_json_rows

_TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_INTEGER = re.compile(r"-?[0-9]+")
_BAD_ROW_HINT = "set skip_bad_rows=true to skip such rows"


@dataclass
class ClassExample:
    """One tokenized text (ending in EOS) and its class id."""

    input_ids: np.ndarray
    label: int

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class ClassDataReport:
    """What reading and tokenizing found; printed at the start of a run."""

    rows: int = 0
    examples: int = 0
    tokens: int = 0
    longest: int = 0
    truncated: int = 0
    max_len: int = 0
    skipped_rows: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)  # label name -> examples

    def summary(self) -> str:
        parts = [f"{self.rows} rows -> {self.examples} examples, {self.tokens} tokens (longest {self.longest})",
                 "classes " + ", ".join(f"{k}: {v}" for k, v in self.class_counts.items())]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to {self.max_len} tokens")
        if self.skipped_rows:
            parts.append(f"{self.skipped_rows} malformed rows skipped (e.g. {self.skipped_examples[0]})")
        return " | ".join(parts)

    def skip(self, problem: str) -> None:
        self.skipped_rows += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(problem)


class _RowError(Exception):
    """A problem with one row; becomes a DataError or a skip, with the row's place prefixed."""


# ----------------------------------------------------------------------------- reading


def _kind(path: Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffixes = path.suffixes
    last = suffixes[-2] if len(suffixes) > 1 and suffixes[-1] == ".gz" else (suffixes[-1] if suffixes else "")
    if path.is_dir():
        return "json"  # a save_to_disk folder; loading it says so if it is not one
    if last in _TABLE_DELIMITERS:
        return last
    if last in _JSON_SUFFIXES:
        return "json"
    raise DataError(f"{path}: unknown input type '{''.join(suffixes)}' "
                    "(expected .jsonl/.json[.gz], .csv, .tsv[.gz] or a save_to_disk folder)")


def _open_text(path: Path):
    # utf-8-sig: spreadsheet exports start with a BOM that would otherwise glue onto the first column name.
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _iter_table(path: Path, delimiter: str, columns: Sequence[str] | None,
                needed: Sequence[str]) -> Iterator[tuple[str, Any]]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        try:
            if columns is None:
                header = next((r for r in reader if r), None)
                if header is None:
                    return
                names = [c.strip() for c in header]
                header_line = reader.line_num
            else:
                names, header_line = list(columns), 0
            missing = [c for c in needed if c not in names]
            if missing:
                where = f"{path}:{header_line}" if header_line else f"{path}"
                source = "header" if header_line else "given columns"
                raise DataError(f"{where}: no column {', '.join(repr(c) for c in missing)} in the {source} "
                                f"({', '.join(names)}); set text_column / label_column"
                                + (" or pass columns for a file without a header" if header_line else ""))
            start = reader.line_num + 1
            for record in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not record or record == [""]:
                    continue
                if len(record) != len(names):
                    yield where, _RowError(f"{len(record)} fields, expected {len(names)} ({', '.join(names)})")
                    continue
                yield where, dict(zip(names, record))
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: cannot be read as {delimiter!r}-separated text: {exc}") \
                from None


def iter_labelled_rows(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                       columns: Sequence[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of one input; a row is a dict, or a `_RowError` for a line that is not one."""
    path = Path(path)
    kind = _kind(path)
    try:
        if kind == "json":
            for where, row in iter_json_rows(path):
                # iter_rows hands a line that is not JSON over as an object with a `.problem`, not a dict.
                yield where, row if isinstance(row, dict) else _RowError(
                    getattr(row, "problem", f"expected a JSON object, got {type(row).__name__}"))
        else:
            yield from _iter_table(path, _TABLE_DELIMITERS[kind], columns, (text_column, label_column))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:  # unreadable, a folder where a file was expected, a broken .gz
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _label_of(row: dict, label_column: str) -> str:
    if label_column not in row or row[label_column] is None:
        raise _RowError(f"no label ('{label_column}')")
    value = row[label_column]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _RowError(f"label '{label_column}' is {type(value).__name__}, expected a string or an integer")
    label = str(value).strip()
    if not label:
        raise _RowError(f"empty label ('{label_column}')")
    return label


def _text_of(row: dict, text_column: str) -> str:
    if text_column not in row or row[text_column] is None:
        raise _RowError(f"no text ('{text_column}'; the row has {', '.join(sorted(map(str, row))) or 'no fields'})")
    text = row[text_column]
    if not isinstance(text, str):
        raise _RowError(f"text '{text_column}' is {type(text).__name__}, expected a string")
    if not text.strip():
        raise _RowError(f"empty text ('{text_column}')")
    return text


def load_labelled_texts(files: Sequence[str | Path], *, text_column: str = "text", label_column: str = "label",
                        columns: Sequence[str] | None = None, skip_bad_rows: bool = False,
                        report: ClassDataReport | None = None) -> list[tuple[str, str, str]]:
    """(where, text, label) for every usable row of `files`, in order."""
    if not files:
        raise DataError("no input files given")
    report = report if report is not None else ClassDataReport()
    out: list[tuple[str, str, str]] = []
    for file in files:
        rows_before = report.rows
        for where, row in iter_labelled_rows(file, text_column=text_column, label_column=label_column,
                                             columns=columns):
            report.rows += 1
            try:
                if isinstance(row, _RowError):
                    raise row
                out.append((where, _text_of(row, text_column), _label_of(row, label_column)))
            except _RowError as err:
                if not skip_bad_rows:
                    raise DataError(f"{where}: {err} ({_BAD_ROW_HINT})") from None
                report.skip(f"{where}: {err}")
        if report.rows == rows_before:
            raise DataError(f"{file}: no rows")
    return out


# ----------------------------------------------------------------------------- labels


def build_label_map(labels: Sequence[str]) -> dict[str, int]:
    """Class ids for the label names: sorted, numerically when every name is an integer."""
    names = set(labels)
    numeric = all(_INTEGER.fullmatch(n) for n in names)
    return {name: i for i, name in enumerate(sorted(names, key=int if numeric else None))}


def id_to_label(label2id: Mapping[str, int]) -> dict[int, str]:
    return {i: name for name, i in label2id.items()}


# ----------------------------------------------------------------------------- tokenizing


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                 max_len: int) -> list[tuple[list[int], bool]]:
    """(ids, truncated) per text: the tokenizer's ids (with its BOS) + EOS, at most `max_len`, EOS last."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; classification pools on a fixed end token")
    if max_len < 2:
        raise ValueError(f"max_len must leave room for a token and EOS, got {max_len}")
    out = []
    for ids in (tokenizer(list(texts))["input_ids"] if texts else []):
        if not ids or ids[-1] != eos:  # tokenizers that append EOS themselves get no second one
            ids = ids + [eos]
        truncated = len(ids) > max_len
        out.append((ids[:max_len - 1] + [eos] if truncated else ids, truncated))
    return out


def load_classify_examples(files: Sequence[str | Path], tokenizer: PreTrainedTokenizerBase, *, max_len: int,
                           label2id: Mapping[str, int] | None = None, text_column: str = "text",
                           label_column: str = "label", columns: Sequence[str] | None = None,
                           skip_bad_rows: bool = False) -> tuple[list[ClassExample], dict[str, int], ClassDataReport]:
    """Read, check and tokenize classification files.

    Without `label2id` these are training files: the label map is built from them and needs two
    classes at least. With it (validation), every label must be one of its names; an unseen label
    fails even with `skip_bad_rows`, since dropping a class's rows would quietly change the metrics.
    Returns the examples, the label map used and the report.
    """
    report = ClassDataReport(max_len=max_len)
    rows = load_labelled_texts(files, text_column=text_column, label_column=label_column, columns=columns,
                               skip_bad_rows=skip_bad_rows, report=report)
    where_files = ", ".join(map(str, files))
    if not rows:
        raise DataError(f"{where_files}: no usable row ({report.summary()})")
    if label2id is None:
        label2id = build_label_map([label for _, _, label in rows])
        if len(label2id) < 2:
            raise DataError(f"{where_files}: every training row has the label '{rows[0][2]}'; "
                            "classification needs two classes at least")
    else:
        label2id = dict(label2id)
        for where, _, label in rows:
            if label not in label2id:
                raise DataError(f"{where}: label '{label}' does not occur in the training data "
                                f"(its labels: {', '.join(label2id)})")
    examples = []
    for (_, _, label), (ids, truncated) in zip(rows, encode_texts(tokenizer, [t for _, t, _ in rows], max_len)):
        examples.append(ClassExample(np.asarray(ids, dtype=np.int64), label2id[label]))
        report.truncated += truncated
        report.tokens += len(ids)
        report.longest = max(report.longest, len(ids))
    report.examples = len(examples)
    counts = {name: 0 for name in label2id}
    for _, _, label in rows:
        counts[label] += 1
    report.class_counts = counts
    return examples, label2id, report
