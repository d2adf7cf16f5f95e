"""Rank-0 run logging: a rich progress bar, metrics.jsonl and tensorboard curves."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Dense peak throughput per device (TFLOP/s) for the MFU figure; CPUs vary too much to guess.
PEAK_TFLOPS = {
    ("H100", "bf16"): 989.0, ("H100", "fp16"): 989.0,
    ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "fp32"): 19.5,
    ("A10", "bf16"): 125.0, ("L4", "bf16"): 121.0,
    ("T4", "fp16"): 65.0, ("T4", "fp32"): 8.1,
    ("V100", "fp16"): 125.0,
}


def device_peak_tflops(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for (model, dtype), tflops in PEAK_TFLOPS.items():
        if model in name and dtype == precision:
            return tflops
    return None


def truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, drop records past the checkpoint so the curve has no duplicated steps."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


class RunLogger:
    """Writes only on the main process; other ranks get a logger that does nothing."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, max_steps: int, start_step: int,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._writer = None
        self._progress = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out / "metrics.jsonl"
        truncate_metrics(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1)
        if progress:
            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._task = self._progress.add_task("train", total=max_steps, completed=start_step, stats="")
            self._progress.start()

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message)

    def log(self, step: int, metrics: dict[str, Any], split: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"{split}/{key}", value, step)
        if self._progress is not None and split == "train":
            shown = [f"loss {metrics['loss']:.4f}", f"lr {metrics['lr']:.2e}"]
            if metrics.get("grad_norm") is not None:
                shown.append(f"gnorm {metrics['grad_norm']:.2f}")
            shown.append(f"{metrics['tokens_per_s']:,.0f} tok/s")
            if metrics.get("mfu") is not None:
                shown.append(f"MFU {100 * metrics['mfu']:.1f}%")
            self._progress.update(self._task, completed=step, stats="  ".join(shown))
        elif split != "train":
            self.print(f"step {step} {split}: " + "  ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    def close(self) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        self._file.close()
