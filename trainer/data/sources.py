"""Reading raw text inputs (text / JSONL / parquet files, `save_to_disk` folders) into one `datasets.Dataset`.

Every input becomes rows of a single `text` column, in the order the inputs were given.
Rows that cannot be used (a JSONL line that is not JSON, a missing or non-string text
field, a null value) raise `DataError` naming `file:line`, or are skipped and counted
when `skip_bad_rows` is set.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
import pyarrow as pa
import pyarrow.compute as pc

TextMode = Literal["paragraph", "line", "file"]
TEXT_MODES: tuple[str, ...] = ("paragraph", "line", "file")
# datasets' text builder calls the same three granularities by other names.
_SAMPLE_BY = {"paragraph": "paragraph", "line": "line", "file": "document"}
_TEXT_SUFFIXES = {".txt", ".text", ".md"}
_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}


class DataError(ValueError):
    """Bad input data; the message is one line naming the file (and line or key)."""


@dataclass
class SourceReport:
    """What reading the inputs found: documents per file and rows that were skipped."""

    documents: dict[str, int] = field(default_factory=dict)
    skipped_rows: int = 0
    skipped_examples: list[str] = field(default_factory=list)

    def skip(self, where: str) -> None:
        self.skipped_rows += 1
        if len(self.skipped_examples) < 5:
            self.skipped_examples.append(where)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _file_kind(path: Path) -> str | None:
    suffixes = path.suffixes
    gz = len(suffixes) > 1 and suffixes[-1] == ".gz"
    last = suffixes[-2] if gz else (suffixes[-1] if suffixes else "")
    if gz:  # only JSON lines are read through gzip here
        return "json" if last in _JSON_SUFFIXES else None
    if last in _TEXT_SUFFIXES:
        return "text"
    if last in _JSON_SUFFIXES:
        return "json"
    if last == ".parquet":
        return "parquet"
    return None


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Input paths with plain folders (e.g. a cleaning run's output of `00000.jsonl` files) replaced by the
    readable files under them, sorted; `save_to_disk` folders stay whole."""
    paths: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir() and not _is_saved_dataset(path):
            found = sorted(p for p in path.rglob("*") if p.is_file() and _file_kind(p) is not None
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path}: folder holds no .txt/.jsonl/.parquet files and is not a dataset saved "
                                "with datasets' save_to_disk")
            paths.extend(found)
        else:
            paths.append(path)
    return paths


def input_kind(path: Path) -> str:
    """'text', 'json', 'parquet' or 'disk' (a folder written by `Dataset.save_to_disk`)."""
    if path.is_dir():
        if _is_saved_dataset(path):
            return "disk"
        raise DataError(f"{path}: is a folder but not a dataset saved with datasets' save_to_disk")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    kind = _file_kind(path)
    if kind is not None:
        return kind
    suffixes = path.suffixes
    raise DataError(f"{path}: unknown input type '{''.join(suffixes)}' "
                    "(expected .txt/.md, .jsonl/.json[.gz], .parquet or a save_to_disk folder)")


def load_documents(
    inputs: list[str | Path],
    text_field: str = "text",
    text_mode: TextMode = "paragraph",
    skip_bad_rows: bool = False,
    num_proc: int | None = None,
    *,
    cache_dir: str | Path,
) -> tuple[datasets.Dataset, SourceReport]:
    """All inputs as one Dataset with a single `text` column, plus what was found on the way.

    A plain folder stands for the readable files under it (sorted). Plain text files are
    cut into documents by `text_mode`: 'paragraph' (blank-line separated blocks, the
    default), 'line' (one document per non-empty line) or 'file' (the whole file is one
    document). Blank documents in text files are not documents and are dropped without
    counting. JSONL is checked line by line in this process before datasets reads it.
    `cache_dir` receives datasets' Arrow files (the caller owns and removes it; the
    returned Dataset lives there).
    """
    if not inputs:
        raise DataError("no input files given")
    if text_mode not in TEXT_MODES:
        raise DataError(f"text_mode '{text_mode}' is not one of {', '.join(TEXT_MODES)}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    report = SourceReport()
    parts = []
    paths = expand_inputs(inputs)
    kinds = [input_kind(p) for p in paths]  # a missing or unknown input fails before any work
    for i, (path, kind) in enumerate(zip(paths, kinds)):
        reader = {"text": _read_text, "json": _read_json, "parquet": _read_parquet, "disk": _read_disk}[kind]
        part_cache = cache / f"input-{i:04d}"
        ds = reader(path, text_field=text_field, text_mode=text_mode, skip_bad_rows=skip_bad_rows,
                    num_proc=num_proc, cache=part_cache, report=report)
        report.documents[str(path)] = len(ds)
        parts.append(ds)
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), report


def _cache_file(cache: Path, name: str) -> str:
    cache.mkdir(parents=True, exist_ok=True)
    return str(cache / name)


def _load(path: Path, builder: str, cache: Path, **kwargs) -> datasets.Dataset:
    try:
        return datasets.load_dataset(builder, data_files=[str(path)], split="train", cache_dir=str(cache), **kwargs)
    except Exception as exc:  # datasets wraps reader errors in many types; the user needs the file and the cause.
        cause = exc.__cause__ or exc
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise DataError(f"{path}: cannot be read as {builder}: {first}") from exc


def _read_text(path: Path, *, text_mode: TextMode, num_proc: int | None, cache: Path, **_) -> datasets.Dataset:
    ds = _load(path, "text", cache, sample_by=_SAMPLE_BY[text_mode])
    if text_mode == "paragraph":
        # datasets keeps the final newline of the last paragraph; paragraphs carry no edge newlines.
        ds = ds.map(lambda b: {"text": [t.strip("\n") for t in b["text"]]}, batched=True, num_proc=num_proc,
                    cache_file_name=_cache_file(cache, "strip.arrow"), desc=f"Reading {path.name}")
    return ds.filter(lambda b: [bool(t.strip()) for t in b["text"]], batched=True, num_proc=num_proc,
                     cache_file_name=_cache_file(cache, "nonblank.arrow"))


def _open_lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8")


def _check_json_line(line: str, text_field: str) -> str | None:
    """Why this JSONL line is not a usable row, or None when it is."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        if line.lstrip().startswith("["):
            return "a JSON array; expected JSON Lines (one object per line)"
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    if isinstance(row, list):
        return "a JSON array; expected JSON Lines (one object per line)"
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if text_field not in row:
        return f"no '{text_field}' field (fields: {', '.join(sorted(row)) or 'none'})"
    if not isinstance(row[text_field], str):
        return f"'{text_field}' is {type(row[text_field]).__name__}, expected a string"
    return None


def _read_json(path: Path, *, text_field: str, skip_bad_rows: bool, cache: Path,
               report: SourceReport, **_) -> datasets.Dataset:
    # datasets' JSON reader fails on a bad line without naming it, so every line is checked here
    # while a clean copy holding only the text field is streamed out (other fields of mixed types
    # would break Arrow's schema inference, and skipped rows must not reach the reader).
    cache.mkdir(parents=True, exist_ok=True)
    clean = cache / "rows.jsonl"
    rows = 0
    try:
        with _open_lines(path) as src, open(clean, "w", encoding="utf-8") as dst:
            for lineno, line in enumerate(src, start=1):
                if not line.strip():
                    continue
                problem = _check_json_line(line, text_field)
                if problem is None:
                    dst.write(json.dumps({"text": json.loads(line)[text_field]}, ensure_ascii=False) + "\n")
                    rows += 1
                    continue
                where = f"{path}:{lineno}: {problem}"
                if not skip_bad_rows:
                    raise DataError(f"{where} (pass --skip-bad-rows to skip such rows)")
                report.skip(where)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read: {exc}") from exc
    features = datasets.Features({"text": datasets.Value("string")})
    if rows == 0:
        return datasets.Dataset.from_dict({"text": []}, features=features)
    return _load(clean, "json", cache / "arrow", features=features)


def _text_column(ds: datasets.Dataset, path: Path, text_field: str, skip_bad_rows: bool,
                 report: SourceReport, cache: Path) -> datasets.Dataset:
    """The text column of a columnar dataset, with null rows refused or skipped."""
    if text_field not in ds.column_names:
        raise DataError(f"{path}: no '{text_field}' column (columns: {', '.join(ds.column_names)})")
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"{path}: column '{text_field}' has type {feature}, expected string")
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    column = ds.with_format("arrow")[:]["text"] if len(ds) else pa.chunked_array([], pa.string())
    if column.null_count:
        nulls = pc.indices_nonzero(pc.is_null(column)).to_numpy()
        if not skip_bad_rows:
            raise DataError(f"{path}:row {int(nulls[0]) + 1}: '{text_field}' is null, expected a string "
                            "(pass --skip-bad-rows to skip such rows)")
        for i in nulls:
            report.skip(f"{path}:row {int(i) + 1}: '{text_field}' is null")
        keep = pc.indices_nonzero(pc.is_valid(column)).to_numpy()
        ds = ds.select(keep).flatten_indices(cache_file_name=_cache_file(cache, "nonnull.arrow"))
    return ds


def _read_parquet(path: Path, *, text_field: str, skip_bad_rows: bool, cache: Path,
                  report: SourceReport, **_) -> datasets.Dataset:
    return _text_column(_load(path, "parquet", cache), path, text_field, skip_bad_rows, report, cache)


def _read_disk(path: Path, *, text_field: str, skip_bad_rows: bool, cache: Path,
               report: SourceReport, **_) -> datasets.Dataset:
    return _text_column(load_disk_dataset(path), path, text_field, skip_bad_rows, report, cache)


def load_disk_dataset(path: Path) -> datasets.Dataset:
    """A `save_to_disk` folder as one Dataset (the `train` split of a DatasetDict)."""
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # a corrupt or foreign folder; say which one
        raise DataError(f"{path}: cannot be loaded with datasets.load_from_disk: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: dataset has splits {', '.join(ds)} but no 'train' split to read")
        ds = ds["train"]
    return ds
