"""The `instructions` and custom recipes, PII through the pipeline, crash + resume, and real text."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from datapipe import run_pipeline, validate_config
from datapipe.readers import BadInputError
from datapipe.synthetic import LOOKALIKES, PII_CASES, PII_PLACEHOLDERS, english_doc, instruction_corpus, pii_doc


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl_folder(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.rglob("*.jsonl")) for line in f.read_text().splitlines()]


def config(root: Path, **extra) -> dict:
    return {"input": {"path": str(root / "raw")}, "output": {"path": str(root / "out")},
            "executor": {"kind": "local", "workers": 1}, **extra}


def test_instructions_recipe(tmp_path):
    rows = instruction_corpus()
    for i, r in enumerate(rows):
        r["id"] = f"row{i}"
    write_jsonl(tmp_path / "raw" / "sft.jsonl", rows)
    cfg = validate_config(config(tmp_path, recipe="instructions", input={"path": str(tmp_path / "raw"),
                                                                          "text_field": "response"}))
    report = run_pipeline(cfg)
    kept = read_jsonl_folder(tmp_path / "out" / "data")
    kinds = {r["id"]: r["kind"] for r in rows}
    kept_kinds = [kinds[r["id"]] for r in kept]
    # every rule removes all of its planted rows and nothing good
    for bad in ("short", "long", "stutter", "refusal", "non_english"):
        assert bad not in kept_kinds, bad
    # Jaccard diversity: near-copies of an instruction (word-bigram Jaccard ~0.83) collapse into one
    similar = [r for r in rows if r["kind"] == "similar"]
    kept_instr = {r["instruction"] for r in kept}
    # good rows go only when a near-copy of their instruction stays instead
    similar_kept = {r["source"] for r in similar if r["instruction"] in kept_instr}
    lost_good = {r["instruction"] for r in rows if r["kind"] == "good"} - kept_instr
    assert lost_good <= similar_kept
    collapsed = sum(1 for r in similar if not (r["instruction"] in kept_instr and r["source"] in kept_instr))
    assert collapsed / len(similar) >= 0.85
    # SFT rows keep their own fields and nothing else
    by_id = {r["id"]: r for r in rows}
    assert all(r == by_id[r["id"]] for r in kept)
    by_step = {s["step"]: s for s in report["steps"]}
    assert by_step["instruction_rules"]["removed"]["refusal"]["docs"] == 8
    assert by_step["instruction_rules"]["removed"]["repeated_token"]["docs"] == 8


def test_pii_through_the_pipeline(tmp_path):
    rng = random.Random(5)
    rows, planted = [], {}
    for kind, values in PII_CASES.items():
        for value in values:
            for j in range(4):
                lookalike = LOOKALIKES[(len(rows) + j) % len(LOOKALIKES)]
                rows.append({"id": f"p{len(rows)}", "text": pii_doc(rng, kind, value, lookalike),
                             "value": value, "kind": kind, "lookalike": lookalike})
                planted[kind] = planted.get(kind, 0) + 1
    rows += [{"id": f"plain{i}", "text": english_doc(rng, 2, 3), "kind": "none"} for i in range(20)]
    write_jsonl(tmp_path / "raw" / "a.jsonl", rows)
    report = run_pipeline(validate_config(config(tmp_path, recipe="custom", steps=["pii"])))
    kept = {r["id"]: r for r in read_jsonl_folder(tmp_path / "out" / "data")}
    assert len(kept) == len(rows)
    for kind in PII_CASES:
        mine = [r for r in rows if r["kind"] == kind]
        scrubbed = sum(1 for r in mine if r["value"] not in kept[r["id"]]["text"]
                       and PII_PLACEHOLDERS[kind] in kept[r["id"]]["text"])
        assert scrubbed / len(mine) >= 0.95, kind
        assert all(r["lookalike"] in kept[r["id"]]["text"] for r in mine), kind
    for r in rows:
        if r["kind"] == "none":
            assert kept[r["id"]]["text"] == r["text"]
    counts = report["steps"][0]["counts"]
    n_keys = sum(1 for r in rows if r["kind"] == "secret" and "PRIVATE KEY" in r["value"])
    assert counts["pii_private_key"] == n_keys
    for kind in PII_CASES:
        assert counts[f"pii_{kind}"] == planted[kind] - (n_keys if kind == "secret" else 0)
    assert report["steps"][0]["bytes_out"] < report["steps"][0]["bytes_in"]


def _resume_corpus(root: Path, broken: bool) -> None:
    rng = random.Random(7)
    docs = [{"id": f"d{i}", "text": english_doc(rng, 2, 3)} for i in range(30)]
    docs += [dict(docs[i], id=f"copy{i}") for i in range(0, 30, 5)]
    write_jsonl(root / "raw" / "a.jsonl", docs[::2])
    b = root / "raw" / "b.jsonl"
    write_jsonl(b, docs[1::2])
    if broken:
        lines = b.read_text().splitlines()
        lines.insert(3, '{"text": "truncated')
        b.write_text("\n".join(lines) + "\n")


def test_crash_then_resume_redoes_only_unfinished_tasks(tmp_path):
    steps = ["language", "exact_dedup", {"pii": {"types": ["email"]}}]
    _resume_corpus(tmp_path, broken=True)
    cfg = validate_config(config(tmp_path, recipe="custom", steps=steps))
    with pytest.raises(BadInputError, match=r"b\.jsonl:4: invalid JSON"):
        run_pipeline(cfg)
    logs = tmp_path / "out" / "work" / "logs" / "stage_00"
    assert (logs / "completions" / "00000").is_file() and not (logs / "completions" / "00001").exists()
    done_before = (logs / "stats" / "00000.json").stat().st_mtime_ns
    assert not (tmp_path / "out" / "report.json").exists()

    _resume_corpus(tmp_path, broken=False)
    report = run_pipeline(cfg)
    assert (logs / "stats" / "00000.json").stat().st_mtime_ns == done_before  # task 0 was not redone
    resumed = sorted((r["id"], r["text"]) for r in read_jsonl_folder(tmp_path / "out" / "data"))

    straight_root = tmp_path / "straight"
    _resume_corpus(straight_root, broken=False)
    straight = run_pipeline(validate_config(config(straight_root, recipe="custom", steps=steps)))
    assert resumed == sorted((r["id"], r["text"]) for r in read_jsonl_folder(straight_root / "out" / "data"))
    def counts(rep: dict) -> list[dict]:
        return [{k: v for k, v in s.items() if k != "seconds"} for s in rep["steps"]]

    assert counts(report) == counts(straight)
    assert next(s for s in report["steps"] if s["step"] == "exact_dedup")["removed"]["exact_duplicate"]["docs"] == 6


def test_changed_config_refuses_to_resume(tmp_path):
    from datapipe.execute import RunError

    _resume_corpus(tmp_path, broken=False)
    run_pipeline(validate_config(config(tmp_path, recipe="custom", steps=["pii"])))
    with pytest.raises(RunError, match=r"different config \(changed: \['steps'\]\)"):
        run_pipeline(validate_config(config(tmp_path, recipe="custom", steps=["exact_dedup"])))


def test_tinyshakespeare_with_planted_copies_and_pii(shared_data, tmp_path):
    text = (shared_data / "tinyshakespeare.txt").read_text()
    # speeches (blank-line blocks) grouped into ~1.5 KB documents
    blocks = [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]
    docs, cur = [], []
    for b in blocks:
        cur.append(b)
        if sum(len(x) for x in cur) > 1500:
            docs.append("\n\n".join(cur))
            cur = []
    docs = docs[:200]
    rng = random.Random(11)
    rows = [{"id": f"s{i}", "text": d} for i, d in enumerate(docs)]
    copies = rng.sample(range(len(docs)), 20)
    rows += [{"id": f"copy{i}", "text": docs[i]} for i in copies]
    near = rng.sample([i for i in range(len(docs)) if i not in copies], 20)
    for i in near:
        words = docs[i].split(" ")
        j = rng.randrange(len(words))
        words[j] = words[j] + "!"  # one changed word: Jaccard ~0.97
        rows.append({"id": f"near{i}", "text": " ".join(words)})
    pii_ids = rng.sample(range(len(docs)), 20)
    pii_values = ["j.kowalski@example.org", "+44 20 7946 0958", "4111 1111 1111 1111", "8.8.4.4"]
    for n, i in enumerate(pii_ids):
        rows[i]["text"] += f"\nWrite to {pii_values[n % 4]} anon."
    write_jsonl(tmp_path / "raw" / "a.jsonl", rows[::2])
    write_jsonl(tmp_path / "raw" / "b.jsonl", rows[1::2])
    steps = ["exact_dedup", {"minhash_dedup": {"n_grams": 5, "bands": 14, "rows": 8}}, "pii"]
    report = run_pipeline(validate_config(config(tmp_path, recipe="custom", steps=steps)))
    kept = {r["id"]: r["text"] for r in read_jsonl_folder(tmp_path / "out" / "data")}
    by_step = {s["step"]: s for s in report["steps"]}
    exact_removed = by_step["exact_dedup"]["removed"]["exact_duplicate"]["docs"]
    assert exact_removed == 20 - sum(1 for i in copies if i in pii_ids)  # a PII-tagged original differs
    near_pairs = [(f"near{i}", f"s{i}") for i in near if i not in pii_ids]
    assert sum(1 for a, b in near_pairs if not (a in kept and b in kept)) / len(near_pairs) >= 0.9
    assert by_step["minhash_dedup"]["docs_in"] - by_step["minhash_dedup"]["docs_out"] <= len(near) + 2
    all_text = "\n".join(kept.values())
    assert not any(v in all_text for v in pii_values)
    assert by_step["pii"]["counts"]["pii_email"] >= 1


def test_text_blocks_in_parquet_out_with_annotations(tmp_path):
    import pyarrow.parquet as pq

    rng = random.Random(9)
    blocks = [english_doc(rng, 1, 3) for _ in range(6)]
    blocks[2] += " Mail me at ann.lee@example.com please."
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "book.txt").write_text("\n\n".join(blocks + [blocks[0]]) + "\n")
    cfg = validate_config(config(tmp_path, recipe="custom", steps=["exact_dedup", "pii"],
                                 input={"path": str(tmp_path / "raw"), "format": "text",
                                        "text_split": "blank_line"},
                                 output={"path": str(tmp_path / "out"), "format": "parquet", "annotations": True}))
    report = run_pipeline(cfg)
    rows = pq.read_table(next((tmp_path / "out" / "data").glob("*.parquet"))).to_pylist()
    assert report["input"]["docs"] == 7 and len(rows) == 6
    assert sorted(r["text"] for r in rows) == sorted(b.replace("ann.lee@example.com", "<EMAIL>") for b in blocks)
    scrubbed = next(r for r in rows if "<EMAIL>" in r["text"])
    assert json.loads(scrubbed["meta"])["pii"] == {"email": 1}


def test_cli_bad_input_is_one_clear_error(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    write_jsonl(tmp_path / "raw" / "a.jsonl", [{"text": "fine"}, {"body": "no text"}])
    (tmp_path / "c.yaml").write_text(f"recipe: custom\nsteps: [pii]\ninput: {{path: {tmp_path / 'raw'}}}\n"
                                     f"output: {{path: {tmp_path / 'out'}}}\n")
    cli = [sys.executable, str(repo / "launch" / "clean_data.py"), "--config", str(tmp_path / "c.yaml")]
    proc = subprocess.run(cli, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(repo)), timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"error: {tmp_path / 'raw' / 'a.jsonl'}:2: missing text field 'text' (keys: ['body'])"
    # nothing half-written: no kept-document file and no report
    assert not list((tmp_path / "out").glob("data/**/*.jsonl")) and not (tmp_path / "out" / "report.json").exists()


def test_skip_bad_input_is_counted_in_the_report(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.jsonl").write_bytes(b'{"text": "one"}\n{"text": \n{"body": 1}\n{"text": "caf\xe9"}\n'
                                               b'{"text": "two"}\n')
    cfg = validate_config(config(tmp_path, recipe="custom", steps=["pii"],
                                 input={"path": str(tmp_path / "raw"), "on_bad_input": "skip"}))
    report = run_pipeline(cfg)
    assert report["input"]["docs"] == report["output"]["docs"] == 2
    assert report["input"]["counts"] == {"bad_input": 3, "bad_input_invalid_json": 1,
                                         "bad_input_missing_text_field": 1, "bad_input_invalid_utf8": 1}


def test_code_recipe(tmp_path):
    rng = random.Random(13)
    files = []
    for i in range(12):
        body = "\n".join(f"    total += {rng.randrange(100)} * x{j}  # step {j}" for j in range(6))
        files.append(f"def f{i}(x):\n    total = 0\n{body}\n    return total\n")
    rows = [{"content": c, "path": f"src/m{i}.py"} for i, c in enumerate(files)]
    rows.append({"content": files[0], "path": "vendor/m0.py"})  # exact copy
    rows.append({"content": "/* bundle */\n" + "var a=1;" * 300 + "\n//# end\n", "path": "min.js"})  # minified
    rows.append({"content": files[1] + 'AWS_KEY = "AKIAIOSFODNN7EXAMPLE"\n', "path": "cfg.py"})
    write_jsonl(tmp_path / "raw" / "code.jsonl", rows)
    report = run_pipeline(validate_config(config(tmp_path, recipe="code", input={
        "path": str(tmp_path / "raw"), "text_field": "content"})))
    kept = {r["path"]: r["content"] for r in read_jsonl_folder(tmp_path / "out" / "data")}
    assert "min.js" not in kept and not ("src/m0.py" in kept and "vendor/m0.py" in kept)
    by_step = {s["step"]: s for s in report["steps"]}
    assert by_step["code_quality"]["removed"] == {"long_line": {"docs": 1, "bytes": len(rows[-2]["content"])}}
    assert by_step["exact_dedup"]["removed"]["exact_duplicate"]["docs"] == 1
    # cfg.py is m1.py plus a line: a near-duplicate, one of the two goes; a kept cfg.py has no key
    assert not ("src/m1.py" in kept and "cfg.py" in kept)
    assert all("AKIA" not in c for c in kept.values())


def test_hf_dataset_folder_input(tmp_path):
    import datasets

    rng = random.Random(17)
    texts = [english_doc(rng, 1, 2) for _ in range(8)]
    texts[3] += " Call +1 415-555-0132."
    datasets.Dataset.from_dict({"text": texts, "n": list(range(8))}).save_to_disk(tmp_path / "raw")
    report = run_pipeline(validate_config(config(tmp_path, recipe="custom", steps=["pii"],
                                                 input={"path": str(tmp_path / "raw"), "format": "hf_dataset"})))
    kept = sorted(read_jsonl_folder(tmp_path / "out" / "data"), key=lambda r: r["n"])
    assert [r["n"] for r in kept] == list(range(8)) and "<PHONE>" in kept[3]["text"]
    assert report["steps"][0]["counts"]["pii_phone"] == 1
