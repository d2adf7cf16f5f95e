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
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
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


# ----------------------------------------------------------------------------- rounds of contenders


def add_round_args(parser, rounds: int = 3) -> None:
    """`--rounds` and `--json`, the flags every contender bench shares."""
    parser.add_argument("--rounds", type=int, default=rounds,
                        help=f"alternating rounds over the contenders (default {rounds}); figures are median "
                             "[min-max] over them")
    parser.add_argument("--json", default=None, help="write every figure (per round, spreads, ratios, load) here")


def run_rounds(names: Sequence[str], spawn, rounds: int, describe=None) -> tuple[list[dict[str, dict]], dict[str, str]]:
    """Run every contender once per round, alternating the order between rounds so drifting background load
    hits each side alike; the 1-minute load average is sampled during each run into its result's "load".

    A contender that fails (`spawn` raises RuntimeError) is reported at once, not run again, and named in the
    returned failures, so the caller can still print what the others measured before it exits non-zero.
    """
    if rounds < 1:
        raise SystemExit("error: --rounds must be at least 1")
    per_round: list[dict[str, dict]] = []
    failed: dict[str, str] = {}
    for index in range(rounds):
        this: dict[str, dict] = {}
        for name in (names if index % 2 == 0 else list(names)[::-1]):
            if name in failed:
                continue
            with LoadSampler() as load:
                try:
                    result = spawn(name)
                except RuntimeError as err:
                    failed[name] = str(err)
                    print(f"round {index + 1} {name}: FAILED\n{err}", file=sys.stderr, flush=True)
                    continue
            result["load"] = load.summary()
            this[name] = result
            shown = f"{describe(result)}, " if describe else ""
            print(f"round {index + 1} {name}: {shown}load {result['load']['load1_median']:.2f}", flush=True)
        per_round.append(this)
    return per_round, failed


def contender_spreads(per_round: list[dict[str, dict]], figures: dict[str, Callable[[dict], float]]) -> dict:
    """Per contender, the spread over rounds of each named figure (a function of one run's result), and the load."""
    names = list(dict.fromkeys(n for r in per_round for n in r))
    out = {}
    for name in names:
        runs = [r[name] for r in per_round if name in r]
        out[name] = {key: spread([f(run) for run in runs]) for key, f in figures.items()}
        out[name]["load1"] = spread([run["load"]["load1_median"] for run in runs])
        out[name]["load1_max"] = max(run["load"]["load1_max"] for run in runs)
    return out


def round_ratio(per_round: list[dict[str, dict]], top: str, bottom: str, figure: Callable[[dict], float]) -> dict | None:
    """Spread over rounds of figure(top) / figure(bottom), each ratio taken within one round; None when no
    round has both."""
    values = [figure(r[top]) / figure(r[bottom]) for r in per_round if top in r and bottom in r]
    return spread(values) if values else None


def load_summary(per_round: list[dict[str, dict]]) -> dict:
    """The machine's load over the whole bench: spread of each run's median 1-minute load, the max, the CPUs."""
    runs = [run for r in per_round for run in r.values()]
    if not runs:
        return {"cpus": os.cpu_count()}
    return {"load1": spread([run["load"]["load1_median"] for run in runs]),
            "load1_max": max(run["load"]["load1_max"] for run in runs), "cpus": os.cpu_count()}


def write_json(path: str | Path, payload: dict) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def finish(failed: dict[str, str]) -> None:
    """Exit non-zero naming the contenders that failed (after the caller reported what the others measured)."""
    if failed:
        sys.exit(f"error: {', '.join(failed)} failed")
