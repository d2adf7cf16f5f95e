"""The pretraining CLI on bad input, and the export of its checkpoints to transformers."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.pretrain_run import REPO_ROOT, env, launch_command, make_tiny_corpus, metrics, run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), docs=300, vocab_size=320)


def pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "pretrain.py"), *args],
                          cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=300)


def test_config_problems_all_reported_before_anything_runs(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("train:\n  max_step: 10\n  output_dir: %s\noptim:\n  lr: -1\n" % (tmp_path / "run"))
    proc = pretrain("--config", str(recipe), "model.n_layer=2")
    assert proc.returncode == 2
    assert f"{recipe}: train: unknown key 'max_step' (did you mean 'max_steps'?)" in proc.stderr
    assert f"{recipe}: optim.lr:" in proc.stderr
    assert "command line: model: unknown key 'n_layer' (did you mean 'n_layers'?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_tokenizer_mismatch_caught_before_training(corpus, tmp_path):
    tokenizer, shards = corpus
    other = make_tiny_corpus(tmp_path / "other", docs=200, vocab_size=300)[0]
    out = tmp_path / "run"
    proc = pretrain(f"data.path={shards}", f"data.tokenizer={other}", f"train.output_dir={out}")
    assert proc.returncode == 2
    assert "were made with tokenizer" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()

    proc = pretrain(f"data.path={shards}", f"data.tokenizer={tokenizer}", "model.vocab_size=64",
                    f"train.output_dir={out}")
    assert proc.returncode == 2 and "model vocab_size 64 is smaller" in proc.stderr
    assert not out.exists()


def test_missing_data_named(tmp_path):
    proc = pretrain(f"data.path={tmp_path / 'nowhere'}", f"train.output_dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and "nowhere/train not found" in proc.stderr


def test_export_loads_in_transformers_with_same_logits(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.export import load_pretrained

    tokenizer, shards = corpus
    out = tmp_path / "run"
    run(launch_command("pretrain.py", [
        f"data.path={shards}", f"data.tokenizer={tokenizer}", "data.seq_len=32", "model.preset=tiny",
        "model.tie_embeddings=true", f"train.output_dir={out}", "train.max_steps=3", "train.micro_batch_size=2",
        "logging.progress=false"]))
    checkpoint = out / "checkpoints" / "step_00000003"
    exported = tmp_path / "hf"
    run([sys.executable, str(REPO_ROOT / "launch" / "export_hf.py"), str(checkpoint), str(exported)])

    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(exported)
    ours = load_pretrained(checkpoint).eval()
    ids = torch.tensor([hf_tokenizer("Ada lives in a city by the sea.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    assert {r["world_size"] for r in metrics(out)} == {1}
    # Training resumes the exported model as a starting point too.
    again = load_pretrained(exported)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))
