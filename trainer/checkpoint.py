"""Sharded checkpoints committed atomically: temp folder -> rename -> completion marker.

Layout: OUTPUT/checkpoints/step_00000100/ holds Accelerate's state (DeepSpeed writes one
shard set per rank), every rank's RNG, the scheduler, `trainer_state.json` (step, tokens
seen, data position) and the resolved `config.yaml`; `COMPLETE` is written last, so a
folder without it is a partial write and is never resumed from.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"
_PREFIX = "step_"


def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    return int(path.name.removeprefix(_PREFIX))


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
        and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=step_of)


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint, or None for a fresh start; a path: must be complete."""
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(f"--resume {resume}: checkpoint is incomplete (no {COMPLETE_MARKER} marker)")
    return path


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Every rank calls this; DeepSpeed writes each rank's shards into the shared temp folder."""
    root = checkpoints_root(output_dir)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_write(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        _fsync_write(tmp / "config.yaml", config_yaml)
        for name, text in (extra_files or {}).items():
            _fsync_write(tmp / name, text)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_write(final / COMPLETE_MARKER, f"step {step}\n")
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG on every rank; return the trainer state."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / TRAINER_STATE).read_text())
