"""The loop in-process: learning, non-finite handling, checkpoint commit protocol."""
from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from model_defs import ModelConfig, Transformer
from trainer.checkpoint import COMPLETE_MARKER, complete_checkpoints, resolve_resume
from trainer.config import load_config
from trainer.config import ConfigError
from trainer.engine import build_accelerator, resolve_precision
from trainer.loop import NonFiniteLossError, train
from trainer.objectives import causal_lm_objective

VOCAB = 64


class CountingLoader:
    """Sequences that count up modulo the vocabulary: trivially learnable, fully deterministic."""

    def __init__(self, batch_size: int = 4, seq_len: int = 16):
        self.batch_size, self.seq_len, self.position = batch_size, seq_len, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.position)
            self.position += 1
            start = torch.randint(0, VOCAB, (self.batch_size, 1), generator=g)
            seq = (start + torch.arange(self.seq_len + 1)) % VOCAB
            yield {"input_ids": seq[:, :-1], "labels": seq[:, 1:]}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(tmp_path, objective=causal_lm_objective, *overrides, resume=None):
    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.max_steps=20", "optim.lr=1e-2",
                             "optim.warmup_steps=2", "logging.progress=false", "logging.tensorboard=false",
                             *overrides])
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB)
    precision = resolve_precision(cfg.train.precision)
    accelerator = build_accelerator(cfg, hidden_size=model_cfg.dim, precision=precision)
    torch.manual_seed(0)
    loader = CountingLoader()
    return train(cfg, accelerator=accelerator, model=Transformer(model_cfg), objective=objective,
                 train_loader=loader, val_batches=lambda: iter(CountingLoader()), resume_from=resume,
                 precision=precision)


def records(tmp_path, split="train"):
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_learns_and_logs(tmp_path):
    result = run(tmp_path, causal_lm_objective, "train.eval_every=10", "train.eval_at_start=true")
    train_rows = records(tmp_path)
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    assert train_rows[-1]["loss"] < 0.3 * train_rows[0]["loss"]
    assert all(r["tokens_seen"] == 4 * 16 * r["step"] for r in train_rows)
    lrs = [r["lr"] for r in train_rows]
    assert lrs[0] == pytest.approx(5e-3) and lrs[1] == pytest.approx(1e-2) and lrs[-1] < lrs[2]
    val = records(tmp_path, "val")
    assert [r["step"] for r in val] == [0, 10, 20]
    assert val[-1]["loss"] < val[0]["loss"] and val[-1]["perplexity"] == pytest.approx(math.exp(val[-1]["loss"]))
    assert result.final_checkpoint.name == "step_00000020"
    assert (result.final_checkpoint / COMPLETE_MARKER).is_file()
    assert (tmp_path / "COMPLETED").is_file()


def nan_on(steps: set[int]):
    """An objective that returns NaN on the given (1-based) calls, counting micro-batches."""
    calls = {"n": 0}

    def objective(model, batch):
        calls["n"] += 1
        loss, stats = causal_lm_objective(model, batch)
        if calls["n"] in steps:
            loss = loss * float("nan")
        return loss, stats

    return objective


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    result = run(tmp_path, nan_on({5}), "checkpoint.every=4")
    assert result.state.step == 20
    assert result.state.nonfinite_total == 1 and result.state.nonfinite_in_a_row == 0
    rows = records(tmp_path)
    assert math.isnan(rows[4]["loss"]) and rows[4]["nonfinite_total"] == 1
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 4)
    assert all(math.isfinite(v) for v in [r["grad_norm"] for r in rows if r["step"] != 5])


def test_nonfinite_in_a_row_stops_with_last_good_checkpoint_intact(tmp_path):
    with pytest.raises(NonFiniteLossError, match="3 non-finite steps in a row"):
        run(tmp_path, nan_on({9, 10, 11, 12}), "checkpoint.every=4", "train.max_nonfinite_steps=3")
    checkpoints = complete_checkpoints(tmp_path)
    assert [c.name for c in checkpoints] == ["step_00000004", "step_00000008"]
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["nonfinite_total"] == 0
    assert not (tmp_path / "COMPLETED").exists()


def test_skipped_step_leaves_weights_unchanged(tmp_path):
    """With every micro-batch of a step non-finite, the weights after it equal those before it."""
    result = run(tmp_path, nan_on({3}), "train.max_steps=3", "checkpoint.every=2")
    from trainer.export import consolidated_state_dict

    before = consolidated_state_dict(tmp_path / "checkpoints" / "step_00000002")
    after = consolidated_state_dict(result.final_checkpoint)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # AdamW's moments too: with lr 0 alone they would still have taken the step's gradient in.
    moments_before = torch.load(tmp_path / "checkpoints" / "step_00000002" / "optimizer.bin", weights_only=True)
    moments_after = torch.load(result.final_checkpoint / "optimizer.bin", weights_only=True)
    states = list(zip(moments_before["state"].values(), moments_after["state"].values()))
    assert states and len(moments_before["state"]) == len(moments_after["state"])
    for a, b in states:
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert torch.equal(a["step"], b["step"])


def test_partial_checkpoints_are_never_resumed(tmp_path):
    run(tmp_path, causal_lm_objective, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=5")
    root = tmp_path / "checkpoints"
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    # A crash mid-save leaves a temp folder, or a renamed folder without its marker.
    (root / ".tmp-step_00000006").mkdir()
    (root / "step_00000008").mkdir()
    assert resolve_resume("auto", tmp_path) == root / "step_00000004"
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(root / "step_00000008"), tmp_path)
    assert resolve_resume("auto", tmp_path / "fresh") is None


def test_keep_last_prunes_oldest(tmp_path):
    run(tmp_path, causal_lm_objective, "train.max_steps=8", "checkpoint.every=2", "checkpoint.keep_last=2")
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]


def test_bf16_autocast_learns(tmp_path):
    run(tmp_path, causal_lm_objective, "train.precision=bf16")
    rows = records(tmp_path)
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]


def test_precision_auto_and_fp16_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    assert resolve_precision("auto") == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16")


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_nonfinite_skip_under_two_rank_zero(tmp_path, zero_stage):
    """Under ZeRO too: a non-finite step leaves the weights exactly as they were, is counted, and training
    goes on (micro-batches 5 and 6 make step 3; 9 is half of step 5: one non-finite micro-batch skips its
    whole step, since finiteness is checked once per step)."""
    from tests.pretrain_run import REPO_ROOT, VENV_BIN, env
    from trainer.export import consolidated_state_dict

    cmd = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--use_deepspeed", "--zero_stage", str(zero_stage),
           "-m", "tests.nonfinite_worker", "5,6,9", f"train.output_dir={tmp_path}",
           f"train.deepspeed=zero{zero_stage}", "checkpoint.every=1", "checkpoint.keep_last=10"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = records(tmp_path)
    assert {r["world_size"] for r in rows} == {2}
    assert [r["step"] for r in rows] == list(range(1, 9))
    skipped = {2, 4}
    assert all(math.isnan(rows[i]["loss"]) and rows[i]["grad_norm"] is None for i in skipped)
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(rows) if i not in skipped)
    assert rows[-1]["nonfinite_total"] == 2 and rows[-1]["loss"] < rows[0]["loss"]
    weights = {s: consolidated_state_dict(tmp_path / "checkpoints" / f"step_{s:08d}") for s in (2, 3, 4, 5, 6)}
    assert all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])
    assert all(torch.equal(weights[4][k], weights[5][k]) for k in weights[4])
    assert not all(torch.equal(weights[3][k], weights[4][k]) for k in weights[3])
    assert not all(torch.equal(weights[5][k], weights[6][k]) for k in weights[5])
