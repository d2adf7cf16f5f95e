"""Dedup across several named sources: planted cross-source duplicates, the overlap matrices, the
priority rule for the kept copy, worker/task-count independence, and the schema check."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from datapipe import run_pipeline, validate_config
from datapipe.readers import BadInputError
from datapipe.synthetic import english_doc

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def near(text: str, tag: str) -> str:
    """A near copy: two words replaced (word 5-gram Jaccard ~0.93, caught with p ~1 by 14x8 bands)."""
    words = text.split(" ")
    for i in (len(words) // 3, 2 * len(words) // 3):
        words[i] = f"zebra{tag}"
    return " ".join(words)


def plant(root: Path) -> dict:
    """web (JSONL, 2 files) > books (Parquet, text in `content`) > wiki (HF dataset, 2 shards, `body`)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    u = [english_doc(rng) for _ in range(8)]
    b = [english_doc(rng) for _ in range(4)]
    k = [english_doc(rng) for _ in range(2)]
    web0 = [{"url": f"w{i}", "text": t} for i, t in enumerate(u[:6])]
    # a copy of u1 first in the second file: earlier in its task than the original is in its own
    web1 = [{"url": "w-copy", "text": u[1]}, {"url": "w6", "text": u[6]}, {"url": "w7", "text": u[7]},
            {"url": "w-near-b0", "text": near(b[0], "w")}]
    write_jsonl(root / "web" / "part0.jsonl", web0)
    write_jsonl(root / "web" / "part1.jsonl", web1)
    books = [{"content": t, "url": f"b{i}"} for i, t in enumerate(b)]
    books += [{"content": u[2], "url": "b-copy-u2"}, {"content": u[3], "url": "b-copy-u3"},
              {"content": near(u[4], "b"), "url": "b-near-u4"}, {"content": near(u[5], "b"), "url": "b-near-u5"}]
    # a five-document cluster whose first member is in web: datatrove's union by size could keep another
    books += [{"content": near(u[6], f"b{i}"), "url": f"b-near-u6-{i}"} for i in range(2)]
    (root / "books").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(books), root / "books" / "books.parquet")
    wiki = [{"body": k[0], "url": "k0"}, {"body": k[1], "url": "k1"}, {"body": near(k[0], "k"), "url": "k-near-k0"},
            {"body": b[1], "url": "k-copy-b1"}, {"body": near(b[2], "k"), "url": "k-near-b2"},
            {"body": near(u[5], "k"), "url": "k-near-u5"}]
    wiki += [{"body": near(u[6], f"k{i}"), "url": f"k-near-u6-{i}"} for i in range(2)]
    datasets.Dataset.from_list(wiki).save_to_disk(str(root / "wiki"), num_shards=2)
    kept = {("web", t) for t in u} | {("web", near(b[0], "w"))} | {("books", t) for t in b[1:]} \
        | {("wiki", t) for t in k}
    return {"kept": kept, "web_u1_url": "w1"}


EXACT = {"web": {"web": 1, "books": 0, "wiki": 0}, "books": {"web": 2, "books": 0, "wiki": 0},
         "wiki": {"web": 0, "books": 1, "wiki": 0}}
NEAR = {"web": {"web": 0, "books": 0, "wiki": 0}, "books": {"web": 5, "books": 0, "wiki": 0},
        "wiki": {"web": 3, "books": 1, "wiki": 1}}


def config(root: Path, out: str, **executor) -> dict:
    return {"recipe": "custom",
            "sources": {"web": {"path": str(root / "web")},
                        "books": {"path": str(root / "books"), "format": "parquet", "text_field": "content"},
                        "wiki": {"path": str(root / "wiki"), "format": "hf_dataset", "text_field": "body"}},
            "output": {"path": str(root / out)},
            "executor": {"kind": "local", **executor},
            "steps": ["exact_dedup", "minhash_dedup"]}


def kept_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for f in sorted((out / "data").glob("*.jsonl")) for line in f.read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["source"], r["url"]))


def without_timing(report: dict) -> dict:
    return {**report, "steps": [{k: v for k, v in s.items() if k != "seconds"} for s in report["steps"]],
            "input": {k: v for k, v in report["input"].items() if k != "read_seconds"},
            "output": {k: v for k, v in report["output"].items() if k != "path"}, "removed_path": None}


@pytest.mark.slow
def test_cross_source_dedup_priority_overlap_and_workers(tmp_path):
    planted = plant(tmp_path)
    one = run_pipeline(validate_config(config(tmp_path, "w1", workers=1)))
    rows = kept_rows(tmp_path / "w1")

    # every planted duplicate is caught, and each kept copy is the one from the first-listed source
    assert {(r["source"], r["text"]) for r in rows} == planted["kept"]
    assert len(rows) == len(planted["kept"])
    assert set(rows[0]) == {"url", "text", "source"}
    # within a source the first position wins, not the first position of some task
    assert [r["url"] for r in rows if r["source"] == "web" and r["url"].startswith("w1")] == ["w1"]

    section = one["sources"]
    assert section["order"] == ["web", "books", "wiki"]
    assert section["overlap"] == {"exact_dedup": EXACT, "minhash_dedup": NEAR}
    assert section["table"] == {
        "web": {"docs_in": 10, "removed": {"exact_dedup": 1, "minhash_dedup": 0}, "docs_kept": 9},
        "books": {"docs_in": 10, "removed": {"exact_dedup": 2, "minhash_dedup": 5}, "docs_kept": 3},
        "wiki": {"docs_in": 8, "removed": {"exact_dedup": 1, "minhash_dedup": 5}, "docs_kept": 2},
    }
    # the matrices' rows add up to what each step removed from that source
    for label, matrix in section["overlap"].items():
        for name, row in matrix.items():
            assert sum(row.values()) == section["table"][name]["removed"][label]

    two = run_pipeline(validate_config(config(tmp_path, "w2", workers=2)))
    assert kept_rows(tmp_path / "w2") == rows
    assert without_timing(two) == without_timing(one)
    # one task reading everything: same decisions, same kept copies
    single = run_pipeline(validate_config(config(tmp_path, "t1", workers=1, tasks=1)))
    assert kept_rows(tmp_path / "t1") == rows
    assert single["sources"] == section


def test_schema_mismatch_fails_before_anything_runs(tmp_path):
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": "one", "url": "u"}])
    write_jsonl(tmp_path / "books" / "a.jsonl", [{"text": "two", "url": "u"}])
    write_jsonl(tmp_path / "books" / "b.jsonl", [{"text": "three", "author": "x"}])
    write_jsonl(tmp_path / "notes" / "a.jsonl", [{"body": "four", "url": "u"}])
    write_jsonl(tmp_path / "typed" / "a.jsonl", [{"text": "five", "url": 3}])
    base = {"recipe": "custom", "steps": ["exact_dedup"], "output": {"path": str(tmp_path / "out")}}

    def error(**sources) -> str:
        cfg = validate_config({**base, "sources": {name: {"path": str(tmp_path / name), **extra}
                                                   for name, extra in sources.items()}})
        with pytest.raises(BadInputError) as err:
            run_pipeline(cfg)
        assert not (tmp_path / "out").exists()
        return str(err.value)

    msg = error(web={}, books={})
    assert msg.startswith("sources.books: ") and "b.jsonl:1" in msg and "missing ['url'], extra ['author']" in msg
    msg = error(web={}, notes={})
    assert msg.startswith("sources.notes: ") and "missing text field 'text'" in msg
    msg = error(web={}, typed={})
    assert msg.startswith("sources.typed: ") and "field 'url' is number" in msg and "sources.web" in msg
    # the right text key makes `notes` fit: its `body` becomes the merged `text`
    run_pipeline(validate_config({**base, "sources": {"web": {"path": str(tmp_path / "web")},
                                                      "notes": {"path": str(tmp_path / "notes"), "text_field": "body"}}}))
    assert sorted(r["source"] for r in kept_rows(tmp_path / "out")) == ["notes", "web"]


def test_schema_error_is_one_line_from_the_cli(tmp_path):
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": "one", "url": "u"}])
    write_jsonl(tmp_path / "books" / "a.jsonl", [{"text": "two", "source": "b"}])
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(f"recipe: custom\nsteps: [exact_dedup]\noutput: {{path: {tmp_path / 'out'}}}\n"
                   f"sources:\n  web: {{path: {tmp_path / 'web'}}}\n  books: {{path: {tmp_path / 'books'}}}\n")
    proc = subprocess.run([sys.executable, "launch/clean_data.py", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "sources.books" in lines[0] and "'source'" in lines[0] and "source_field" in lines[0]
    assert not (tmp_path / "out").exists()


def test_sources_config_errors(tmp_path):
    from datapipe.config import ConfigError

    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match="give exactly one"):
        validate_config({"input": {"path": str(tmp_path / "a")}, "sources": {"a": {"path": str(tmp_path / "a")}},
                         "output": {"path": str(tmp_path / "o")}})
    with pytest.raises(ConfigError) as err:
        validate_config({"sources": {"a b": {"path": str(tmp_path / "a")}, "c": {"path": str(tmp_path / "nope")}},
                         "output": {"path": str(tmp_path / "o")}})
    assert "sources.a b: source names use" in str(err.value) and "sources.c.path:" in str(err.value)


def test_skipped_first_row_is_not_the_schema(tmp_path):
    write_jsonl(tmp_path / "web" / "a.jsonl", [{"text": "one", "url": "u"}])
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.jsonl").write_text('{"broken\n' + json.dumps({"text": "two", "url": "v"}) + "\n"
                                               + json.dumps({"text": "three"}) + "\n")
    cfg = {"recipe": "custom", "steps": ["exact_dedup"], "output": {"path": str(tmp_path / "out")},
           "sources": {"web": {"path": str(tmp_path / "web")},
                       "books": {"path": str(tmp_path / "books"), "on_bad_input": "skip"}}}
    report = run_pipeline(validate_config(cfg))
    assert [r["url"] for r in kept_rows(tmp_path / "out")] == ["v", "u"]
    # the unparsable row and the row without `url` are skipped and counted, not merged
    assert report["input"]["counts"]["bad_input"] == 2
    assert report["input"]["counts"]["bad_input_schema_mismatch"] == 1
