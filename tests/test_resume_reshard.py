"""Resume on another world size and ZeRO stage through the real CLI, from the portable state.

One chain of runs with the same global batch (16 sequences a step):
    A  2 ranks ZeRO-2, steps 1..8                         (the reference)
    B  1 process ZeRO-3, no launcher, resumes A at 4      (2 -> 1 ranks, ZeRO-2 -> ZeRO-3)
    E  2 ranks ZeRO-2, resumes B at 6                     (1 -> 2 ranks, ZeRO-3 -> ZeRO-2)
    C  1 process without DeepSpeed, resumes B at 8 = max_steps: nothing to train, it only
       writes B's state in its own layout                 (ZeRO-3 -> no DeepSpeed)
Loss curves and weights equal A's to fp32 round-off; C's re-gathered moments equal B's exactly.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.pretrain_run import launch_command, make_tiny_corpus, metrics, run
from trainer.checkpoint import complete_checkpoints
from trainer.export import consolidated_state_dict

STEPS = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), docs=300)


def args(corpus, output_dir, ranks: int, **extra) -> list[str]:
    tokenizer, shards = corpus
    values = {
        "data.path": shards, "data.tokenizer": tokenizer, "data.seq_len": 32, "model.preset": "tiny",
        "train.output_dir": output_dir, "train.max_steps": STEPS,
        # 16 sequences a step whatever the world size.
        "train.micro_batch_size": 4, "train.grad_accum_steps": 4 // ranks, "train.eval_every": 0,
        "optim.lr": 3e-3, "optim.warmup_steps": 2, "checkpoint.every": 2, "checkpoint.keep_last": 4,
        "logging.progress": False, "logging.tensorboard": False, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def checkpoint(out, step: int):
    found = [c for c in complete_checkpoints(out) if c.name == f"step_{step:08d}"]
    assert found, f"no checkpoint at step {step} in {out}"
    return found[0]


def portable(out, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint(out, step) / "portable" / "state.safetensors"))


def curve(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out)}


def assert_close_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, atol: float,
                         rtol: float = 0.0):
    assert a.keys() == b.keys()
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=rtol, atol=atol, msg=f"{what} {name} differs")


@pytest.mark.slow
def test_resume_on_other_world_size_and_zero_stage(corpus, tmp_path):
    a, b, c, e = (tmp_path / name for name in "abce")
    run(launch_command("pretrain.py", args(corpus, a, 2), ranks=2, zero_stage=2))
    assert {r["world_size"] for r in metrics(a)} == {2}
    assert json.loads((checkpoint(a, 4) / "topology.json").read_text()) == {
        "world_size": 2, "zero_stage": 2, "portable": True}

    # No launcher: DeepSpeed as a world of one.
    one = launch_command("pretrain.py", args(corpus, b, 1, **{"train.deepspeed": "zero3"}))
    resumed_b = run([*one, "--resume", str(checkpoint(a, 4))])
    assert "written by 2 ranks under ZeRO-2 on 1 rank under ZeRO-3" in resumed_b.stdout
    assert {r["world_size"] for r in metrics(b)} == {1}
    run(launch_command("pretrain.py", args(corpus, e, 2) + ["--resume", str(checkpoint(b, 6))],
                       ranks=2, zero_stage=2))
    assert {r["world_size"] for r in metrics(e)} == {2}
    run(launch_command("pretrain.py", args(corpus, c, 1)) + ["--resume", str(checkpoint(b, 8))])
    assert not (c / "metrics.jsonl").exists() or not metrics(c), "resumed at max_steps: nothing to train"

    reference = curve(a)
    assert sorted(reference) == list(range(1, STEPS + 1))
    for out, first in ((b, 5), (e, 7)):
        got = curve(out)
        assert sorted(got) == list(range(first, STEPS + 1))
        for step, loss in got.items():
            assert loss == pytest.approx(reference[step], abs=1e-5), f"{out.name} step {step}"
    # The data position maps: with a batch skipped or repeated the curve would not follow A's at all.
    assert reference[STEPS] < reference[1] - 0.3

    final_a = consolidated_state_dict(checkpoint(a, STEPS))
    for out in (b, e, c):
        assert_close_tensors(consolidated_state_dict(checkpoint(out, STEPS)), final_a, f"{out.name} weights", 1e-5)
    # Moments carried over, not restarted: B's at step 6 follow A's.
    assert_close_tensors(portable(b, 6), portable(a, 6), "B state", atol=1e-9, rtol=1e-3)
    # Re-sharding alone (C: ZeRO-3 -> plain AdamW, gathered back) changes no bit of them.
    original, resharded = portable(b, STEPS), portable(c, STEPS)
    assert original.keys() == resharded.keys()
    assert any(k.startswith("exp_avg_sq/") for k in original)
    for name in original:
        assert torch.equal(original[name], resharded[name]), f"{name} changed in re-sharding"
    meta_b, meta_c = (json.loads((checkpoint(o, STEPS) / "portable" / "meta.json").read_text()) for o in (b, c))
    assert meta_b["steps"] == meta_c["steps"] == [float(STEPS)] * len(meta_b["steps"])
    assert meta_b["scheduler"]["last_epoch"] == meta_c["scheduler"]["last_epoch"] == STEPS
