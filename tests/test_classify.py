"""Text classification through the real CLI: metrics and files in the run folder, an HF folder transformers
loads with the label names, bad input, and real SMS spam."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.sft_fixtures import demo_rows, make_tokenizer, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 400}


def _run(args: list[str], timeout: int = 600, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _val(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "val"}


def topic(question: str) -> str:
    if any(ch.isdigit() for ch in question):
        return "math"
    return "color" if "color" in question else "fact"


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """The demo world's questions labelled by topic: three classes a tiny model learns in a few steps."""
    work = tmp_path_factory.mktemp("classify")
    make_tokenizer(work, vocab_size=400)
    rows = [{"text": r["messages"][0]["content"], "label": topic(r["messages"][0]["content"])}
            for r in demo_rows("sft")]
    write_jsonl(work / "train.jsonl", rows[:300])
    write_jsonl(work / "val.jsonl", rows[300:343])  # 43: not a multiple of the batch, so the last one is padded
    return work


def _config(work: Path, out: Path, **classify) -> Path:
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(dict(
        model=MODEL, data={"tokenizer": str(work / "tokenizer"), "seq_len": 32},
        train={"output_dir": str(out), "max_steps": 30, "micro_batch_size": 8, "eval_batches": 100,
               "eval_at_start": True},
        optim={"lr": 3e-3, "warmup_steps": 3}, logging={"tensorboard": False, "progress": False},
        classify={"train_files": [str(work / "train.jsonl")], "val_files": [str(work / "val.jsonl")],
                  "method": "full", **classify})))
    return path


def test_classifier_learns_topics_and_leaves_report_matrix_and_hf_folder(questions):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = questions / "topics"
    log = _run([sys.executable, "launch/classify.py", "--config", str(_config(questions, out))]).stdout
    assert "labels color, fact, math" in log and "held-out: accuracy" in log
    val = _val(out)
    assert val[30]["macro_f1"] > val[0]["macro_f1"] and val[30]["accuracy"] > 0.8
    assert {"precision/math", "recall/color", "majority_baseline"} <= set(val[30])
    report = json.loads((out / "classification_report.json").read_text())
    assert report["count"] == 43  # every held-out example once, the padded last batch's filler nowhere
    with open(out / "confusion_matrix.csv") as f:
        matrix = list(csv.reader(f))
    assert matrix[0][1:] == ["color", "fact", "math"]
    assert sum(int(x) for row in matrix[1:] for x in row[1:]) == 43
    # model/: transformers classifies with the label names the run saved.
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.id2label == {0: "color", 1: "fact", 2: "math"}
    ids = tok("What is 3 + 4?", return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, torch.tensor([[tok.eos_token_id]])], dim=1)
    with torch.no_grad():
        assert model.config.id2label[int(model(ids).logits.argmax())] == "math"


def test_bad_classification_input_is_one_line(questions, tmp_path):
    one_class = write_jsonl(tmp_path / "one.jsonl", [{"text": "a b c", "label": "x"}] * 4)
    unseen = write_jsonl(tmp_path / "unseen.jsonl", [{"text": "What is 1 + 1?", "label": "sports"}])
    no_label = write_jsonl(tmp_path / "nolabel.jsonl", [{"text": "a"}, {"text": "b"}])
    cases = {f"classify.train_files=[{one_class}]": "two classes at least",
             f"classify.val_files=[{unseen}]": f"{unseen}:1: label 'sports' does not occur",
             f"classify.train_files=[{no_label}]": f"{no_label}:1:",
             "classify.class_weights={nope: 2.0}": "classify.class_weights: label(s) nope"}
    for i, (override, message) in enumerate(cases.items()):
        out = tmp_path / f"bad{i}"
        proc = _run([sys.executable, "launch/classify.py", "--config", str(_config(questions, out)), override],
                    ok=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert message in proc.stderr, (override, proc.stderr[-2000:])
        assert not (out / "checkpoints").exists()


def test_real_sms_spam_classifier_beats_the_majority_class(shared_data, tmp_path):
    """SMS Spam Collection: held-out macro-F1 rises from step 0 and accuracy beats always answering 'ham'."""
    from trainer.data.tokenizer import train_tokenizer

    with open(shared_data / "sms-spam-collection-5000.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    write_jsonl(tmp_path / "text.jsonl", [{"text": msg} for _, msg in rows[:3000]])
    train_tokenizer([tmp_path / "text.jsonl"], tmp_path / "tokenizer", vocab_size=512, overwrite=True)
    header = "label\tmsg\n"
    (tmp_path / "train.tsv").write_text(header + "".join(f"{lab}\t{msg}\n" for lab, msg in rows[:1600]))
    (tmp_path / "held.tsv").write_text(header + "".join(f"{lab}\t{msg}\n" for lab, msg in rows[4500:5000]))
    config = tmp_path / "sms.yaml"
    config.write_text(yaml.safe_dump(dict(
        model={**MODEL, "dim": 64, "vocab_size": 512}, data={"tokenizer": str(tmp_path / "tokenizer"), "seq_len": 64},
        train={"output_dir": str(tmp_path / "out"), "max_steps": 60, "micro_batch_size": 16, "eval_at_start": True,
               "eval_batches": 32},
        optim={"lr": 2e-3, "warmup_steps": 5}, logging={"tensorboard": False, "progress": False, "log_every": 20},
        classify={"train_files": [str(tmp_path / "train.tsv")], "val_files": [str(tmp_path / "held.tsv")],
                  "text_column": "msg", "class_weights": "balanced", "method": "full"})))
    _run([sys.executable, "launch/classify.py", "--config", str(config)], timeout=900)
    val = _val(tmp_path / "out")
    start, end = val[0], val[60]
    assert end["macro_f1"] > start["macro_f1"], (start, end)
    assert end["accuracy"] > end["majority_baseline"], end
