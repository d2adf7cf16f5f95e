"""What the benchmarks share: clocks, peak-memory figures, the worker-process protocol, load and spread.

Each benchmark runs every contender in a child process of its own (`python bench/X.py --worker NAME ...`)
that prints one `RESULT {json}` line; `run_worker` starts it and returns that dict, or raises with the
child's output when it fails or prints none.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

RESULT = "RESULT "


# ----------------------------------------------------------------------------- inside a worker


def rss_bytes() -> int:
    """This process's resident set size now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(baseline: int) -> float:
    """GPU `max_memory_allocated`, or on CPU the peak resident set size above `baseline` (from `rss_bytes`)."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - baseline


def make_clock(timer: str = "wall"):
    """A function returning seconds after waiting for queued GPU work: wall clock (`perf_counter`), this
    process's CPU time (`timer="cpu"`, all its threads), or both as a (wall, cpu) pair (`timer="both"`)."""
    import torch

    def now():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if timer == "both":
            return time.perf_counter(), time.process_time()
        return time.process_time() if timer == "cpu" else time.perf_counter()
    return now


def clocked(loader_cls, marks: list[float], now):
    """The loader class with a clock reading at every batch request: one reading per optimizer step."""

    class Clocked(loader_cls):
        def __iter__(self):
            for batch in super().__iter__():
                marks.append(now())
                yield batch
    return Clocked


def emit_result(result: dict) -> None:
    print(RESULT + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- in the driver


def work_folder(workdir: str | None, prefix: str) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """`workdir`, created if missing; without one a fresh temporary folder and its handle (to clean up)."""
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        workdir = tmp.name
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    return work, tmp


def run_worker(cmd: Sequence[str], name: str, cwd: str | Path, env: dict[str, str] | None = None) -> dict:
    """Run one contender's child process; its RESULT dict, or RuntimeError with the end of its output."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    found = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"run '{name}' failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(found[-1].removeprefix(RESULT))


class LoadSampler:
    """The 1-minute load average every `every` seconds while the block runs (the contender's own
    process included): `summary()` gives its median and max, the CPU count and the samples."""

    def __init__(self, every: float = 2.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        return {"load1_median": statistics.median(self.samples), "load1_max": max(self.samples),
                "cpus": os.cpu_count()}


def spread(values: Sequence[float]) -> dict:
    """Median, min and max of a figure over rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt_spread(s: dict, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    """'median [min-max]' of a `spread` dict, each times `scale`."""
    f = lambda v: f"{v * scale:.{digits}f}{suffix}"  # noqa: E731
    return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]"
