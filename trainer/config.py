"""Typed, layered run configuration: defaults < recipe YAML < dotted command-line overrides.

Every problem is gathered and reported at once, each naming its key and where it came
from (the YAML file or the command line); unknown keys get the nearest valid name.
"""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model_defs.config import ModelConfig

Precision = Literal["auto", "fp32", "fp16", "bf16"]


class ConfigError(ValueError):
    """Raised with every problem found in a configuration, one per line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """The network. Any `ModelConfig` field (dim, n_layers, attention, ...) overrides the preset."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    preset: Optional[str] = Field("tiny", description="named shape from model_defs.PRESETS")
    init_from: Optional[str] = Field(
        None, description="HF Llama/Qwen2/Mistral folder, Hub id (owner/name) or one of our checkpoints or run "
                    "folders to start from; None = random init"
    )

    @model_validator(mode="after")
    def _known_model_fields(self) -> "ModelSection":
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = [k for k in (self.model_extra or {}) if k not in known]
        if unknown:
            raise ValueError(
                "; ".join(_unknown_key_message(k, known | {"preset", "init_from"}) for k in unknown)
            )
        return self

    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class DataSection(Section):
    """Where the packed token shards and the tokenizer live."""

    path: Optional[str] = Field(None, description="prepare_data output folder (holds train/ and val/)")
    tokenizer: Optional[str] = Field(None, description="HF-format tokenizer folder; checked against the shards")
    seq_len: int = Field(256, gt=0, description="tokens per training window")
    shuffle: bool = True
    document_masking: bool = Field(
        True, description="attend only within each packed document; false attends across documents "
                          "(no mask, so SDPA keeps its fused causal kernel)")


class TrainSection(Section):
    """The loop: how long, how big, which precision and engine."""

    output_dir: str = Field("runs/default", description="run folder: checkpoints, metrics, resolved config")
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    micro_batch_size: int = Field(8, gt=0, description="sequences per rank per forward")
    grad_accum_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    precision: Precision = Field("auto", description="auto: bf16 where supported, fp16 on pre-Ampere GPUs, fp32 on CPU")
    seed: int = 0
    deepspeed: Optional[str] = Field(
        None, description="ds_configs name (zero0..zero3, zero2_offload, zero3_offload) or a JSON path"
    )
    activation_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile the model")
    loss_chunking: Literal["auto", "on", "off"] = Field(
        "auto", description="token losses without whole-batch logits: auto chunks the labelled tokens when their "
                            "fp32 logits exceed 256 MiB; on always; off = full logits (trainer/token_logps.py)")
    eval_every: int = Field(0, ge=0, description="validate every N steps; 0 = only at the end")
    eval_batches: int = Field(8, gt=0, description="validation micro-batches per rank")
    eval_at_start: bool = Field(False, description="also validate before the first step (a baseline figure)")
    max_nonfinite_steps: int = Field(5, gt=0, description="stop after this many non-finite steps in a row")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="experiment trackers (Accelerate's) that receive the logged figures; [] = metrics.jsonl only")

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, names: list[str]) -> list[str]:
        from trainer.metrics import TRACKER_PACKAGES, missing_trackers

        missing = missing_trackers(names)
        if missing:
            raise ValueError(", ".join(f"{name} is not installed (pip install {TRACKER_PACKAGES[name]}, "
                                       "or the project's `trackers` extra)" for name in missing))
        return list(dict.fromkeys(names))


class OptimSection(Section):
    """AdamW with warmup then cosine decay to a floor."""

    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    decay_embeddings: bool = Field(False, description="apply weight decay to embedding tables")
    fused: bool = Field(True, description="torch's fused AdamW kernel (CPU and CUDA)")


class CheckpointSection(Section):
    """When to write sharded checkpoints and how many to keep."""

    every: int = Field(0, ge=0, description="save every N steps (0 = only at the end)")
    keep_last: int = Field(3, gt=0)
    portable: bool = Field(True, description="also write the unsharded state (weights, AdamW moments, schedule) "
                                             "that resumes on another world size or ZeRO stage")


class LoggingSection(Section):
    """Rank-0 logging: progress bar, metrics.jsonl, tensorboard."""

    log_every: int = Field(1, gt=0)
    tensorboard: bool = Field(True, description="false drops tensorboard from train.report_to")
    progress: bool = True


class RunConfig(Section):
    """A whole run. SFT and DPO recipes extend this with a section of their own."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    optim: OptimSection = OptimSection()
    checkpoint: CheckpointSection = CheckpointSection()
    logging: LoggingSection = LoggingSection()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def trackers(self) -> list[str]:
        """The trackers this run reports to: `train.report_to`, less tensorboard when `logging.tensorboard` is off."""
        return [name for name in self.train.report_to if name != "tensorboard" or self.logging.tensorboard]


def _unknown_key_message(key: str, valid: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"command line: override '{dotted}' must name section.key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"command line: '{'.'.join(parts)}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _walk_keys(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if not isinstance(tree, dict):
        return [prefix]
    keys = [prefix] if prefix else []
    for k, v in tree.items():
        keys.extend(_walk_keys(v, prefix + (str(k),)))
    return keys


def load_config(
    path: str | Path | None,
    overrides: list[str] = (),
    schema: type[RunConfig] = RunConfig,
) -> RunConfig:
    """Build a validated config from a recipe YAML (optional) and dotted overrides."""
    tree: dict = {}
    origin: dict[tuple[str, ...], str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        tree = loaded
        origin.update({k: str(path) for k in _walk_keys(tree)})
    for text in overrides:
        parts, value = parse_override(text)
        _set_dotted(tree, parts, value)
        for i in range(1, len(parts) + 1):
            origin[tuple(parts[:i])] = "command line"

    try:
        return schema.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, schema, origin)) from None


def _format_errors(err: ValidationError, schema: type[BaseModel], origin: dict) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        # Errors raised inside a section validator carry no field; the message names the key.
        where = origin.get(loc) or origin.get(loc[:1]) or "defaults"
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            valid = _valid_names(schema, loc[:-1])
            msg = _unknown_key_message(loc[-1], valid)
            key = ".".join(loc[:-1]) or "<top level>"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)


def _valid_names(schema: type[BaseModel], loc: tuple[str, ...]) -> set[str]:
    model: Any = schema
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return set()
        model = field.annotation
    return set(model.model_fields)


def save_resolved(config: RunConfig, out_dir: str | Path) -> Path:
    out = Path(out_dir) / "config.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(config.to_yaml())
    tmp.replace(out)
    return out
