"""Rank-0 run logging: a rich progress bar, metrics.jsonl and experiment trackers (tensorboard, W&B,
MLflow, Aim) through Accelerate's tracker API, each given the same global figures."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

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


TRACKERS = ("tensorboard", "wandb", "mlflow", "aim")
# The pip package that brings each tracker (the `trackers` extra pins the ones tests use).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "aim": "aim"}


def missing_trackers(names: Sequence[str]) -> list[str]:
    """The requested trackers whose package is not installed."""
    from accelerate.utils import is_aim_available, is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available,
                 "mlflow": is_mlflow_available, "aim": is_aim_available}
    return [name for name in names if not available[name]()]


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train.lr': 3e-4, ...}: what every tracker accepts as hyperparameters (scalars and strings only)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def start_trackers(names: Sequence[str], out: Path, start_step: int, run_config: dict[str, Any] | None) -> list:
    """Accelerate trackers writing beside the run (tensorboard/, mlruns/, wandb/, .aim), started and
    given the resolved config. A resumed run's tensorboard curve drops events past the checkpoint."""
    from accelerate.tracking import AimTracker, MLflowTracker, TensorBoardTracker, WandBTracker

    run_name = out.resolve().name
    trackers = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", out, purge_step=start_step + 1))
        elif name == "wandb":
            os.environ.setdefault("WANDB_DIR", str(out))
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", run_name), name=run_name))
        elif name == "mlflow":
            # Without a tracking server, a file store in the run folder: no database to install, and the
            # figures stay with the run (MLflow 3 asks for that store to be allowed explicitly).
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                import mlflow

                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
            trackers.append(MLflowTracker(experiment_name=run_name, run_name=run_name))
        elif name == "aim":
            trackers.append(AimTracker(run_name, logging_dir=str(out)))
    for tracker in trackers:
        tracker.start()
        if run_config is not None:
            tracker.store_init_configuration(flat_config(run_config))
    return trackers


class RunLogger:
    """Writes only on the main process; other ranks get a logger that does nothing."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, max_steps: int, start_step: int,
                 trackers: Sequence[str] = ("tensorboard",), progress: bool = True,
                 run_config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._trackers: list = []
        self._progress = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out / "metrics.jsonl"
        truncate_metrics(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a")
        self._trackers = start_trackers(trackers, out, start_step, run_config)
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
        scalars = {f"{split}/{key}": value for key, value in metrics.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)}
        for tracker in self._trackers:
            tracker.log(scalars, step=step)
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
        for tracker in self._trackers:
            tracker.finish()
        self._file.close()
