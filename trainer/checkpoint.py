"""Sharded checkpoints committed atomically: temp folder -> rename -> completion marker.

Layout: OUTPUT/checkpoints/step_00000100/ holds Accelerate's state (DeepSpeed writes one
shard set per rank), every rank's RNG, the scheduler, `trainer_state.json` (step, tokens
seen, data position), the resolved `config.yaml` and `manifest.json` (every file's size and
xxh3-64 hash); `COMPLETE` is written last, so a folder without it is a partial write and is never
resumed from. Resume checks the manifest first: a file that rotted, was truncated by a full disk or
was replaced since the save is found before anything is loaded. Finding checkpoints in a run
folder is `trainer.run_folder`'s.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash
from accelerate import Accelerator

from trainer.atomic import commit_directory, staging_path
from trainer.portable import (
    Topology,
    TrainingParts,
    check_resumable,
    gather_state,
    load_portable,
    needs_portable,
    resume_note,
    saved_topology,
    write_portable,
    write_topology,
)
from trainer.run_folder import (
    COMPLETE_MARKER,
    STEP_PREFIX,
    checkpoints_root,
    complete_checkpoints,
    find_checkpoint,
    step_of,
)
from trainer.safe_load import checkpoint_loading, safe_torch_load

TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG_FILE = "model_config.json"
MANIFEST = "manifest.json"
FINISHED_MARKER = "COMPLETED"
_HASH_CHUNK = 8 << 20
# Written after the manifest, so it cannot be in it.
_UNLISTED = {MANIFEST, COMPLETE_MARKER}


class DamagedCheckpoint(ValueError):
    """A checkpoint whose files no longer match its manifest; the message names the file."""


class AlreadyFinished(Exception):
    """`--resume auto` on a run that reached max_steps: nothing to do, and not an error."""


@dataclass(frozen=True)
class Verified:
    files: int
    bytes: int
    seconds: float
    has_manifest: bool = True

    def summary(self) -> str:
        return f"verified {self.files} files, {self.bytes / 1e6:.1f} MB in {self.seconds:.2f} s"


def file_hash(path: Path) -> str:
    digest = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() not in _UNLISTED)


def write_manifest(folder: str | Path) -> Path:
    """Every file's size and hash, once all ranks' files are in `folder` and before it is committed."""
    folder = Path(folder)
    files = {rel: {"size": (folder / rel).stat().st_size, "xxh3_64": file_hash(folder / rel)}
             for rel in _listed_files(folder)}
    _fsync_write(folder / MANIFEST, json.dumps({"version": 1, "files": files}, indent=1))
    return folder / MANIFEST


def verify_checkpoint(folder: str | Path) -> Verified:
    """Sizes of every listed file first (a truncated or missing file costs no reading), then hashes;
    raises DamagedCheckpoint naming the first file that does not match. A checkpoint from before
    manifests existed cannot be checked: `has_manifest` is False."""
    folder = Path(folder)
    start = time.perf_counter()
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return Verified(0, 0, 0.0, has_manifest=False)
    try:
        files = json.loads(manifest_path.read_text())["files"]
        expected = {str(rel): (int(e["size"]), str(e["xxh3_64"])) for rel, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise DamagedCheckpoint(f"{manifest_path}: manifest is unreadable (not the JSON this trainer writes)") from None
    for rel, (size, _) in expected.items():
        path = folder / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise DamagedCheckpoint(f"{manifest_path}: lists {rel}, which is outside the checkpoint")
        if not path.is_file():
            raise DamagedCheckpoint(f"{path}: missing (listed in the manifest)")
        actual = path.stat().st_size
        if actual != size:
            raise DamagedCheckpoint(f"{path}: {actual} bytes, the manifest says {size} (truncated or rewritten)")
    # DeepSpeed globs for shard files, so a file added since the save would be loaded too.
    extra = sorted(set(_listed_files(folder)) - expected.keys())
    if extra:
        raise DamagedCheckpoint(f"{folder / extra[0]}: not in the manifest (added after the save)")
    for rel, (_, digest) in expected.items():
        if file_hash(folder / rel) != digest:
            raise DamagedCheckpoint(f"{folder / rel}: contents differ from the manifest (hash mismatch)")
    total = sum(size for size, _ in expected.values())
    return Verified(len(expected), total, time.perf_counter() - start)


def _is_main_rank() -> bool:
    # resolve_resume runs on every rank before anything says which one it is; the launcher's env does.
    return os.environ.get("RANK", "0") == "0"


def _say(line: str, err: bool = False) -> None:
    if _is_main_rank():
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def _verified(checkpoint: Path) -> Path:
    """`checkpoint`, once its files match its manifest (DamagedCheckpoint otherwise)."""
    report = verify_checkpoint(checkpoint)
    if report.has_manifest:
        _say(f"{checkpoint.name}: {report.summary()}")
    else:
        _say(f"note: {checkpoint} has no {MANIFEST} (written before manifests existed): its files cannot be "
             "verified", err=True)
    return checkpoint


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """`auto`: the newest complete checkpoint whose files match its manifest (each damaged one is
    skipped with a warning), or None for a fresh start; a path: a complete checkpoint, or a run
    folder's newest, which must match its manifest."""
    if resume is None:
        return None
    if resume == "auto":
        done = complete_checkpoints(output_dir)
        for checkpoint in reversed(done):
            try:
                return _verified(checkpoint)
            except DamagedCheckpoint as err:
                _say(f"warning: skipping damaged checkpoint {checkpoint.name}: {err}", err=True)
        if done:
            _say(f"warning: no intact checkpoint in {checkpoints_root(output_dir)}: starting from step 0", err=True)
        return None
    try:
        checkpoint = find_checkpoint(resume)
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"--resume {err}") from None
    try:
        return _verified(checkpoint)
    except DamagedCheckpoint as err:
        raise DamagedCheckpoint(f"--resume {checkpoint}: damaged checkpoint: {err}") from None


# What fixes the shape of every saved tensor; the rest (attention kernel, recomputation, max length)
# may change between runs.
_SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "multiple_of",
               "ffn_dim_multiplier", "tie_embeddings")


def check_same_model(checkpoint: str | Path, model_config: dict[str, Any]) -> None:
    """Refuse, naming the key, a checkpoint of another model shape before anything is loaded into it."""
    path = Path(checkpoint) / MODEL_CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path}: not valid JSON") from None
    differ = [f"{k} {saved.get(k)!r} there, {model_config.get(k)!r} here" for k in _SHAPE_KEYS
              if k in saved and k in model_config and saved[k] != model_config[k]]
    if differ:
        raise ValueError(f"--resume {checkpoint}: another model shape ({'; '.join(differ)}); resume with the model "
                         "that wrote it, or start a new run from it with model.init_from")


def check_not_finished(resume: str | None, output_dir: str | Path, max_steps: int) -> None:
    """Raise AlreadyFinished for `--resume auto` on a run that reached `max_steps` (COMPLETED and a
    checkpoint at that step), before any data, process group or model is built."""
    if resume != "auto" or not (Path(output_dir) / FINISHED_MARKER).is_file():
        return
    done = complete_checkpoints(output_dir)
    if done and step_of(done[-1]) >= max_steps:
        raise AlreadyFinished(f"{output_dir}: already finished at step {step_of(done[-1])} "
                              f"(train.max_steps={max_steps}); nothing to do")


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
    parts: TrainingParts | None = None,
    portable: bool = True,
) -> Path:
    """Every rank calls this; DeepSpeed writes each rank's shards into the shared temp folder.
    With `parts` and `portable`, the portable state goes beside them (trainer.portable)."""
    final = checkpoints_root(output_dir) / f"{STEP_PREFIX}{step:08d}"
    # Not atomic_directory: every rank writes its own shards into the folder, so its name must be
    # one each rank computes alike, and only rank 0 commits it.
    tmp = staging_path(final, unique=False)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save of this step
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    portable_state = (gather_state(parts, keep=accelerator.is_main_process)
                      if parts is not None and portable else None)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if portable_state is not None:
            write_portable(tmp, *portable_state)
        if parts is not None:
            write_topology(tmp, Topology(accelerator.num_processes, parts.zero_stage, portable_state is not None))
        _fsync_write(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=2))
        _fsync_write(tmp / "config.yaml", config_yaml)
        for name, text in (extra_files or {}).items():
            _fsync_write(tmp / name, text)
        # Before the rename and COMPLETE: a checkpoint marked complete always has its manifest.
        write_manifest(tmp)
        commit_directory(tmp, final, replace=True)  # the same step again: this run's own
        _fsync_write(final / COMPLETE_MARKER, f"step {step}\n")
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path, parts: TrainingParts | None = None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG on every rank; return the trainer state.

    A checkpoint written by another world size or ZeRO stage is restored from its portable state
    (given `parts`); every file is read with weights_only=True (trainer.safe_load)."""
    path = Path(path)
    saved = saved_topology(path)
    if parts is not None:
        now = Topology(accelerator.num_processes, parts.zero_stage, True)
        check_resumable(path, saved, now)
        if needs_portable(saved, now):
            _say(resume_note(saved, now))
            load_portable(path, parts)
            return _trainer_state(path)
    check_latest(path)
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    # Accelerate swallows any failure to restore the RNG, a missing file included (an info-level
    # log line), and the resumed run would then quietly stop being exact.
    try:
        safe_torch_load(rng)
    except Exception as err:
        raise ValueError(f"{rng}: cannot restore this rank's random state, so the resume would not be "
                         f"exact: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    with checkpoint_loading():
        accelerator.load_state(str(path))
    return _trainer_state(path)


def _trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable trainer state ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        # A damaged file is bad input (one line, exit 2), not a type error in the code.
        raise ValueError(f"{path}: not the trainer state this trainer writes (no integer 'step')")  # noqa: TRY004
    return state


def check_latest(checkpoint: str | Path) -> str | None:
    """The tag in DeepSpeed's `latest` file, which it joins onto the checkpoint path: it must name a
    folder inside the checkpoint."""
    latest = Path(checkpoint) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag or Path(tag).is_absolute() or len(Path(tag).parts) != 1 or tag in (".", ".."):
        raise ValueError(f"{latest}: names {tag!r}, not a folder inside the checkpoint")
    if not (Path(checkpoint) / tag).is_dir():
        raise ValueError(f"{latest}: names {tag!r}, which is not a folder in the checkpoint")
    return tag
