"""The `web` recipe as dependent Slurm array jobs on a real local cluster equals the local run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from datapipe import run_pipeline, validate_config
from datapipe.synthetic import eval_set, web_corpus
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (registers the fixture)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def kept(out: Path) -> list[tuple[str, str]]:
    return sorted((r["id"], r["text"]) for f in (out / "data").glob("*.jsonl")
                  for r in map(json.loads, f.read_text().splitlines()))


def without_timing(report: dict) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "seconds"} for s in report["steps"]]


@pytest.mark.slurm
@pytest.mark.slow
def test_web_recipe_on_slurm_equals_local(slurm_cluster, tmp_path):  # noqa: F811
    evals = eval_set()
    write_jsonl(tmp_path / "evals.jsonl", evals)
    rows = web_corpus(n_unique=40, near_per_rate=4, n_foreign=9, eval_rows=evals, n_contaminated=3)
    for i in range(2):
        write_jsonl(tmp_path / "raw" / f"part{i}.jsonl", rows[i::2])

    def cfg(out: str, executor: dict):
        return validate_config({
            "recipe": "web", "input": {"path": str(tmp_path / "raw")}, "output": {"path": str(tmp_path / out)},
            "executor": executor,
            "step_params": {"decontaminate": {"eval_files": [str(tmp_path / "evals.jsonl")]}},
        })

    local = run_pipeline(cfg("local", {"kind": "local", "workers": 1}))
    slurm = run_pipeline(cfg("slurm", {"kind": "slurm", "slurm": {
        "partition": slurm_cluster.partition, "time": "00:20:00", "poll_seconds": 1, "srun": False,
        # the test cluster declares no node memory, so any memory request would be unsatisfiable
        "mem_per_cpu_gb": None}}), slurm_timeout=600)

    assert kept(tmp_path / "slurm") == kept(tmp_path / "local")
    assert without_timing(slurm) == without_timing(local)
    assert slurm["output"]["docs"] > 0
    # the work really ran as array jobs: one Slurm log per task of the first stage
    logs = list((tmp_path / "slurm" / "work" / "logs" / "stage_00" / "slurm_logs").glob("*.out"))
    assert len(logs) == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_multi_source_dedup_on_slurm_equals_local(slurm_cluster, tmp_path):  # noqa: F811
    from tests.test_datapipe_sources import EXACT, NEAR, config, kept_rows, plant

    plant(tmp_path)
    local = run_pipeline(validate_config(config(tmp_path, "local", workers=1)))
    cfg = config(tmp_path, "slurm")
    cfg["executor"] = {"kind": "slurm", "slurm": {
        "partition": slurm_cluster.partition, "time": "00:20:00", "poll_seconds": 1, "srun": False,
        "mem_per_cpu_gb": None}}
    slurm = run_pipeline(validate_config(cfg), slurm_timeout=600)

    assert kept_rows(tmp_path / "slurm") == kept_rows(tmp_path / "local")
    assert slurm["sources"] == local["sources"]
    assert slurm["sources"]["overlap"] == {"exact_dedup": EXACT, "minhash_dedup": NEAR}
    assert without_timing(slurm) == without_timing(local)
