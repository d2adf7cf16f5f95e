"""Runs the stage plan with datatrove's executors, locally or as dependent Slurm array jobs.

Both executors skip tasks that have a completion marker, so a re-run after a crash redoes only the
unfinished tasks of the unfinished stages.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.utils.logging import logger

import datapipe
from datapipe.config import PipelineConfig, SlurmConfig, default_venv
from datapipe.plan import Layout, Stage
from datapipe.readers import BadInputError

REPO_ROOT = Path(datapipe.__file__).resolve().parents[1]


class RunError(RuntimeError):
    """A stage did not complete; the message names the stage and where its logs are."""


def check_same_config(cfg: PipelineConfig, layout: Layout) -> None:
    """Refuse to resume into a folder produced by a different config: the outputs would mix."""
    resolved = cfg.model_dump(mode="json")
    # How a run executes does not change what it produces.
    resolved.pop("executor", None)
    if layout.resolved_config.is_file():
        previous = json.loads(layout.resolved_config.read_text())
        if previous != resolved:
            changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
            raise RunError(f"{layout.root}: holds a run made with a different config (changed: {changed}); "
                           f"use a new output.path or delete the folder")
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    tmp = layout.resolved_config.with_suffix(".tmp")
    tmp.write_text(json.dumps(resolved, indent=2))
    tmp.rename(layout.resolved_config)


def incomplete_ranks(stage: Stage, layout: Layout) -> list[int]:
    done = layout.logs / stage.name / "completions"
    return [r for r in range(stage.tasks) if not (done / f"{r:05d}").is_file()]


def preload_worker_modules() -> None:
    """Worker processes are forked from one forkserver; what it imports they all inherit. Has no
    effect once this process's forkserver runs (a second run in the same process keeps the first's)."""
    import multiprocess

    multiprocess.get_context("forkserver").set_forkserver_preload(["datapipe.warm"])


def _without_bad_input_traceback(record) -> None:
    # datatrove logs every task exception with its traceback before re-raising it; bad input is the
    # user's file, and its one-line message (file:line) is the whole story.
    exception = record["exception"]
    if exception is not None and isinstance(exception.value, BadInputError):
        record["exception"] = None


def run_local(stages: list[Stage], layout: Layout, workers: int) -> None:
    preload_worker_modules()
    logger.configure(patcher=_without_bad_input_traceback)
    for stage in stages:
        executor = LocalPipelineExecutor(
            pipeline=stage.pipeline, tasks=stage.tasks, workers=min(workers, stage.tasks),
            logging_dir=str(layout.logs / stage.name), skip_completed=True,
        )
        executor.run()
        missing = incomplete_ranks(stage, layout)
        if missing:
            raise RunError(f"stage {stage.name}: tasks {missing} did not complete; "
                           f"see {layout.logs / stage.name / 'logs'}")


def slurm_env_command(slurm: SlurmConfig) -> str:
    venv = slurm.venv_path or default_venv()
    activate = f"source {venv}/bin/activate && " if venv else ""
    # The package is imported from the checkout, installed or not.
    return f'{activate}export PYTHONPATH="{REPO_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"'


class _SlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor, able to leave out the memory request."""

    def __init__(self, *args, request_memory: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.request_memory = request_memory

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if not self.request_memory:
            args.pop("mem-per-cpu", None)
        return args

    def launch_merge_stats(self):
        # The report merges the per-task stats itself (also those of tasks finished before a resume),
        # so the extra merge job per stage would only add queue time.
        return None


def submit_slurm(stages: list[Stage], layout: Layout, slurm: SlurmConfig) -> list[SlurmPipelineExecutor]:
    executors: list[_SlurmExecutor] = []
    for stage in stages:
        executors.append(_SlurmExecutor(
            pipeline=stage.pipeline, tasks=stage.tasks, time=slurm.time, partition=slurm.partition,
            cpus_per_task=slurm.cpus_per_task, mem_per_cpu_gb=slurm.mem_per_cpu_gb or 1,
            request_memory=slurm.mem_per_cpu_gb is not None,
            job_name=f"{slurm.job_name}-{stage.name}", qos=slurm.qos, env_command=slurm_env_command(slurm),
            sbatch_args=slurm.sbatch_args, logging_dir=str(layout.logs / stage.name),
            slurm_logs_folder=str(layout.logs / stage.name / "slurm_logs"),
            depends=executors[-1] if executors else None, skip_completed=True,
            tasks_per_job=slurm.tasks_per_job, with_srun=slurm.srun,
        ))
    # Launching the last stage launches its dependency chain first.
    executors[-1].run()
    return executors


def _queued(job_ids: list[str]) -> dict[str, str] | None:
    """job id -> pending reason (or state) for our jobs still in the queue; None when squeue failed."""
    if not job_ids:
        return {}
    proc = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(job_ids)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    jobs = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            jobs[parts[0].split("_")[0]] = parts[2] if parts[1] == "PENDING" and len(parts) > 2 else parts[1]
    return jobs


def wait_slurm(stages: list[Stage], executors: list[SlurmPipelineExecutor], layout: Layout,
               poll_seconds: float, timeout: float | None = None, confirm_polls: int = 3) -> None:
    """Waits until every stage is complete; fails when our jobs are gone (or can never start) first.

    A job that just ended and the next that is about to start can both be missing from one squeue
    answer, so a stall must be seen `confirm_polls` times in a row.
    """
    job_ids = [str(e.job_id) for e in executors if e.job_id not in (None, -1)]
    start = time.monotonic()
    stalled = 0
    while True:
        pending = [s for s in stages if incomplete_ranks(s, layout)]
        if not pending:
            return
        queued = _queued(job_ids)
        if queued is not None and (not queued or all(r == "DependencyNeverSatisfied" for r in queued.values())):
            stalled += 1
        else:
            stalled = 0
        if stalled >= confirm_polls:
            if queued:
                subprocess.run(["scancel", *queued], check=False)
            stage = pending[0]
            raise RunError(f"stage {stage.name}: tasks {incomplete_ranks(stage, layout)} did not complete; "
                           f"see {layout.logs / stage.name / 'slurm_logs'}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise RunError(f"timed out after {timeout:.0f} s waiting for stage {pending[0].name}")
        time.sleep(poll_seconds)
