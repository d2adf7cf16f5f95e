"""What a path stands for: a run folder, one of its checkpoints, an HF model folder or an adapter.

A run folder (`train.output_dir`):
  config.yaml                 the resolved config
  checkpoints/step_00000100/  one checkpoint; complete once its COMPLETE marker exists
  tokenizer/                  SFT/DPO: the tokenizer, with the chat template the run trained with
  adapter/  adapter_hf/       PEFT runs: the adapter in our and in HF Llama module names
  model/                      full fine-tuning: the tuned model as an HF Llama folder
  COMPLETED                   training reached max_steps
An HF model folder holds config.json + safetensors; an adapter folder adapter_config.json.
A Hub id (`owner/name`, not a local path) stands for its snapshot in huggingface_hub's cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from trainer.hub import hub_snapshot, is_hub_id

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
STEP_PREFIX = "step_"
_RUN_OUTPUTS = ("tokenizer", "adapter", "adapter_hf", "model")


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(STEP_PREFIX))


def is_checkpoint(path: str | Path) -> bool:
    """A complete checkpoint: a partial write never has the marker."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit()
             and is_checkpoint(p)]
    return sorted(found, key=step_of)


@dataclass(frozen=True)
class RunPaths:
    """The folders one path stands for; None where it has no such thing."""

    path: Path
    run: Path | None         # the run folder the path is, or lies in
    checkpoint: Path | None  # a complete checkpoint: the path itself, or a run folder's newest
    model: Path | None       # an HF model folder: the path itself, or a run folder's model/
    adapter: Path | None     # a PEFT adapter: the path itself, or a run folder's adapter/
    tokenizer: Path | None   # the tokenizer that goes with it

    @property
    def is_run(self) -> bool:
        return self.run == self.path


def resolve(path: str | Path) -> RunPaths:
    if is_hub_id(path):
        path = hub_snapshot(str(path))
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    run = _run_of(path)
    if run == path:
        done = complete_checkpoints(run)
        checkpoint = done[-1] if done else None
        model, adapter = _holding(run / "model", "config.json"), _holding(run / "adapter", "adapter_config.json")
    else:
        checkpoint = path if is_checkpoint(path) else None
        model, adapter = _holding(path, "config.json"), _holding(path, "adapter_config.json")
    return RunPaths(path, run, checkpoint, model, adapter, _tokenizer_of(path, run, checkpoint))


def find_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint `path` names, or a run folder's newest one."""
    paths = resolve(path)
    if paths.checkpoint is not None:
        return paths.checkpoint
    if paths.is_run:
        raise FileNotFoundError(f"{paths.path}: run folder has no complete checkpoint")
    raise ValueError(_not_a_checkpoint(paths.path))


def model_source(path: str | Path) -> Path:
    """The weights `path` stands for: a complete checkpoint (a run folder's newest) or an HF model folder."""
    paths = resolve(path)
    if paths.checkpoint is not None:
        return paths.checkpoint
    if paths.is_run:
        raise FileNotFoundError(f"{paths.path}: run folder has no complete checkpoint")
    if paths.model is not None:
        return paths.model
    if paths.adapter is not None:
        raise ValueError(f"{paths.path}: a PEFT adapter, not a model; load it onto its base "
                         "(--adapter, trainer.export.load_with_adapter)")
    if paths.path.name.startswith(STEP_PREFIX):
        raise ValueError(_not_a_checkpoint(paths.path))
    raise FileNotFoundError(f"{paths.path}: neither a checkpoint of ours nor an HF model folder (no config.json)")


def tokenizer_for_model(init_from: str) -> Path | None:
    """The tokenizer of the model a run starts from (`model.init_from`), None where it names none."""
    return resolve(init_from).tokenizer


def _not_a_checkpoint(path: Path) -> str:
    if path.name.startswith(STEP_PREFIX):
        return f"{path}: checkpoint is incomplete (no {COMPLETE_MARKER} marker)"
    return f"{path}: not a checkpoint (no {COMPLETE_MARKER} marker) nor a run folder (no {CHECKPOINTS}/)"


def _run_of(path: Path) -> Path | None:
    candidates = [path]
    if path.parent.name == CHECKPOINTS:
        candidates.append(path.parent.parent)
    if path.name in _RUN_OUTPUTS:
        candidates.append(path.parent)
    return next((c for c in candidates if checkpoints_root(c).is_dir()), None)


def _holding(folder: Path, marker: str) -> Path | None:
    return folder if (folder / marker).is_file() else None


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()


def _tokenizer_of(path: Path, run: Path | None, checkpoint: Path | None) -> Path | None:
    """The path's own tokenizer files, else the run's tokenizer/ (SFT/DPO save the chat one there),
    else the `data.tokenizer` the checkpoint or the run was configured with (pretraining)."""
    for folder in (path, run / "tokenizer" if run else None):
        if folder is not None and _has_tokenizer(folder):
            return folder
    for folder in (checkpoint, run):
        configured = _configured_tokenizer(folder / "config.yaml") if folder is not None else None
        if configured is not None:
            return configured
    return None


def _configured_tokenizer(config: Path) -> Path | None:
    if not config.is_file():
        return None
    tokenizer = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("tokenizer")
    return Path(tokenizer) if tokenizer else None


def check_output_dir(output_dir: str | Path) -> None:
    """`train.output_dir` must be a folder this process can create and write, found out before any work."""
    path = Path(output_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if path.exists() and not path.is_dir():
        raise ValueError(f"train.output_dir: {path} is a file, not a folder")
    if existing is not None and existing != path and not existing.is_dir():
        raise ValueError(f"train.output_dir: {existing} is a file, so {path} cannot be created")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"train.output_dir: {existing} is not writable")
