"""Write-then-rename output folders: a failed run leaves nothing half-written behind."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trainer.atomic import atomic_directory, is_occupied
from trainer.data.sources import DataError


@contextmanager
def staged_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success it becomes `out`, on any error it is removed.

    An existing non-empty `out` is refused unless `overwrite`, and is replaced only after the
    new folder is complete.
    """
    if not overwrite and is_occupied(out):
        raise DataError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it)")
    with atomic_directory(out, replace=overwrite) as tmp:
        yield tmp
