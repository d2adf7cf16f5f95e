"""Input readers, and several named sources read as one corpus.

With `sources:` every input file (an HF dataset folder: each of its Arrow shards) is one unit; the
units are listed in source priority order, then file order, and each task reads a contiguous run of
them. So the order of (task rank, position in the task) is the order (source priority, file, row)
for any number of tasks and workers, which is what lets dedup keep the copy from the first source.

Before anything runs, the first row of every file is checked: the text field is there and is a
string, and all sources have the same other fields with compatible types, so the merged output has
one schema. Later rows of a file must have the same field names (checked as they are read).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from datapipe.config import InputConfig, PipelineConfig
from datapipe.readers import (
    FIELDS_KEY, SOURCE_KEY, TEXT_FIELD_KEY, BadInputError, HFDatasetFolderReader, StrictJsonlReader,
    StrictParquetReader, TextFileReader,
)

DEFAULT_GLOBS = {"jsonl": "**/*.jsonl*", "parquet": "**/*.parquet", "text": None}
MERGED_TEXT_FIELD = "text"


def make_reader(inp: InputConfig) -> PipelineStep:
    path = Path(inp.path)
    folder, glob = (str(path.parent), path.name) if path.is_file() else (str(path), inp.glob)
    if glob is None and not path.is_file():
        glob = DEFAULT_GLOBS.get(inp.format)
    if inp.format == "jsonl":
        return StrictJsonlReader(folder, inp.text_field, inp.on_bad_input, glob_pattern=glob)
    if inp.format == "parquet":
        return StrictParquetReader(folder, inp.text_field, inp.on_bad_input, glob_pattern=glob)
    if inp.format == "text":
        return TextFileReader(folder, inp.text_split, inp.on_bad_input, glob_pattern=glob)
    return HFDatasetFolderReader(str(path), inp.text_field, inp.split, inp.on_bad_input)


def input_files(reader: PipelineStep, inp: InputConfig, key: str) -> list[str]:
    """The files a disk reader reads, sorted; an error naming the key when there are none."""
    files = get_datafolder(reader.data_folder).list_files(recursive=True, glob_pattern=reader.glob_pattern)
    if not files:
        raise FileNotFoundError(f"{key}.path: no {inp.format} files under {inp.path}"
                                + (f" matching {reader.glob_pattern!r}" if reader.glob_pattern else ""))
    return files


def count_input_shards(inp: InputConfig) -> int:
    """One task per input file (per Arrow file for an HF dataset folder)."""
    reader = make_reader(inp)
    if isinstance(reader, HFDatasetFolderReader):
        return max(1, len(reader.load().cache_files))
    return len(input_files(reader, inp, "input"))


@dataclass(frozen=True)
class Unit:
    """What one task reads at a time: a file of a source, or a contiguous slice of an HF dataset."""

    source: int  # index in priority order
    path: str = ""  # relative to the source reader's folder
    shard: int = 0
    shards: int = 1


# ----------------------------------------------------------------------------- schema check

def _json_type(value) -> str:
    # int and float mix freely in JSON numbers (1 vs 0.5 in one column), so they are one type here.
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _arrow_type(t) -> str:
    import pyarrow as pa

    checks = [(pa.types.is_boolean, "boolean"), (pa.types.is_integer, "number"), (pa.types.is_floating, "number"),
              (pa.types.is_decimal, "number"), (pa.types.is_string, "string"), (pa.types.is_large_string, "string"),
              (pa.types.is_list, "list"), (pa.types.is_large_list, "list"), (pa.types.is_struct, "object"),
              (pa.types.is_map, "object"), (pa.types.is_null, "null")]
    return next((name for check, name in checks if check(t)), str(t))


def _first_row_schema(reader: PipelineStep, inp: InputConfig, path: str) -> tuple[str, dict[str, str]]:
    """(where, field -> type) of a file's first row, or of a columnar file's columns."""
    if inp.format == "hf_dataset":
        ds = reader.load()
        return inp.path, {f.name: _arrow_type(f.type) for f in ds.features.arrow_schema}
    where = reader.data_folder.resolve_paths(path)
    if inp.format == "text":
        return where, {"text": "string"}
    if inp.format == "parquet":
        import pyarrow.parquet as pq

        with reader.data_folder.open(path, "rb") as f:
            try:
                schema = pq.ParquetFile(f).schema_arrow
            except Exception as err:  # pyarrow raises several types for corrupt files
                raise BadInputError(f"{where}:0: unreadable Parquet file ({err})") from None
        return where, {f.name: _arrow_type(f.type) for f in schema}
    with reader.data_folder.open(path, "rb", compression="infer") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                problem = f"{where}:{line_no}: unreadable row ({err})"
                row = None
            else:
                problem = f"{where}:{line_no}: expected a JSON object, got {type(row).__name__}"
            usable = isinstance(row, dict) and isinstance(row.get(inp.text_field), str)
            if not usable and inp.on_bad_input == "skip":
                continue  # the reader skips and counts it too; the schema is the first row it keeps
            if not isinstance(row, dict):
                raise BadInputError(problem)
            return f"{where}:{line_no}", {k: _json_type(v) for k, v in row.items()}
    return where, {}  # an empty file adds no rows, so it cannot disagree


@dataclass
class _Seen:
    key: str
    where: str
    fields: dict[str, str]


def _check_schema(key: str, inp: InputConfig, where: str, schema: dict[str, str], source_field: str,
                  first: _Seen | None) -> _Seen:
    """One source file against the first file read; raises a one-line BadInputError naming file and key."""
    if inp.text_field not in schema:
        raise BadInputError(f"{key}: {where}: missing text field {inp.text_field!r} (fields: {sorted(schema)})")
    if schema[inp.text_field] != "string":
        raise BadInputError(f"{key}: {where}: text field {inp.text_field!r} is {schema[inp.text_field]}, "
                            f"not a string")
    fields = {k: t for k, t in schema.items() if k != inp.text_field}
    clashes = {MERGED_TEXT_FIELD: f"the merged output's text field ({key}.text_field is {inp.text_field!r})",
               source_field: "source_field, the field naming each row's source; set source_field"}
    for clash, why in clashes.items():
        if clash in fields:
            raise BadInputError(f"{key}: {where}: field {clash!r} clashes with {why}")
    if first is None:
        return _Seen(key, where, fields)
    missing, extra = sorted(set(first.fields) - set(fields)), sorted(set(fields) - set(first.fields))
    if missing or extra:
        raise BadInputError(f"{key}: {where}: fields differ from {first.key} ({first.where}): "
                            f"missing {missing}, extra {extra}")
    for name, kind in fields.items():
        other = first.fields[name]
        if kind != other and "null" not in (kind, other):
            raise BadInputError(f"{key}: {where}: field {name!r} is {kind}, in {first.key} ({first.where}) "
                                f"it is {other}")
    return first


# ----------------------------------------------------------------------------- the reader

class MultiSourceReader(PipelineStep):
    """Reads this task's contiguous run of units and tags every document with its source."""

    name = "📖 sources"
    type = "📖 - READER"

    def __init__(self, names: list[str], readers: list[PipelineStep], units: list[Unit], fields: list[str],
                 source_field: str):
        super().__init__()
        self.names, self.readers, self.units = names, readers, units
        self.fields, self.source_field = fields, source_field
        for reader in readers:
            # bad-row and empty-text counters land in the stats the report reads for the input step
            reader.stats = self.stats

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        n = len(self.units)
        loaded: dict[int, object] = {}
        for unit in self.units[rank * n // world_size:(rank + 1) * n // world_size]:
            reader = self.readers[unit.source]
            if isinstance(reader, HFDatasetFolderReader):
                if unit.source not in loaded:
                    loaded[unit.source] = reader.load()
                docs = reader.read_shard(loaded[unit.source], unit.shard, unit.shards)
            else:
                docs = reader.read_file(unit.path)
            name = self.names[unit.source]
            for doc in docs:
                meta = doc.metadata
                if "id" not in meta:
                    doc.id = f"{name}/{doc.id}"  # generated ids ("file:line") could repeat across sources
                meta[FIELDS_KEY] = self.fields
                meta[TEXT_FIELD_KEY] = MERGED_TEXT_FIELD
                meta[self.source_field] = name
                meta[SOURCE_KEY] = name
                self.stat_update("documents")
                yield doc


def multi_source_reader(cfg: PipelineConfig) -> MultiSourceReader:
    """Lists every unit and checks every file's schema; raises before anything is written."""
    names, readers, units = [], [], []
    first: _Seen | None = None
    first_order: list[str] = []
    for index, (name, inp) in enumerate(cfg.sources.items()):
        key = f"sources.{name}"
        reader = make_reader(inp)
        if isinstance(reader, HFDatasetFolderReader):
            try:
                shards = max(1, len(reader.load().cache_files))
            except BadInputError as err:
                raise BadInputError(f"{key}: {err}") from None
            checks = [("", Unit(index, "", i, shards)) for i in range(shards)][:1]
            units += [Unit(index, "", i, shards) for i in range(shards)]
        else:
            files = input_files(reader, inp, key)
            checks = [(f, Unit(index, f)) for f in files]
            units += [u for _, u in checks]
        for path, _ in checks:
            where, schema = _first_row_schema(reader, inp, path)
            if not schema:
                continue
            if first is None:
                first_order = [MERGED_TEXT_FIELD if k == inp.text_field else k for k in schema]
            first = _check_schema(key, inp, where, schema, cfg.source_field, first)
        if not isinstance(reader, HFDatasetFolderReader) and inp.format != "text":
            reader.expected_fields = frozenset(first.fields) | {inp.text_field} if first else None
        names.append(name)
        readers.append(reader)
    return MultiSourceReader(names, readers, units, [*first_order, cfg.source_field], cfg.source_field)
