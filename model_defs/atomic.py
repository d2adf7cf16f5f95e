"""Folders that appear whole or not at all: filled in a hidden sibling, then renamed into place.

An existing folder is never deleted or overwritten unless the caller says it may be
(`replace=True`), which a caller does only for a folder its own run wrote. Lives in
model_defs so the standalone model package can write its HF folders the same way.
"""
from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def staging_path(target: str | os.PathLike, unique: bool = True) -> Path:
    """A hidden sibling of `target` (same filesystem, so the final rename is atomic).

    `unique=False` gives a fixed name that every rank of a job can compute on its own.
    """
    target = Path(target)
    suffix = f"-{uuid.uuid4().hex[:8]}" if unique else ""
    return target.parent / f".tmp-{target.name}{suffix}"


def is_occupied(target: str | os.PathLike) -> bool:
    """A file, a link, or a folder with anything in it; replacing an empty folder loses nothing."""
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        return True
    return target.is_dir() and any(target.iterdir())


def refuse_occupied(target: str | os.PathLike, replace: bool = False) -> None:
    """What `atomic_directory` raises on entry, for callers to check before expensive work."""
    if not replace and is_occupied(target):
        raise ValueError(f"{target}: already exists and is not an empty folder; refusing to replace it")


def commit_directory(staging: str | os.PathLike, target: str | os.PathLike, replace: bool = False) -> Path:
    """Rename the finished `staging` folder to `target`.

    An occupied target is a ValueError unless `replace`; then it is moved aside first and
    removed only once the new folder is in place, so a crash leaves one or the other.
    """
    staging, target = Path(staging), Path(target)
    if not is_occupied(target):
        try:
            staging.rename(target)  # onto nothing or an empty folder, atomically
            return target
        except OSError:
            if not is_occupied(target):
                raise
            # Something was written there meanwhile: treated like any occupied target below.
    refuse_occupied(target, replace)
    old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    try:
        staging.rename(target)
    except BaseException:
        old.rename(target)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside `target`; on success it becomes `target`.

    On any error the staging folder is removed and `target` is left as it was. An occupied
    `target` is refused before any work unless `replace`.
    """
    target = Path(target)
    refuse_occupied(target, replace)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_path(target)
    staging.mkdir()
    try:
        yield staging
        commit_directory(staging, target, replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
