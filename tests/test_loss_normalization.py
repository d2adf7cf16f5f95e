"""The loss of a step is normalized by all its targets: accumulation and rank count change nothing."""
from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from tests import normalization_worker
from tests.pretrain_run import VENV_BIN, run


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def one_step(tmp_path, task: str, micro: int, accum: int, ranks: int = 1):
    out = tmp_path / f"{task}-{micro}x{accum}x{ranks}"
    out.mkdir()
    if ranks == 1:
        normalization_worker.main(out, task, micro, accum)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    else:
        run([str(VENV_BIN / "accelerate"), "launch", "--num_processes", str(ranks), "--num_machines", "1",
             "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no",
             "-m", "tests.normalization_worker", str(out), task, str(micro), str(accum)], timeout=600)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["world_size"] == ranks
    return load_file(str(out / "grads.safetensors")), train_rows[-1]


def assert_same(a, b):
    (grads_a, row_a), (grads_b, row_b) = a, b
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=1e-6, msg=name)
    assert row_a["grad_norm"] == pytest.approx(row_b["grad_norm"], rel=1e-6)
    assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-6)


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_accumulation_gives_the_gradient_of_one_big_batch(tmp_path, task):
    big = one_step(tmp_path, task, micro=4, accum=1)
    assert_same(one_step(tmp_path, task, micro=1, accum=4), big)
    assert_same(one_step(tmp_path, task, micro=2, accum=2), big)


def test_sft_one_batch_gradient_is_the_token_mean(tmp_path):
    """The oracle: the gradient of the plain token-weighted mean over all rows, computed by hand."""
    from model_defs import ModelConfig, Transformer
    from trainer.objectives import token_cross_entropy

    grads, row = one_step(tmp_path, "sft", micro=4, accum=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=normalization_worker.VOCAB, max_seq_len=64))
    rows = normalization_worker.sft_rows()
    ids, labels = torch.cat([r["input_ids"] for r in rows]), torch.cat([r["labels"] for r in rows])
    loss_sum, tokens = token_cross_entropy(model(ids), labels)
    (loss_sum / tokens).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-6, msg=name)
    assert row["loss"] == pytest.approx((loss_sum / tokens).item(), rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_two_ranks_with_accumulation_give_the_same_gradient(tmp_path, task):
    assert_same(one_step(tmp_path, task, micro=1, accum=2, ranks=2), one_step(tmp_path, task, micro=4, accum=1))
