"""The `web` recipe end to end on a generated corpus with planted cases: precision/recall per kind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from datapipe.synthetic import BOILERPLATE, eval_set, jaccard, web_corpus

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl_folder(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.rglob("*.jsonl")) for line in f.read_text().splitlines()]


def run_cli(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "launch" / "clean_data.py"), "--config", str(config),
                           *overrides], capture_output=True, text=True, env=env, timeout=300)


def removed_ids(out: Path, step: str) -> set[str]:
    return {r["id"] for r in read_jsonl_folder(out / "removed" / step)}


@pytest.fixture(scope="module")
def web_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    evals = eval_set()
    write_jsonl(root / "evals" / "qa.jsonl", evals)
    rows = web_corpus(eval_rows=evals)
    for i in range(3):
        write_jsonl(root / "raw" / f"part{i}.jsonl", rows[i::3])
    config = root / "web.yaml"
    config.write_text(yaml.safe_dump({
        "recipe": "web",
        "input": {"path": str(root / "raw")},
        "output": {"path": str(root / "out")},
        "executor": {"kind": "local", "workers": 1},
        "step_params": {"decontaminate": {"eval_files": [str(root / "evals" / "qa.jsonl")]}},
    }))
    proc = run_cli(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, rows, proc


def test_outputs_and_report(web_run):
    root, rows, proc = web_run
    out = root / "out"
    report = json.loads((out / "report.json").read_text())
    kept = read_jsonl_folder(out / "data")
    assert report["input"]["docs"] == len(rows)
    assert report["output"]["docs"] == len(kept) > 0
    assert report["input"]["bytes"] == sum(len(r["text"].encode()) for r in rows)
    assert report["output"]["bytes"] == sum(len(r["text"].encode()) for r in kept)
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality",
                           "decontaminate", "exact_dedup", "minhash_dedup", "sentence_dedup", "pii"]
    previous = report["input"]["docs"]
    for s in report["steps"]:
        assert s["docs_in"] == previous
        previous = s["docs_out"]
        dropped = s["docs_in"] - s["docs_out"]
        if s["step"] != "sentence_dedup":  # its folder also holds trimmed, kept documents
            assert sum(c["docs"] for c in s["removed"].values()) == dropped, s
            for reason, c in s["removed"].items():
                on_disk = read_jsonl_folder(out / "removed" / s["step"] / reason)
                assert len(on_disk) == c["docs"]
                assert sum(len(r["text"].encode()) for r in on_disk) == c["bytes"]
    # the kept rows are the input rows (all fields) with the cleaned text
    assert set(kept[0]) >= {"id", "text", "kind"}
    assert "Data cleaning report" in proc.stdout and "near_duplicate" in proc.stdout


def _survivors_before(out: Path, rows: list[dict], step: str, order: list[str]) -> list[dict]:
    gone = set()
    for earlier in order[: order.index(step)]:
        gone |= removed_ids(out, earlier)
    return [r for r in rows if r["id"] not in gone]


ORDER = ["language", "gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality", "decontaminate",
         "exact_dedup", "minhash_dedup"]


def test_exact_duplicates_all_removed_and_only_them(web_run):
    root, rows, _ = web_run
    out = root / "out"
    entering = _survivors_before(out, rows, "exact_dedup", ORDER)
    removed = removed_ids(out, "exact_dedup")
    texts = {}
    for r in entering:
        texts.setdefault(r["text"], []).append(r["id"])
    expected_removed = sum(len(ids) - 1 for ids in texts.values())
    assert expected_removed >= 15
    assert len(removed) == expected_removed  # recall 100%: every copy beyond the first
    for ids in texts.values():  # precision 100%: exactly one survivor per identical text
        assert len(set(ids) - removed) == 1


def test_near_duplicates_recall_and_precision(web_run):
    root, rows, _ = web_run
    out = root / "out"
    by_id = {r["id"]: r for r in rows}
    entering = _survivors_before(out, rows, "minhash_dedup", ORDER)
    entering_ids = {r["id"] for r in entering}
    removed = removed_ids(out, "minhash_dedup")
    assert removed <= entering_ids
    # recall: near-dup pairs (Jaccard >= 0.8, not exact copies) that reached MinHash collapse to one doc
    pairs = [(r["id"], r["source"]) for r in entering if r["kind"] == "near_dup" and r["source"] in entering_ids
             and 0.8 <= r["jaccard"] < 1.0]
    assert len(pairs) >= 20, "corpus lost its near-dup pairs before the MinHash step"
    caught = sum(1 for a, b in pairs if a in removed or b in removed)
    assert caught / len(pairs) >= 0.9, (caught, len(pairs))
    # precision: a removed document must be a real near-duplicate (Jaccard >= 0.6) of a document kept by the step
    kept_here = [by_id[i] for i in entering_ids - removed]
    true_pos = sum(1 for i in removed if max(jaccard(by_id[i]["text"], k["text"]) for k in kept_here) >= 0.6)
    assert removed and true_pos / len(removed) >= 0.95, (true_pos, len(removed))
    # the low-similarity planted copies (Jaccard < 0.5) are not near-duplicates and must stay
    far = [r["id"] for r in entering if r["kind"] == "near_dup" and r["jaccard"] < 0.5]
    assert far and not set(far) & removed


def test_non_english_repetitive_contaminated(web_run):
    root, rows, _ = web_run
    out = root / "out"
    foreign = {r["id"] for r in rows if r["kind"] == "non_english"}
    lang_removed = removed_ids(out, "language")
    assert len(foreign & lang_removed) / len(foreign) >= 0.9
    english = {r["id"] for r in rows if r["kind"] != "non_english"}
    assert len(english & lang_removed) <= 0.02 * len(english)
    repetitive = {r["id"] for r in rows if r["kind"] == "repetitive"}
    assert repetitive <= removed_ids(out, "gopher_repetition")
    contaminated = {r["id"] for r in rows if r["kind"] == "contaminated"}
    assert removed_ids(out, "decontaminate") == contaminated
    report = json.loads((out / "report.json").read_text())
    decont = next(s for s in report["steps"] if s["step"] == "decontaminate")
    assert decont["counts"]["contaminated_qa"] == len(contaminated)
    assert decont["counts"]["overlap_ngrams_qa"] >= len(contaminated)


def test_sentence_dedup_strips_shared_boilerplate(web_run):
    root, rows, _ = web_run
    kept = read_jsonl_folder(root / "out" / "data")
    first_sentence = BOILERPLATE.split(". ")[0]
    with_boilerplate = [r for r in kept if first_sentence in r["text"]]
    assert len(with_boilerplate) <= 1
    boiler_ids = {r["id"] for r in rows if r["kind"] == "boilerplate"}
    # the documents themselves survive, trimmed
    assert len(boiler_ids & {r["id"] for r in kept}) >= len(boiler_ids) - 1


def test_unique_documents_survive(web_run):
    root, rows, _ = web_run
    kept_ids = {r["id"] for r in read_jsonl_folder(root / "out" / "data")}
    groups: dict[str, set[str]] = {}
    for r in rows:
        if r["kind"] == "unique":
            groups.setdefault(r["id"], set()).add(r["id"])
        elif r["kind"] in ("exact_dup", "near_dup"):
            groups.setdefault(r["source"], set()).add(r["id"])
    surviving = sum(1 for members in groups.values() if members & kept_ids)
    assert surviving / len(groups) >= 0.95


def test_rerun_is_a_no_op(web_run):
    root, _, _ = web_run
    out = root / "out"
    before = sorted((p, p.stat().st_mtime_ns) for p in (out / "data").glob("*.jsonl"))
    proc = run_cli(root / "web.yaml")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already been completed" in proc.stderr
    assert sorted((p, p.stat().st_mtime_ns) for p in (out / "data").glob("*.jsonl")) == before
