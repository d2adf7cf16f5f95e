"""Sharded checkpoints committed atomically: temp folder -> rename -> completion marker.

Layout: OUTPUT/checkpoints/step_00000100/ holds Accelerate's state (DeepSpeed writes one
shard set per rank), every rank's RNG, the scheduler, `trainer_state.json` (step, tokens
seen, data position) and the resolved `config.yaml`; `COMPLETE` is written last, so a
folder without it is a partial write and is never resumed from. Finding checkpoints in a run
folder is `trainer.run_folder`'s.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from trainer.atomic import commit_directory, staging_path
from trainer.run_folder import COMPLETE_MARKER, STEP_PREFIX, checkpoints_root, complete_checkpoints, find_checkpoint

TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint, or None for a fresh start; a path: a complete checkpoint,
    or a run folder's newest."""
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        return done[-1] if done else None
    try:
        return find_checkpoint(resume)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"--resume {err}") from None


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
    final = checkpoints_root(output_dir) / f"{STEP_PREFIX}{step:08d}"
    # Not atomic_directory: every rank writes its own shards into the folder, so its name must be
    # one each rank computes alike, and only rank 0 commits it.
    tmp = staging_path(final, unique=False)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save of this step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_write(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        _fsync_write(tmp / "config.yaml", config_yaml)
        for name, text in (extra_files or {}).items():
            _fsync_write(tmp / name, text)
        commit_directory(tmp, final, replace=True)  # the same step again: this run's own
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
