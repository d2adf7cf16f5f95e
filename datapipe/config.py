"""Typed, validated pipeline config: defaults < recipe < YAML < dotted CLI overrides.

Every problem is collected and reported at once, each naming its key and the file.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datapipe.steps import ALL_STEPS, validate_step


class ConfigError(ValueError):
    """All problems found in a config, one per line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputConfig(_Section):
    path: str = Field(description="File or folder to read (a folder is read recursively).")
    format: Literal["jsonl", "parquet", "text", "hf_dataset"] = Field("jsonl", description="Input format.")
    text_field: str = Field("text", description="Field holding the text (the response field for SFT rows).")
    glob: str | None = Field(None, description="Only files matching this pattern, relative to `path`.")
    text_split: Literal["file", "blank_line"] = Field(
        "file", description="Plain text: one document per file, or per blank-line-separated block.")
    split: str | None = Field(None, description="HF dataset folder holding several splits: which one.")
    on_bad_input: Literal["error", "skip"] = Field(
        "error", description="Bad rows stop the run with file:line, or are skipped and counted.")


class OutputConfig(_Section):
    path: str = Field(description="Run folder: data/, removed/, report.json, and the work/ area.")
    format: Literal["jsonl", "parquet"] = Field("jsonl", description="Format of the kept documents.")
    annotations: bool = Field(False, description="Add a `meta` field with what the steps measured (language, ...).")


class SlurmConfig(_Section):
    partition: str = Field(description="Partition to submit to.")
    time: str = Field("04:00:00", description="Time limit per array task.")
    cpus_per_task: int = Field(1, ge=1, description="CPUs per array task.")
    mem_per_cpu_gb: int | None = Field(
        2, ge=1, description="Memory per CPU (GB); null requests none (for clusters without memory accounting).")
    job_name: str = Field("clean_data", description="Prefix of the Slurm job names.")
    venv_path: str | None = Field(None, description="Python venv the jobs activate; default: the launching one.")
    qos: str = Field("", description="QOS to request; empty for none.")
    sbatch_args: dict[str, Any] = Field(default_factory=dict, description="Extra #SBATCH options.")
    tasks_per_job: int = Field(1, ge=1, description="Tasks run one after another by each array job.")
    srun: bool = Field(True, description="Start each task with srun inside its job (datatrove's default).")
    wait: bool = Field(True, description="Block until every job ends, then write the report.")
    poll_seconds: float = Field(5.0, gt=0, description="How often to check job progress while waiting.")


class ExecutorConfig(_Section):
    kind: Literal["local", "slurm"] = Field("local", description="Run here, or as Slurm array jobs.")
    workers: int = Field(1, ge=1, description="Local: worker processes running tasks in parallel.")
    tasks: int | None = Field(None, ge=1, description="Tasks per document stage; default: one per input file.")
    slurm: SlurmConfig | None = Field(None, description="Required when kind is slurm.")


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class PipelineConfig(_Section):
    recipe: Literal["web", "code", "instructions", "custom"] = Field("web", description="Default step list.")
    input: InputConfig | None = Field(None, description="The one input; or name several under `sources`.")
    sources: dict[str, InputConfig] | None = Field(
        None, description="Several named inputs, deduplicated against each other; listed in priority order "
                          "(a duplicate keeps the copy from the source listed first).")
    source_field: str = Field("source", description="With `sources`: the output field naming each row's source.")
    output: OutputConfig
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    steps: list[str | dict[str, dict[str, Any] | None]] | None = Field(
        None, description="The step list (recipe: custom), each a name or {name: {params}}.")
    step_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Parameter overrides for a recipe's steps, by step name.")
    tokenizer: Literal["shared", "datatrove"] = Field(
        "shared", description="shared: each text is word/sentence-tokenized once for all steps (same spaCy "
                              "rules, same decisions); datatrove: every step tokenizes on its own (slow).")


def input_sources(cfg: PipelineConfig) -> list[tuple[str, InputConfig]]:
    """(name, input) in priority order; a single `input` is one source named "input"."""
    if cfg.sources is not None:
        return list(cfg.sources.items())
    return [("input", cfg.input)] if cfg.input is not None else []


def recipe_steps(cfg: PipelineConfig) -> list[tuple[str, dict]]:
    """The (name, params) list a config resolves to."""
    from datapipe.recipes import RECIPES

    if cfg.recipe == "custom":
        raw = cfg.steps or []
    else:
        raw = RECIPES[cfg.recipe](cfg.step_params)
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append((item, {}))
        else:
            (name, params), = item.items()
            out.append((name, dict(params or {})))
    if cfg.recipe == "custom":
        out = [(name, {**params, **cfg.step_params.get(name, {})}) for name, params in out]
    return out


def step_labels(steps: list[tuple[str, dict]]) -> list[str]:
    """Unique labels: the step name, suffixed when a step appears more than once."""
    seen: dict[str, int] = {}
    labels = []
    for name, _ in steps:
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return labels


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = value


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: where, and what (e.g. a `!!python/...` tag)."""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML, apply `a.b=value` overrides (values parsed as YAML), validate everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({yaml_problem(err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: invalid YAML value ({yaml_problem(err)})") from None
        _set_dotted(data, key, parsed)
    return validate_config(data, str(path))


def validate_config(data: dict, source: str = "<config>") -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        lines = [f"{source}: {'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigError("\n".join(lines)) from None
    errors = []
    if cfg.recipe == "custom" and not cfg.steps:
        errors.append("steps: recipe 'custom' needs a non-empty step list")
    if cfg.recipe != "custom" and cfg.steps:
        errors.append(f"steps: only for recipe 'custom' (recipe {cfg.recipe!r} has its own; use step_params)")
    if cfg.executor.kind == "slurm" and cfg.executor.slurm is None:
        errors.append("executor.slurm: required when executor.kind is slurm")
    if (cfg.input is None) == (cfg.sources is None):
        errors.append("input, sources: give exactly one (one input, or several named sources)")
    if cfg.sources is not None and not cfg.sources:
        errors.append("sources: needs at least one source")
    if cfg.sources is not None and cfg.source_field == "text":
        errors.append("source_field: 'text' is the merged output's text field; choose another name")
    for name, inp in input_sources(cfg):
        key = "input" if cfg.sources is None else f"sources.{name}"
        if cfg.sources is not None and not SOURCE_NAME.fullmatch(name):
            errors.append(f"{key}: source names use letters, digits, '_', '.', '-' only")
        if not Path(inp.path).exists():
            errors.append(f"{key}.path: {inp.path} does not exist")
    malformed = [item for item in cfg.steps or [] if isinstance(item, dict) and len(item) != 1]
    errors += [f"steps: each item is a name or a one-key mapping, got keys {sorted(item)}" for item in malformed]
    if not malformed and not (cfg.recipe == "custom" and not cfg.steps):
        steps = recipe_steps(cfg)
        for name in cfg.step_params:
            if name not in {n for n, _ in steps}:
                errors.append(f"step_params.{name}: not a step of recipe {cfg.recipe!r} "
                              f"(steps: {[n for n, _ in steps]})")
        for (name, params), label in zip(steps, step_labels(steps)):
            if name not in ALL_STEPS:
                errors.append(f"steps.{label}: unknown step (known: {list(ALL_STEPS)})")
                continue
            errors += validate_step(name, label, params)
    if errors:
        raise ConfigError("\n".join(f"{source}: {e}" for e in errors))
    return cfg


def default_venv() -> str | None:
    """The running interpreter's venv, which Slurm jobs activate so they see the same packages."""
    return sys.prefix if sys.prefix != sys.base_prefix else None
