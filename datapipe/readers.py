"""Strict readers: JSONL, Parquet, plain text and local HF dataset folders.

datatrove's own readers log and skip bad rows. Here a bad row (unparsable line, missing or
non-string text field, invalid UTF-8) is either a one-line error naming the file and line, or,
with ``on_bad_input: skip``, a counted skip that shows up in the report.
"""
from __future__ import annotations

import json
import re
from typing import Iterator, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader, BaseReader
from datatrove.utils.logging import logger

BadInputPolicy = Literal["error", "skip"]
# Keys the pipeline adds to metadata; never confused with the input row's own fields.
FIELDS_KEY = "_fields"
TEXT_FIELD_KEY = "_text_field"
# The name of the source a document came from, when a run reads several (datapipe/sources.py).
SOURCE_KEY = "_source"


class BadInputError(ValueError):
    """An input row that cannot become a document; the message names file and line."""


def _row_to_document(row: dict, text_field: str, source: str, line: int) -> Document:
    fields = {k: v for k, v in row.items() if k != text_field}
    metadata = dict(fields)
    metadata[FIELDS_KEY] = list(row.keys())
    metadata[TEXT_FIELD_KEY] = text_field
    doc_id = row.get("id")
    return Document(
        text=row[text_field],
        id=str(doc_id) if doc_id is not None else f"{source}:{line}",
        metadata=metadata,
    )


class _StrictMixin:
    """Shared bad-input handling; `stat_update` comes from PipelineStep."""

    text_field: str
    on_bad_input: BadInputPolicy
    # Set when several sources merge into one output: every row must have exactly these fields.
    expected_fields: frozenset[str] | None = None

    def _bad(self, path: str, line: int, kind: str, reason: str) -> None:
        message = f"{self._where(path)}:{line}: {reason}"
        if self.on_bad_input == "error":
            raise BadInputError(message)
        logger.warning(f"skipping bad input {message}")
        self.stat_update("bad_input")
        self.stat_update(f"bad_input_{kind}")

    def _where(self, path: str) -> str:
        folder = getattr(self, "data_folder", None)
        return folder.resolve_paths(path) if folder is not None else path

    def _check_row(self, row: object, path: str, line: int) -> Document | None:
        if not isinstance(row, dict):
            self._bad(path, line, "not_an_object", f"expected a JSON object, got {type(row).__name__}")
            return None
        if self.text_field not in row:
            self._bad(path, line, "missing_text_field",
                      f"missing text field {self.text_field!r} (keys: {sorted(row)})")
            return None
        text = row[self.text_field]
        if not isinstance(text, str):
            self._bad(path, line, "text_not_string",
                      f"text field {self.text_field!r} is {type(text).__name__}, not a string")
            return None
        if self.expected_fields is not None and set(row) != self.expected_fields:
            self._bad(path, line, "schema_mismatch",
                      f"fields differ from the source's first row: missing {sorted(self.expected_fields - set(row))}, "
                      f"extra {sorted(set(row) - self.expected_fields)}")
            return None
        if not text.strip():
            # Empty documents are valid input, just useless: counted, never an error.
            self.stat_update("empty_text")
            return None
        return _row_to_document(row, self.text_field, path, line)


class StrictJsonlReader(_StrictMixin, BaseDiskReader):
    """One JSON object per line; `.gz`/`.zst` handled by datatrove's file layer."""

    name = "📖 JSONL (strict)"

    def __init__(self, data_folder, text_field: str = "text", on_bad_input: BadInputPolicy = "error",
                 glob_pattern: str | None = None, paths_file=None):
        super().__init__(data_folder, paths_file=paths_file, text_key=text_field, glob_pattern=glob_pattern)
        self.text_field = text_field
        self.on_bad_input = on_bad_input

    def read_file(self, filepath: str) -> Iterator[Document]:
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as err:
                    self._bad(filepath, line_no, "invalid_utf8", f"invalid UTF-8 at byte {err.start}")
                    continue
                except json.JSONDecodeError as err:
                    self._bad(filepath, line_no, "invalid_json", f"invalid JSON ({err.msg} at column {err.colno})")
                    continue
                doc = self._check_row(row, filepath, line_no)
                if doc is not None:
                    yield doc


class StrictParquetReader(_StrictMixin, BaseDiskReader):
    """Parquet files read batch by batch; "line" in errors is the 1-based row number."""

    name = "📖 Parquet (strict)"

    def __init__(self, data_folder, text_field: str = "text", on_bad_input: BadInputPolicy = "error",
                 glob_pattern: str | None = None, paths_file=None, batch_size: int = 1000):
        super().__init__(data_folder, paths_file=paths_file, text_key=text_field, glob_pattern=glob_pattern)
        self.text_field = text_field
        self.on_bad_input = on_bad_input
        self.batch_size = batch_size

    def read_file(self, filepath: str) -> Iterator[Document]:
        import pyarrow.parquet as pq

        with self.data_folder.open(filepath, "rb") as f:
            try:
                parquet = pq.ParquetFile(f)
            except Exception as err:  # pyarrow raises several types for corrupt files
                raise BadInputError(f"{self._where(filepath)}:0: unreadable Parquet file ({err})") from None
            if self.text_field not in parquet.schema_arrow.names:
                self._bad(filepath, 0, "missing_text_field", f"missing text column {self.text_field!r} "
                          f"(columns: {parquet.schema_arrow.names})")
                return
            row_no = 0
            for batch in parquet.iter_batches(batch_size=self.batch_size):
                for row in batch.to_pylist():
                    row_no += 1
                    doc = self._check_row(row, filepath, row_no)
                    if doc is not None:
                        yield doc


class TextFileReader(_StrictMixin, BaseDiskReader):
    """Plain text: one document per file, or one per blank-line-separated block."""

    name = "📖 Text (strict)"
    _BLOCK_SPLIT = re.compile(r"\n(?:[ \t]*\n)+")

    def __init__(self, data_folder, split: Literal["file", "blank_line"] = "file",
                 on_bad_input: BadInputPolicy = "error", glob_pattern: str | None = None, paths_file=None):
        super().__init__(data_folder, paths_file=paths_file, glob_pattern=glob_pattern)
        self.text_field = "text"
        self.split = split
        self.on_bad_input = on_bad_input

    def read_file(self, filepath: str) -> Iterator[Document]:
        with self.data_folder.open(filepath, "rb", compression="infer") as f:
            raw = f.read()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            self._bad(filepath, line, "invalid_utf8", f"invalid UTF-8 at byte {err.start}")
            return
        if self.split == "file":
            blocks = [(1, content)]
        else:
            blocks, pos = [], 0
            for match in self._BLOCK_SPLIT.finditer(content):
                blocks.append((content.count("\n", 0, pos) + 1, content[pos:match.start()]))
                pos = match.end()
            blocks.append((content.count("\n", 0, pos) + 1, content[pos:]))
        for line, block in blocks:
            doc = self._check_row({"text": block.strip("\n")}, filepath, line)
            if doc is not None:
                yield doc


class HFDatasetFolderReader(_StrictMixin, BaseReader):
    """A folder written by `datasets.Dataset.save_to_disk`; task `rank` reads a contiguous slice."""

    name = "📖 HF dataset folder"

    def __init__(self, path: str, text_field: str = "text", split: str | None = None,
                 on_bad_input: BadInputPolicy = "error"):
        super().__init__(text_key=text_field)
        self.path = path
        self.text_field = text_field
        self.split = split
        self.on_bad_input = on_bad_input

    def load(self):
        import datasets

        ds = datasets.load_from_disk(self.path)
        if isinstance(ds, datasets.DatasetDict):
            if self.split is None:
                raise BadInputError(f"{self.path}:0: a DatasetDict with splits {list(ds)}; set input.split")
            if self.split not in ds:
                raise BadInputError(f"{self.path}:0: no split {self.split!r} (splits: {list(ds)})")
            ds = ds[self.split]
        if self.text_field not in ds.column_names:
            raise BadInputError(f"{self.path}:0: missing text column {self.text_field!r} "
                                f"(columns: {ds.column_names})")
        return ds

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        yield from self.read_shard(self.load(), rank, world_size)

    def read_shard(self, ds, index: int, num_shards: int) -> DocumentsPipeline:
        """The `index`-th of `num_shards` contiguous slices of the dataset."""
        shard = ds.shard(num_shards=num_shards, index=index, contiguous=True)
        # Row numbers in messages are global, so a user can find the row in the full dataset.
        offset = sum(len(ds) // num_shards + (1 if i < len(ds) % num_shards else 0) for i in range(index))
        for i, row in enumerate(shard):
            doc = self._check_row(row, self.path, offset + i + 1)
            if doc is not None:
                self.update_doc_stats(doc)
                yield doc


class RankFileReader(BaseDiskReader):
    """Reads exactly `<rank>.jsonl` written by the previous stage's writer.

    Dedup filters find their documents by position within a task's stream, so task `rank` must read
    the file task `rank` wrote, even when some tasks wrote no file at all.
    """

    name = "📖 stage input"

    def read_file(self, filepath: str) -> Iterator[Document]:
        with self.data_folder.open(filepath, "rb") as f:
            for line_no, raw in enumerate(f):
                row = json.loads(raw)
                metadata = row.get("metadata", {})
                yield Document(text=row["text"], id=row["id"], metadata=metadata)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        name = f"{rank:05d}.jsonl"
        if not self.data_folder.isfile(name):
            return
        for doc in self.read_file(name):
            yield doc
