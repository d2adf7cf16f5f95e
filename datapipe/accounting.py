"""What the report is made of: meters between steps, per-reason removed-document writers, output rows."""
from __future__ import annotations

import json
import re
import time
from collections import defaultdict

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.pipeline.writers.parquet import ParquetWriter

from datapipe.readers import FIELDS_KEY, SOURCE_KEY, TEXT_FIELD_KEY

METER_PREFIX = "meter:"
# Meters also count documents per source (runs over several sources): "source:<name>".
SOURCE_STAT_PREFIX = "source:"
COUNTS_DIR = "_counts"


class Meter(PipelineStep):
    """Counts documents and UTF-8 bytes passing this point; one after the reader and after each step.

    It also times how long it waits on its upstream (`pull_seconds`): everything before it in the
    stage. A step's own time is the difference between the meters around it, because datatrove's
    per-step timers of generator steps also run while downstream steps work.
    """

    type = "📏 - METER"

    def __init__(self, label: str):
        # The stats object takes its name at construction, so the name comes first.
        self.label = label
        self.name = f"{METER_PREFIX}{label}"
        super().__init__()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        pulled = 0.0
        upstream = iter(data)
        while True:
            start = time.perf_counter()
            doc = next(upstream, None)
            pulled += time.perf_counter() - start
            if doc is None:
                break
            self.stat_update("docs")
            self.stat_update("bytes", value=len(doc.text.encode("utf-8")))
            source = doc.metadata.get(SOURCE_KEY)
            if source is not None:
                self.stat_update(SOURCE_STAT_PREFIX + source)
            yield doc
        self.stat_update("pull_seconds", value=pulled, unit="task")


class TimedSink(PipelineStep):
    """Runs a block that consumes its input (a dedup signature or index step) and times it whole.

    Shares the inner block's stats, adding `wall_seconds`; minus the last meter's `pull_seconds`
    that is the block's own time.
    """

    def __init__(self, inner: PipelineStep):
        self.inner = inner
        self.name = inner.name
        self.type = inner.type
        super().__init__()
        self.stats = inner.stats

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        start = time.perf_counter()
        out = self.inner.run(data, rank, world_size)
        if out is not None:
            for _ in out:
                pass
        self.inner.stat_update("wall_seconds", value=time.perf_counter() - start, unit="task")


def _safe(reason: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", reason) or "unknown"


class RemovedWriter(JsonlWriter):
    """Writes removed documents to `<removed>/<step>/<reason>/<rank>.jsonl` and a per-rank count file.

    The count file (`<step>/_counts/<rank>.json`: reason -> docs, bytes) is what the report reads,
    so auditing never requires re-reading the removed documents.
    """

    def __init__(self, removed_folder: str, step: str, reason: str | None = None):
        super().__init__(output_folder=f"{removed_folder}/{step}", output_filename="${filter_reason}/${rank}.jsonl",
                         compression=None)
        self.step = step
        self.reason = reason
        self._counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._rank: int | None = None

    def write(self, document: Document, rank: int = 0, **kwargs):
        reason = _safe(str(self.reason or document.metadata.get("filter_reason") or self.step))
        document.metadata["filter_reason"] = reason
        document.metadata.setdefault("removed_by", self.step)
        count = self._counts[reason]
        count[0] += 1
        count[1] += len(document.text.encode("utf-8"))
        self._rank = rank
        super().write(document, rank, **kwargs)

    def close(self):
        super().close()
        if self._rank is not None:
            payload = {reason: {"docs": c[0], "bytes": c[1]} for reason, c in self._counts.items()}
            with self.output_folder.open(f"{COUNTS_DIR}/{self._rank:05d}.json", "wt") as f:
                json.dump(payload, f)
            self._counts.clear()
            self._rank = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_counts"] = dict(state["_counts"])
        return state

    def __setstate__(self, state):
        state["_counts"] = defaultdict(lambda: [0, 0], state["_counts"])
        self.__dict__.update(state)


def output_row(document: Document, annotations: bool = False) -> dict:
    """The input row with its text replaced: SFT rows keep all their fields, web rows stay {"text", ...}."""
    meta = dict(document.metadata)
    fields = meta.pop(FIELDS_KEY, None)
    meta.pop(SOURCE_KEY, None)  # the source is a row field under the configured `source_field`
    text_field = meta.pop(TEXT_FIELD_KEY, "text")
    if fields is None:
        row = {"id": document.id, "text": document.text}
    else:
        row = {k: (document.text if k == text_field else meta.get(k)) for k in fields}
    if annotations:
        extra = {k: v for k, v in meta.items() if fields is None or k not in fields}
        if extra:
            row["meta"] = extra
    return row


def _jsonl_adapter(self, document: Document) -> dict:
    return output_row(document, self.annotations)


PARTIAL_DIR = ".partial"


class _CommitOnSuccess:
    """A task's kept documents appear under their final name only once the task has succeeded.

    A failed task leaves no file in the output folder; its re-run starts the file afresh.
    """

    extension: str

    def _partial_files(self, rank: int) -> list[str]:
        # Parquet names files "<file id>_<rank>.parquet"; JSONL "<rank>.jsonl"
        suffix = f"{rank:05d}{self.extension}"
        if not self.output_folder.isdir(PARTIAL_DIR):
            return []
        return [f for f in self.output_folder.list_files(PARTIAL_DIR) if f.rsplit("/", 1)[-1].endswith(suffix)]

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        try:
            yield from super().run(data, rank, world_size)
        except BaseException:
            for path in self._partial_files(rank):
                self.output_folder.rm(path)
            raise
        for path in self._partial_files(rank):
            self.output_folder.mv(path, path.rsplit("/", 1)[-1])


class OutputJsonlWriter(_CommitOnSuccess, JsonlWriter):
    name = "💾 output (JSONL)"
    extension = ".jsonl"

    def __init__(self, output_folder: str, annotations: bool = False):
        super().__init__(output_folder, output_filename=f"{PARTIAL_DIR}/${{rank}}.jsonl", compression=None,
                         adapter=_jsonl_adapter)
        self.annotations = annotations


def _parquet_adapter(self, document: Document) -> dict:
    row = output_row(document, self.annotations)
    if "meta" in row:
        # annotations differ from row to row; one Parquet schema needs them as a JSON string
        row["meta"] = json.dumps(row["meta"])
    return row


class OutputParquetWriter(_CommitOnSuccess, ParquetWriter):
    """Kept rows as Parquet; all rows must share one set of fields (as rows read from Parquet do)."""

    name = "💾 output (Parquet)"
    extension = ".parquet"

    def __init__(self, output_folder: str, annotations: bool = False):
        super().__init__(output_folder, output_filename=f"{PARTIAL_DIR}/${{rank}}.parquet", adapter=_parquet_adapter)
        self.annotations = annotations


class StageWriter(JsonlWriter):
    """Intermediate documents between stages, in datatrove's own layout (text, id, metadata)."""

    name = "💽 stage output"

    def __init__(self, output_folder: str):
        super().__init__(output_folder, output_filename="${rank}.jsonl", compression=None)


class UseField(PipelineStep):
    """Swaps the document text for another field, so a dedup signature hashes e.g. the instruction.

    Runs after the stage writer, so the stored document is unchanged.
    """

    type = "🔀 - FIELD"

    def __init__(self, field: str):
        self.field = field
        self.name = f"use field {field!r}"
        super().__init__()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            if self.field not in doc.metadata:
                raise KeyError(f"document {doc.id}: no field {self.field!r} to deduplicate on")
            doc.text = str(doc.metadata[self.field])
            yield doc
