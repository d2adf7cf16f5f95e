"""Turns a config into datatrove stages: one list of blocks per executor, run in order.

    stage 0 (N tasks):  read -> meter -> stream steps (each followed by a meter) -> write -> signatures
    find stages:        dedup index work (1 task, or one per MinHash band)
    stage k (N tasks):  read stage k-1 output -> dedup filter -> meter -> stream steps -> ... -> write

Stage 0 reads one input, or several named sources as one corpus (datapipe/sources.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datatrove.pipeline.base import PipelineStep

from datapipe.accounting import (
    Meter, OutputJsonlWriter, OutputParquetWriter, RemovedWriter, StageWriter, TimedSink,
)
from datapipe.config import ConfigError, PipelineConfig, recipe_steps, step_labels
from datapipe.cross_dedup import MAX_PRIORITY
from datapipe.readers import RankFileReader
from datapipe.sources import count_input_shards, make_reader, multi_source_reader
from datapipe.steps import STREAM_STEPS, build_global_step, build_stream_step

INPUT_LABEL = "input"
# Meters whose label starts with this only split time (stage reads and writes), not reported as steps.
INTERNAL = "_"
# sentence_dedup also writes trimmed documents, so its reason says what they have in common.
DEDUP_REASONS = {"exact_dedup": "exact_duplicate", "minhash_dedup": "near_duplicate",
                 "sentence_dedup": "duplicate_spans"}


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


def build_stages(cfg: PipelineConfig, layout: Layout) -> list[Stage]:
    steps = recipe_steps(cfg)
    labels = step_labels(steps)
    if cfg.sources is None:
        reader, names = make_reader(cfg.input), None
        tasks = cfg.executor.tasks or count_input_shards(cfg.input)
    else:
        reader, names = multi_source_reader(cfg), list(cfg.sources)
        tasks = cfg.executor.tasks or len(reader.units)
        if tasks > MAX_PRIORITY:
            raise ConfigError(f"executor.tasks: at most {MAX_PRIORITY} tasks with sources "
                              f"(dedup priority is 16 bits); this run would have {tasks}")
    removed, work = str(layout.removed), str(layout.work)

    stages: list[Stage] = []
    current: list[PipelineStep] = [reader, Meter(INPUT_LABEL)]
    step_at: dict[int, str] = {0: INPUT_LABEL}

    for (name, params), label in zip(steps, labels):
        if name in STREAM_STEPS:
            writer = RemovedWriter(removed, label) if STREAM_STEPS[name].is_filter else None
            step_at[len(current)] = label
            current += [build_stream_step(name, label, params, writer, cfg.tokenizer == "shared"), Meter(label)]
            continue
        parts = build_global_step(name, label, params, work, RemovedWriter(removed, label, DEDUP_REASONS[name]),
                                  cfg.tokenizer == "shared", names)
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
