"""One call from config to cleaned data and report."""
from __future__ import annotations

from pathlib import Path

from datapipe.config import PipelineConfig
from datapipe.execute import check_same_config, run_local, submit_slurm, wait_slurm
from datapipe.plan import Layout, build_stages, ordered_labels
from datapipe.report import build_report, write_report


def run_pipeline(cfg: PipelineConfig, slurm_timeout: float | None = None) -> dict | None:
    """Runs (or resumes) the pipeline; returns the report, or None for a Slurm run not waited on."""
    layout = Layout(Path(cfg.output.path))
    stages = build_stages(cfg, layout)
    check_same_config(cfg, layout)
    if cfg.executor.kind == "local":
        run_local(stages, layout, cfg.executor.workers)
    else:
        slurm = cfg.executor.slurm
        executors = submit_slurm(stages, layout, slurm)
        if not slurm.wait:
            return None
        wait_slurm(stages, executors, layout, slurm.poll_seconds, slurm_timeout)
    report = build_report(stages, layout, ordered_labels(cfg), source_names(cfg))
    write_report(report, layout)
    return report


def source_names(cfg: PipelineConfig) -> list[str] | None:
    return list(cfg.sources) if cfg.sources is not None else None


def report_only(cfg: PipelineConfig) -> dict:
    """Rebuilds report.json from a run folder (e.g. after Slurm jobs submitted with wait: false)."""
    layout = Layout(Path(cfg.output.path))
    report = build_report(build_stages(cfg, layout), layout, ordered_labels(cfg), source_names(cfg))
    write_report(report, layout)
    return report
