"""Preemption signals become a flag the loop checks at step boundaries (never mid-step)."""
from __future__ import annotations

import signal


class StopRequest:
    """SIGTERM / SIGUSR1 ask the run to save a checkpoint and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received else None
