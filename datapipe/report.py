"""The run report: documents and bytes in/out per step and per removal reason, as JSON and a rich table.

Built from datatrove's per-task stats files and the removed-document count files, so it covers
every task ever completed in the run folder, including those finished before a resume.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from datatrove.utils.stats import PipelineStats
from rich.console import Console
from rich.table import Table

from datapipe.accounting import COUNTS_DIR, METER_PREFIX, SOURCE_STAT_PREFIX
from datapipe.cross_dedup import OVERLAP_FILE
from datapipe.plan import INPUT_LABEL, Layout, Stage

# Step counters worth surfacing (everything else datatrove counts stays in the stats files).
EXTRA_COUNTER_PREFIXES = ("pii_", "docs_with_pii", "contaminated_", "overlap_ngrams_", "bad_input", "empty_text",
                          "dropped_", "keyword_")


def _total(value) -> float:
    return value.get("total", 0) if isinstance(value, dict) else value


def _stage_stats(stage: Stage, layout: Layout) -> PipelineStats | None:
    files = sorted((layout.logs / stage.name / "stats").glob("*.json"))
    merged = None
    for f in files:
        stats = PipelineStats.from_json(json.loads(f.read_text()))
        merged = stats if merged is None else merged + stats
    return merged


def _removed_counts(layout: Layout, label: str) -> dict[str, dict[str, int]]:
    reasons: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "bytes": 0})
    for f in sorted((layout.removed / label / COUNTS_DIR).glob("*.json")):
        for reason, c in json.loads(f.read_text()).items():
            reasons[reason]["docs"] += c["docs"]
            reasons[reason]["bytes"] += c["bytes"]
    return dict(reasons)


def _source_section(labels: list[str], per_source: dict[str, dict[str, int]], layout: Layout,
                    names: list[str]) -> dict:
    """Per source: documents in, removed by each step, kept; and each dedup step's overlap matrix."""
    table = {}
    for name in names:
        counts = [per_source.get(label, {}).get(name, 0) for label in labels]
        table[name] = {"docs_in": counts[0],
                       "removed": {label: before - after for label, before, after
                                   in zip(labels[1:], counts, counts[1:])},
                       "docs_kept": counts[-1]}
    overlap = {label: json.loads((layout.work / label / OVERLAP_FILE).read_text())
               for label in labels[1:] if (layout.work / label / OVERLAP_FILE).is_file()}
    return {"order": names, "table": table, "overlap": overlap}


def build_report(stages: list[Stage], layout: Layout, labels: list[str], sources: list[str] | None = None) -> dict:
    """`sources`: names of a run's several sources, for the per-source table and overlap matrices."""
    meters: dict[str, dict[str, int]] = {}
    per_source: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = defaultdict(float)
    counters: dict[str, dict[str, int]] = defaultdict(dict)
    for stage in stages:
        stats = _stage_stats(stage, layout)
        if stats is None:
            continue
        last_pull = 0.0  # time spent upstream of the latest meter, summed over the stage's tasks
        for i, step_stats in enumerate(stats.stats):
            d = step_stats.to_dict()
            values = d["stats"]
            name = d["name"].split(": ", 1)[-1]
            if name.startswith(METER_PREFIX):
                label = name[len(METER_PREFIX):]
                pull = float(_total(values.get("pull_seconds", 0)))
                seconds[label] += pull - last_pull
                last_pull = pull
                meters[label] = {"docs": int(_total(values.get("docs", 0))),
                                 "bytes": int(_total(values.get("bytes", 0)))}
                per_source[label] = {k[len(SOURCE_STAT_PREFIX):]: int(_total(v)) for k, v in values.items()
                                     if k.startswith(SOURCE_STAT_PREFIX)}
                continue
            label = stage.step_at.get(i)
            if label is None:
                continue
            if "wall_seconds" in values:
                wall = float(_total(values["wall_seconds"]))
                seconds[label] += wall - last_pull
                last_pull = wall
            for key, value in values.items():
                if key.startswith(EXTRA_COUNTER_PREFIXES):
                    counters[label][key] = counters[label].get(key, 0) + int(_total(value))

    steps = []
    previous = None
    for label in labels:
        out = meters.get(label, {"docs": 0, "bytes": 0})
        row = {"step": label,
               "docs_in": previous["docs"] if previous else out["docs"],
               "bytes_in": previous["bytes"] if previous else out["bytes"],
               "docs_out": out["docs"], "bytes_out": out["bytes"],
               "seconds": round(seconds.get(label, 0.0), 3),
               "removed": _removed_counts(layout, label) if label != INPUT_LABEL else {},
               "counts": counters.get(label, {})}
        steps.append(row)
        previous = out
    first, last = steps[0], steps[-1]
    report = {
        "input": {"docs": first["docs_out"], "bytes": first["bytes_out"], "counts": first["counts"],
                  "read_seconds": first["seconds"]},
        "output": {"docs": last["docs_out"], "bytes": last["bytes_out"], "path": str(layout.data)},
        "removed_path": str(layout.removed),
        "steps": steps[1:],
    }
    if sources:
        report["sources"] = _source_section(labels, per_source, layout, sources)
    return report


def write_report(report: dict, layout: Layout) -> Path:
    tmp = layout.report.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.rename(layout.report)
    return layout.report


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def print_report(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Data cleaning report", show_lines=False)
    for col in ("step", "docs in", "docs out", "removed", "MB in", "MB out", "s"):
        table.add_column(col, justify="left" if col == "step" else "right")
    table.add_row("input", "", f"{report['input']['docs']:,}", "", "", _mb(report["input"]["bytes"]), "")
    for s in report["steps"]:
        table.add_row(s["step"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{s['docs_in'] - s['docs_out']:,}",
                      _mb(s["bytes_in"]), _mb(s["bytes_out"]), f"{s['seconds']:.1f}")
    console.print(table)

    reasons = Table(title="Removed, per reason")
    for col in ("step", "reason", "docs", "MB"):
        reasons.add_column(col, justify="left" if col in ("step", "reason") else "right")
    for s in report["steps"]:
        for reason, c in sorted(s["removed"].items()):
            reasons.add_row(s["step"], reason, f"{c['docs']:,}", _mb(c["bytes"]))
    if reasons.row_count:
        console.print(reasons)

    counts = Table(title="Counts")
    for col in ("step", "counter", "value"):
        counts.add_column(col, justify="right" if col == "value" else "left")
    for s in [{"step": "input", "counts": report["input"]["counts"]}, *report["steps"]]:
        for key, value in sorted(s["counts"].items()):
            if not key.startswith("dropped_"):
                counts.add_row(s["step"], key, f"{value:,}")
    if counts.row_count:
        console.print(counts)
    if "sources" in report:
        _print_sources(report["sources"], console)
    console.print(f"kept: {report['output']['docs']:,} documents in {report['output']['path']}; "
                  f"removed documents by reason under {report['removed_path']}")


def _print_sources(section: dict, console: Console) -> None:
    names = section["order"]
    steps = list(section["table"][names[0]]["removed"]) if names else []
    table = Table(title="Per source: documents in, removed by each step, kept")
    for col in ("source", "in", *steps, "kept"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for name in names:
        row = section["table"][name]
        table.add_row(name, f"{row['docs_in']:,}", *(f"{row['removed'][s]:,}" for s in steps), f"{row['docs_kept']:,}")
    console.print(table)
    for label, matrix in section["overlap"].items():
        overlap = Table(title=f"{label}: removed from (row), kept copy from (column)")
        for col in ("removed from", *names):
            overlap.add_column(col, justify="left" if col == "removed from" else "right")
        for name in names:
            overlap.add_row(name, *(f"{matrix[name][other]:,}" for other in names))
        console.print(overlap)
