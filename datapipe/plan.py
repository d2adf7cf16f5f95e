"""Turns a config into datatrove stages: one list of blocks per executor, run in order.

    stage 0 (N tasks):  read -> meter -> stream steps (each followed by a meter) -> write -> signatures
    find stages:        dedup index work (1 task, or one per MinHash band)
    stage k (N tasks):  read stage k-1 output -> dedup filter -> meter -> stream steps -> ... -> write
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep

from datapipe.accounting import (
    Meter, OutputJsonlWriter, OutputParquetWriter, RemovedWriter, StageWriter, TimedSink,
)
from datapipe.config import InputConfig, PipelineConfig, recipe_steps, step_labels
from datapipe.readers import (
    HFDatasetFolderReader, RankFileReader, StrictJsonlReader, StrictParquetReader, TextFileReader,
)
from datapipe.steps import STREAM_STEPS, build_global_step, build_stream_step

INPUT_LABEL = "input"
# Meters whose label starts with this only split time (stage reads and writes), not reported as steps.
INTERNAL = "_"
# sentence_dedup also writes trimmed documents, so its reason says what they have in common.
DEDUP_REASONS = {"exact_dedup": "exact_duplicate", "minhash_dedup": "near_duplicate",
                 "sentence_dedup": "duplicate_spans"}
DEFAULT_GLOBS = {"jsonl": "**/*.jsonl*", "parquet": "**/*.parquet", "text": None}


@dataclass(frozen=True)
class Layout:
    """Where a run puts things, all under `output.path`."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def removed(self) -> Path:
        return self.root / "removed"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def logs(self) -> Path:
        return self.root / "work" / "logs"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def resolved_config(self) -> Path:
        return self.root / "config.json"


@dataclass
class Stage:
    name: str
    pipeline: list[PipelineStep]
    tasks: int
    # pipeline index -> step label, for the report (meters carry their label in their name)
    step_at: dict[int, str] = field(default_factory=dict)


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


def count_input_shards(inp: InputConfig) -> int:
    """One task per input file (per Arrow file for an HF dataset folder)."""
    reader = make_reader(inp)
    if isinstance(reader, HFDatasetFolderReader):
        return max(1, len(reader.load().cache_files))
    files = get_datafolder(reader.data_folder).list_files(recursive=True, glob_pattern=reader.glob_pattern)
    if not files:
        raise FileNotFoundError(f"input.path: no {inp.format} files under {inp.path}"
                                + (f" matching {reader.glob_pattern!r}" if reader.glob_pattern else ""))
    return len(files)


def build_stages(cfg: PipelineConfig, layout: Layout) -> list[Stage]:
    steps = recipe_steps(cfg)
    labels = step_labels(steps)
    tasks = cfg.executor.tasks or count_input_shards(cfg.input)
    removed, work = str(layout.removed), str(layout.work)

    stages: list[Stage] = []
    current: list[PipelineStep] = [make_reader(cfg.input), Meter(INPUT_LABEL)]
    step_at: dict[int, str] = {0: INPUT_LABEL}

    for (name, params), label in zip(steps, labels):
        if name in STREAM_STEPS:
            writer = RemovedWriter(removed, label) if STREAM_STEPS[name].is_filter else None
            step_at[len(current)] = label
            current += [build_stream_step(name, label, params, writer, cfg.tokenizer == "shared"), Meter(label)]
            continue
        parts = build_global_step(name, label, params, work, RemovedWriter(removed, label, DEDUP_REASONS[name]),
                                  cfg.tokenizer == "shared")
        stage_dir = f"{work}/stage_{len(stages):02d}"
        current += [StageWriter(stage_dir), Meter(f"{INTERNAL}written_{len(stages):02d}"), *parts.signature[:-1]]
        step_at[len(current)] = label
        current.append(TimedSink(parts.signature[-1]))
        stages.append(Stage(f"stage_{len(stages):02d}", current, tasks, step_at))
        for find_name, pipeline, find_tasks in parts.find_stages:
            stages.append(Stage(find_name, [TimedSink(b) for b in pipeline], find_tasks,
                                {i: label for i in range(len(pipeline))}))
        current = [RankFileReader(stage_dir), Meter(f"{INTERNAL}read_{len(stages):02d}"), parts.filter, Meter(label)]
        step_at = {2: label}

    writer_cls = OutputJsonlWriter if cfg.output.format == "jsonl" else OutputParquetWriter
    current.append(writer_cls(str(layout.data), annotations=cfg.output.annotations))
    stages.append(Stage(f"stage_{len(stages):02d}", current, tasks, step_at))
    return stages


def ordered_labels(cfg: PipelineConfig) -> list[str]:
    return [INPUT_LABEL, *step_labels(recipe_steps(cfg))]
