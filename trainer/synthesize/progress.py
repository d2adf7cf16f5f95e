"""The progress bar every synthesize pass shows: items done, items/s, ETA."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class ItemsPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} items/s" if task.speed else "- items/s")


def item_progress(enabled: bool = True) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), ItemsPerSecond(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)
