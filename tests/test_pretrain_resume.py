"""Exact resume through the real CLI: 2N steps straight equal N steps, preemption signal, resume, N steps.

Bitwise-equal final weights and the same loss curve, for one process and for 2 ranks under
ZeRO-2 and ZeRO-3 (asserting world size 2 and per-rank shard files).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.pretrain_run import launch_command, make_tiny_corpus, metrics, run, run_until_signalled
from trainer.checkpoint import complete_checkpoints
from trainer.export import consolidated_state_dict

MAX_STEPS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def recipe_args(corpus, output_dir, **extra) -> list[str]:
    tokenizer, shards = corpus
    args = {
        "data.path": shards, "data.tokenizer": tokenizer, "data.seq_len": 32,
        "model.preset": "tiny", "train.output_dir": output_dir, "train.max_steps": MAX_STEPS,
        "train.micro_batch_size": 4, "train.grad_accum_steps": 2, "train.eval_every": 8,
        "train.eval_batches": 2, "optim.lr": 3e-3, "optim.warmup_steps": 4, "checkpoint.every": 0,
        "logging.progress": False, "logging.tensorboard": False, **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def final_weights(output_dir) -> dict[str, torch.Tensor]:
    checkpoints = complete_checkpoints(output_dir)
    assert checkpoints, f"no complete checkpoint in {output_dir}"
    assert checkpoints[-1].name == f"step_{MAX_STEPS:08d}"
    return consolidated_state_dict(checkpoints[-1])


def assert_same_run(straight, resumed):
    a, b = final_weights(straight), final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    curve_a = [(r["step"], r["loss"]) for r in metrics(straight)]
    curve_b = [(r["step"], r["loss"]) for r in metrics(resumed)]
    assert curve_a == curve_b
    assert [step for step, _ in curve_a] == list(range(1, MAX_STEPS + 1))
    val_a = [(r["step"], r["loss"]) for r in metrics(straight, "val")]
    assert val_a == [(r["step"], r["loss"]) for r in metrics(resumed, "val")]


def interrupted_then_resumed(corpus, out, ranks, zero_stage):
    first = run_until_signalled(launch_command("pretrain.py", recipe_args(corpus, out), ranks, zero_stage),
                                out, after_step=3)
    stopped = complete_checkpoints(out)
    assert len(stopped) == 1, "the signal must leave exactly one checkpoint"
    stop_step = json.loads((stopped[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= stop_step < MAX_STEPS, f"stopped at {stop_step}: the signal did not interrupt the run"
    assert not (out / "COMPLETED").exists()
    assert "checkpoint saved" in first.stderr + first.stdout
    run(launch_command("pretrain.py", recipe_args(corpus, out) + ["--resume", "auto"], ranks, zero_stage))
    assert (out / "COMPLETED").exists()
    return stop_step


def test_single_process_exact_resume(corpus, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(launch_command("pretrain.py", recipe_args(corpus, straight)))
    interrupted_then_resumed(corpus, resumed, ranks=1, zero_stage=None)
    assert_same_run(straight, resumed)
    losses = [r["loss"] for r in metrics(straight)]
    assert losses[-1] < losses[0] - 1.0, "the tiny model should learn the demo text"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_rank_zero_exact_resume(corpus, tmp_path, zero_stage):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(launch_command("pretrain.py", recipe_args(corpus, straight), ranks=2, zero_stage=zero_stage))
    assert {r["world_size"] for r in metrics(straight)} == {2}
    shards = sorted(p.name for p in (complete_checkpoints(straight)[-1] / "pytorch_model").iterdir())
    assert [s for s in shards if "optim_states" in s] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    interrupted_then_resumed(corpus, resumed, ranks=2, zero_stage=zero_stage)
    assert_same_run(straight, resumed)
