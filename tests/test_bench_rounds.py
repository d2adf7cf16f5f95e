"""The benches' shared machinery: alternating rounds, per-round ratios, load, failure exit; the GPU check's JSON
and its CPU dry run."""
from __future__ import annotations

import json

import pytest

from bench import gpu_check
from bench.common import (
    contender_spreads,
    finish,
    load_summary,
    round_ratio,
    run_rounds,
)
from tests.pretrain_run import REPO_ROOT, run


def test_rounds_alternate_the_order_and_record_load():
    order = []

    def spawn(name):
        order.append(name)
        return {"x": {"a": 2.0, "b": 1.0}[name] * (1 + len(order))}

    per_round, failed = run_rounds(["a", "b"], spawn, rounds=3)
    assert order == ["a", "b", "b", "a", "a", "b"] and not failed
    assert all("load1_median" in r["a"]["load"] for r in per_round)
    # Ratios are taken within a round: a ran at positions 1, 4, 5 and b at 2, 3, 6 (x grows with position).
    ratio = round_ratio(per_round, "a", "b", lambda r: r["x"])
    assert ratio["n"] == 3 and ratio["min"] == pytest.approx(2 * 2 / 3) and ratio["max"] == pytest.approx(2 * 5 / 4)
    spreads = contender_spreads(per_round, {"x": lambda r: r["x"]})
    assert spreads["a"]["x"]["median"] == pytest.approx(2.0 * 5) and "load1" in spreads["b"]
    assert load_summary(per_round)["load1"]["n"] == 6


def test_a_failed_contender_is_not_rerun_and_fails_the_bench():
    calls = []

    def spawn(name):
        calls.append(name)
        if name == "bad":
            raise RuntimeError("run 'bad' failed (exit 1)")
        return {"x": 1.0}

    per_round, failed = run_rounds(["good", "bad"], spawn, rounds=3)
    assert calls.count("bad") == 1 and calls.count("good") == 3 and list(failed) == ["bad"]
    assert round_ratio(per_round, "good", "bad", lambda r: r["x"]) is None
    with pytest.raises(SystemExit) as exc:
        finish(failed)
    assert "bad" in str(exc.value)
    finish({})  # nothing failed: returns


def test_gpu_check_figures_and_goal_from_bench_json(tmp_path):
    spread = lambda v: {"median": v, "min": v, "max": v, "n": 1}
    pretrain = {"contenders": {"ours": {"tokens_per_s": spread(900.0), "mfu": spread(0.55), "peak_gb": spread(30.0),
                                        "load1": spread(0.1), "load1_max": 0.2},
                               "hf": {"tokens_per_s": spread(600.0), "mfu": spread(0.37), "peak_gb": spread(35.0),
                                      "load1": spread(0.1), "load1_max": 0.2}},
                "ratios_over_hf": {"ours": {"throughput": spread(1.5)}}, "load": {"cpus": 16}}
    figures = {"pretrain": gpu_check.figures_of("pretrain", pretrain)}
    assert figures["pretrain"]["contenders"]["ours"] == {"tokens_per_s": 900.0, "mfu": 0.55, "peak_gb": 30.0,
                                                         "load1": 0.1}
    goal = gpu_check.goals(figures)["pretrain_mfu"]
    assert goal["met"] is True and goal["ours"] == 0.55 and goal["published"]
    assert gpu_check.goals({})["pretrain_mfu"]["met"] is None


def test_gpu_check_refuses_an_occupied_folder_and_a_missing_gpu(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty folder"):
        gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "mine"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            gpu_check.main(["--out", str(tmp_path / "new")])
        assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "check"
    run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out), "--budget-s", "1200"],
        timeout=1300)
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run" and report["environment"]["versions"]["torch"]
    assert {name: s["status"] for name, s in report["stages"].items()} == dict.fromkeys(gpu_check.STAGES, "ok")
    assert report["figures"]["tests"]["tests"] >= 1
    model = report["figures"]["model"]["bf16"]
    assert set(model["contenders"]) == {"ours", "hf"} and model["contenders"]["ours"]["mfu"] > 0
    pretrain = report["figures"]["pretrain"]["contenders"]
    assert set(pretrain) == {"ours", "hf"} and all(pretrain[s]["tokens_per_s"] > 0 and pretrain[s]["peak_gb"] > 0
                                                   for s in pretrain)
    assert set(report["figures"]["sft"]["contenders"]) == {"ours_packed", "trl_packed"}
    assert set(report["figures"]["dpo"]["contenders"]) == {"adapter", "trl"}
    assert report["goals"]["pretrain_mfu"]["ours"] == pretrain["ours"]["mfu"]


def _has_commit(rev: str) -> bool:
    import subprocess

    return subprocess.run(["git", "-C", str(REPO_ROOT), "cat-file", "-e", f"{rev}^{{commit}}"],
                          capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _has_commit("887f7a7"), reason="needs the repository's history (commit 887f7a7)")
def test_clean_bench_takes_the_older_pipeline_from_git(tmp_path):
    from bench.bench_clean_data import extract_tree

    tree = extract_tree("887f7a7", tmp_path / "before")
    assert (tree / "datapipe" / "run.py").is_file()
    assert not (tree / "datapipe" / "tokens.py").exists()  # shared tokenization came after it
    with pytest.raises(SystemExit, match="--before no-such-rev"):
        extract_tree("no-such-rev", tmp_path / "bad")


def test_clean_bench_counts_decision_differences():
    from bench.bench_clean_data import compare_decisions

    a = {"kept": {"1": "x", "2": "y"}, "removed": {"language": ["3:other_language"]}}
    b = {"kept": {"1": "x"}, "removed": {"language": ["3:other_language"], "minhash_dedup": ["2:near_duplicate"]}}
    assert compare_decisions(a, a, ("shared", "before")) == []
    assert compare_decisions(a, b, ("shared", "before")) == [
        "kept documents differ (1 id/text pairs)", "minhash_dedup: removed differ (only shared 0, only before 1)"]
