"""Evaluation: perplexity agrees with the training loop's validation loss; BLEU/ROUGE sanity."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.pretrain_run import REPO_ROOT, env, launch_command, make_tiny_corpus, metrics, run


def test_perplexity_matches_training_validation(tmp_path):
    from eval.perplexity import shard_perplexity
    from trainer.export import load_pretrained

    tokenizer, shards = make_tiny_corpus(tmp_path / "corpus", docs=300, vocab_size=320)
    out = tmp_path / "run"
    run(launch_command("pretrain.py", [
        f"data.path={shards}", f"data.tokenizer={tokenizer}", "data.seq_len=32", "model.preset=tiny",
        f"train.output_dir={out}", "train.max_steps=5", "train.micro_batch_size=4", "train.eval_batches=3",
        "logging.progress=false"]))
    final_val = metrics(out, "val")[-1]
    model = load_pretrained(out / "checkpoints" / "step_00000005")
    result = shard_perplexity(model, shards / "val", seq_len=32, batch_size=4, max_batches=3)
    assert result["loss"] == pytest.approx(final_val["loss"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(final_val["perplexity"], rel=1e-5)


def test_bleu_rouge_and_cli(tmp_path):
    from eval.text_metrics import bleu, rouge

    refs = ["the cat sat on the mat", "Ada lives in Lorvan and keeps bees"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert rouge(refs, refs) == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    worse = ["a dog stood on a rug", "Ada lives in Lorvan"]
    assert bleu(worse, refs) < 50 and 0 < rouge(worse, refs)["rouge1"] < 1
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu(refs, refs[:1])

    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"prediction": p, "reference": r}) + "\n" for p, r in zip(worse, refs)))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "evaluate.py"), "--predictions", str(preds)],
                          cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["bleu"] == pytest.approx(bleu(worse, refs))

    preds.write_text('{"prediction": "x"}\n')
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "evaluate.py"), "--predictions", str(preds)],
                          cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{preds}:1: needs string fields" in proc.stderr
