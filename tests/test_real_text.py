"""Real text, real learning: a tokenizer and a tiny model trained on tinyshakespeare."""
from __future__ import annotations

import pytest

from tests.pretrain_run import launch_command, metrics, run

STEPS = 150


@pytest.mark.slow
def test_validation_loss_falls_on_tinyshakespeare(shared_data, tmp_path):
    from trainer.data.prepare import prepare_data
    from trainer.data.tokenizer import train_tokenizer

    text = shared_data / "tinyshakespeare.txt"
    tokenizer, shards, out = tmp_path / "tokenizer", tmp_path / "tokens", tmp_path / "run"
    train_tokenizer([text], tokenizer, kind="bpe", vocab_size=512)
    report = prepare_data([text], tokenizer, shards, val_fraction=0.1, num_proc=1, show_progress=False)
    assert report["splits"]["val"]["tokens"] > 20_000

    run(launch_command("pretrain.py", [
        f"data.path={shards}", f"data.tokenizer={tokenizer}", "data.seq_len=128",
        "model.preset=tiny", "model.dim=96", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
        f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=16",
        "train.eval_at_start=true", "train.eval_every=50", "train.eval_batches=8",
        "optim.lr=3e-3", "optim.warmup_steps=15", "logging.progress=false", "logging.tensorboard=false"]))

    val = metrics(out, "val")
    assert [r["step"] for r in val] == [0, 50, 100, 150]
    start, end = val[0]["loss"], val[-1]["loss"]
    # An untrained model sits near ln(vocab) ~ 6.2 nats; a few hundred thousand tokens of
    # Shakespeare bring a tiny model well below that.
    assert start > 5.5
    assert end < 0.7 * start, f"validation loss only went {start:.3f} -> {end:.3f}"
    assert all(a["loss"] > b["loss"] for a, b in zip(val, val[1:])), "validation loss must fall at every eval"
