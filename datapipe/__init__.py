"""Offline data cleaning on datatrove: quality filters, dedup, PII scrubbing, decontamination.

Turns raw corpora into clean JSONL/Parquet for `launch/prepare_data.py`; runs locally or as
Slurm array jobs from the same YAML recipe (see `launch/clean_data.py`).
"""
from datapipe.config import ConfigError, PipelineConfig, load_config, validate_config
from datapipe.run import report_only, run_pipeline

__all__ = ["ConfigError", "PipelineConfig", "load_config", "validate_config", "run_pipeline", "report_only"]
