"""Chunked JSONL output that a rerun of the same command continues.

Beside `out.jsonl` lies `out.jsonl.state.json`: the settings the file is written with, how many
input items are done, and the byte length of the committed rows. A chunk is appended and fsynced,
then the state is replaced atomically; a kill between the two leaves a tail past the committed
length, which the next run cuts (it is this command's own uncommitted chunk) and writes again.
Items are processed in a fixed order and sampled per item, so the rerun reproduces that chunk.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_FORMAT = "synthesize-chunks/1"


def state_path(path: Path) -> Path:
    return path.with_name(path.name + ".state.json")


@dataclass
class Progress:
    items_done: int = 0
    rows: int = 0
    bytes: int = 0
    complete: bool = False
    counters: dict[str, int] = field(default_factory=dict)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class ChunkedJsonl:
    """One output file written in chunks under fixed `settings` (JSON-serializable)."""

    def __init__(self, path: str | Path, settings: dict[str, Any]):
        self.path = Path(path)
        self.state_file = state_path(self.path)
        self.settings = json.loads(json.dumps(settings))  # what reading the state back will compare with
        self.progress = Progress()

    def open(self) -> Progress:
        """Check what is there and return where to continue; raises ValueError (one line) and changes
        nothing when the file is not ours or was written with other settings."""
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a folder; the output is a JSONL file")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent}: no such folder for the output")
        if not self.state_file.exists():
            if self.path.exists():
                raise ValueError(f"{self.path}: exists but has no {self.state_file.name}, so it was not written "
                                 "by this command; choose another output")
            return self.progress
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{self.state_file}: unreadable resume state ({err})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.state_file}: not a resume state of this command")
        differing = sorted(k for k in set(state["settings"]) | set(self.settings)
                           if state["settings"].get(k) != self.settings.get(k))
        if differing:
            key = differing[0]
            raise ValueError(f"{self.path}: written with other settings ({key}: {state['settings'].get(key)!r} "
                             f"there, {self.settings.get(key)!r} now); rerun with the same settings or choose "
                             "another output")
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < state["bytes"]:
            raise ValueError(f"{self.path}: shorter ({size} bytes) than its state says ({state['bytes']}); "
                             "the file was changed outside this command")
        self.progress = Progress(state["items_done"], state["rows"], state["bytes"], state["complete"],
                                 dict(state.get("counters", {})))
        return self.progress

    def rows(self) -> list[dict]:
        """The committed rows (an uncommitted tail is ignored)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            data = f.read(self.progress.bytes)
        return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]

    def commit(self, rows: Sequence[dict], items_done: int, counters: dict[str, int] | None = None,
               complete: bool = False) -> None:
        """Append `rows` (the output of input items up to `items_done`) and record the new resume point."""
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        with open(self.path, "ab") as f:
            # A previous run killed after appending but before its state: that tail is cut here.
            f.truncate(self.progress.bytes)
            f.seek(self.progress.bytes)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        p = self.progress
        p.items_done, p.rows, p.bytes, p.complete = items_done, p.rows + len(rows), p.bytes + len(data), complete
        if counters is not None:
            p.counters = dict(counters)
        write_json_atomic(self.state_file, {"format": STATE_FORMAT, "settings": self.settings,
                                             "items_done": p.items_done, "rows": p.rows, "bytes": p.bytes,
                                             "complete": p.complete, "counters": p.counters})
