"""Chunked label log-probs (`trainer/token_logps.py`): same values and gradients as the full logits, without
ever saving [tokens x vocab] for backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.sft_fixtures import tiny_model
from trainer import token_logps
from trainer.dpo.objective import sequence_logps
from trainer.objectives import IGNORE_INDEX, causal_lm, causal_lm_objective
from trainer.token_logps import (
    chunk_tokens_for,
    label_ce_sum,
    label_logps,
    lm_head_of,
    use_chunks,
)

VOCAB = 96
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _batch(rows: int = 3, seq: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
    labels = torch.randint(1, VOCAB, (rows, seq), generator=g)
    labels[torch.rand(rows, seq, generator=g) < 0.4] = IGNORE_INDEX  # prompts, padding
    labels[0, :] = IGNORE_INDEX  # a row without any label
    return {"input_ids": ids, "labels": labels}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def small_chunks(monkeypatch):
    """A chunk of 5 tokens at VOCAB: several chunks, the last one partial."""
    monkeypatch.setattr(token_logps, "CHUNK_BYTES", 5 * 4 * VOCAB)
    assert chunk_tokens_for(VOCAB) == 5


@pytest.mark.parametrize("chunk", [1, 4, 5, 12, 100])  # N = 12: dividing, not dividing, one chunk, larger
def test_label_logps_and_grads_equal_the_plain_path(chunk):
    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB, bias=False)
    h = torch.randn(12, 16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (12,))
    upstream = torch.randn(12)  # distinct per-token weights, as DPO's per-row sums give

    plain = -F.cross_entropy(head(h).float(), labels, reduction="none")
    (plain * upstream).sum().backward()
    want_h, want_w = h.grad.clone(), head.weight.grad.clone()
    h.grad = head.weight.grad = None

    chunked = label_logps(h, labels, head, "on", chunk_tokens=chunk)
    (chunked * upstream).sum().backward()
    assert chunked.dtype == torch.float32 and chunked.shape == (12,)
    torch.testing.assert_close(chunked, plain, **TOL)
    torch.testing.assert_close(h.grad, want_h, **TOL)
    torch.testing.assert_close(head.weight.grad, want_w, **TOL)


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_loss_and_grads_equal_the_full_logits(tied, small_chunks):
    batch = _batch()
    results = {}
    for mode in ("off", "on", "auto"):
        model = tiny_model(VOCAB, tie_embeddings=tied)
        loss, stats = causal_lm_objective(model, batch, chunking=mode)
        loss.backward()
        results[mode] = loss.detach(), stats, _grads(model)
    loss, stats, grads = results["off"]
    assert "output.weight" in grads or tied
    for mode in ("on", "auto"):  # auto chunks too: 20-odd labelled tokens > 5
        torch.testing.assert_close(results[mode][0], loss, **TOL)
        assert results[mode][1]["tokens"] == stats["tokens"] == (batch["labels"] != IGNORE_INDEX).sum()
        assert results[mode][2].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(results[mode][2][name], g, **TOL, msg=f"{mode}: {name}")


@pytest.mark.parametrize("tied", [False, True])
def test_dpo_row_logps_and_grads_equal_the_full_logits(tied, small_chunks):
    batch = _batch(rows=4, seq=9, seed=1)
    upstream = torch.tensor([0.3, -1.0, 2.0, 0.7])  # rows weigh differently, as in a preference loss
    results = {}
    for mode in ("off", "on"):
        model = tiny_model(VOCAB, tie_embeddings=tied)
        logps, tokens = sequence_logps(model, batch["input_ids"], batch["labels"], chunking=mode)
        (logps * upstream).sum().backward()
        results[mode] = logps.detach(), tokens, _grads(model)
    (want, want_tokens, want_grads), (got, got_tokens, got_grads) = results["off"], results["on"]
    assert want[0] == 0 and want_tokens[0] == 0
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_tokens, want_tokens)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **TOL, msg=name)


def test_through_a_peft_lora_model(small_chunks):
    from peft import LoraConfig, get_peft_model

    batch = _batch(seed=2)
    results = {}
    for mode in ("off", "on"):
        model = get_peft_model(tiny_model(VOCAB), LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv", "w2"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)
        assert lm_head_of(model) is model.get_base_model().output
        loss, _ = causal_lm_objective(model, batch, chunking=mode)
        loss.backward()
        results[mode] = loss.detach(), _grads(model)
    assert results["off"][1] and all("lora_" in n for n in results["off"][1])
    torch.testing.assert_close(results["on"][0], results["off"][0], **TOL)
    for name, g in results["off"][1].items():
        torch.testing.assert_close(results["on"][1][name], g, **TOL, msg=name)


def test_lm_head_of_unwraps_compile_ddp_style_and_prompt_tuning():
    from trainer.tuning.config import PromptTuningSection
    from trainer.tuning.prompt_tuning import PromptTunedModel

    model = tiny_model(VOCAB)

    class Wrapper(nn.Module):  # DDP / DeepSpeedEngine / Accelerate keep the model as `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert lm_head_of(model) is model.output
    assert lm_head_of(Wrapper(torch.compile(model))) is model.output
    prompted = PromptTunedModel.create(model, PromptTuningSection(num_virtual_tokens=3, init="random"))
    assert lm_head_of(Wrapper(prompted)) is model.output
    with pytest.raises(TypeError, match="no LM head"):
        lm_head_of(nn.Linear(2, 2))


def test_prompt_tuned_model_chunked_equals_full(small_chunks):
    from trainer.tuning.config import PromptTuningSection
    from trainer.tuning.prompt_tuning import PromptTunedModel

    batch = _batch(seed=3)
    results = {}
    for mode in ("off", "on"):
        model = PromptTunedModel.create(tiny_model(VOCAB), PromptTuningSection(num_virtual_tokens=2, init="random"))
        torch.manual_seed(1)
        model.prompt_encoder.embedding.weight.data.normal_()
        loss, _ = causal_lm_objective(model, batch, chunking=mode)
        loss.backward()
        results[mode] = loss.detach(), model.prompt_encoder.embedding.weight.grad.clone()
    torch.testing.assert_close(results["on"][0], results["off"][0], **TOL)
    torch.testing.assert_close(results["on"][1], results["off"][1], **TOL)


def _largest_saved_logits(fn, vocab: int) -> int:
    """The most elements of any (..., vocab) tensor that autograd saves for backward while `fn` runs."""
    sizes = [0]

    def pack(t):
        if t.dim() and t.size(-1) == vocab:
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return max(sizes)


def test_no_tokens_x_vocab_tensor_is_saved_for_backward(small_chunks):
    batch = _batch(rows=4, seq=16)
    n = int((batch["labels"] != IGNORE_INDEX).sum())
    vocab = VOCAB + 1  # 96 is also the tiny model's FFN width
    model = tiny_model(vocab)
    assert vocab not in (model.cfg.dim, model.layers[0].feed_forward.w1.out_features)  # only logits end in it
    full = _largest_saved_logits(lambda: causal_lm_objective(model, batch, chunking="off")[0], vocab)
    chunked = _largest_saved_logits(lambda: causal_lm_objective(model, batch, chunking="on")[0], vocab)
    dpo = _largest_saved_logits(
        lambda: sequence_logps(model, batch["input_ids"], batch["labels"], chunking="on")[0].sum(), vocab)
    assert full >= n * vocab  # the hook sees the logits when they are kept
    assert chunked == dpo == 0  # recomputed in backward: not even one chunk's logits is kept


def test_no_labels_gives_zero_loss_and_zero_grads():
    model = tiny_model(VOCAB)
    batch = _batch()
    batch["labels"][:] = IGNORE_INDEX
    for mode in ("on", "auto"):
        model.zero_grad()
        loss, stats = causal_lm_objective(model, batch, chunking=mode)
        loss.backward()  # still a graph: DDP and ZeRO expect every rank's backward
        assert loss.item() == 0 and stats["tokens"] == 0
        assert model.output.weight.grad is not None and not model.output.weight.grad.any()


def test_no_grad_values_match():
    model = tiny_model(VOCAB)
    batch = _batch()
    with torch.no_grad():
        want, _ = sequence_logps(model, batch["input_ids"], batch["labels"], chunking="off")
        got, _ = sequence_logps(model, batch["input_ids"], batch["labels"], chunking="on")
    torch.testing.assert_close(got, want, **TOL)


def test_auto_chunks_only_when_the_logits_exceed_one_chunk():
    assert chunk_tokens_for(128_256) == 523 and chunk_tokens_for(32_000) == 2097
    assert not use_chunks("auto", 523, 128_256) and use_chunks("auto", 524, 128_256)
    assert use_chunks("on", 1, 128_256) and not use_chunks("off", 10**6, 128_256)
    with pytest.raises(ValueError, match="loss_chunking"):
        use_chunks("yes", 1, 10)


def test_causal_lm_binds_the_switch(small_chunks):
    batch = _batch()
    model = tiny_model(VOCAB)
    bound, _ = causal_lm("on")(model, batch)
    direct, _ = causal_lm_objective(model, batch, chunking="off")
    torch.testing.assert_close(bound, direct, **TOL)


def test_ce_sum_without_cuda_is_the_chunked_sum():
    torch.manual_seed(0)
    head = nn.Linear(8, VOCAB, bias=False)
    h, labels = torch.randn(7, 8), torch.randint(0, VOCAB, (7,))
    want = F.cross_entropy(head(h), labels, reduction="sum")
    torch.testing.assert_close(label_ce_sum(h, labels, head, "on", chunk_tokens=3), want, **TOL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernel needs CUDA")
def test_liger_sum_matches_the_plain_path_on_cuda(monkeypatch):
    pytest.importorskip("liger_kernel")

    def not_fused(*args, **kwargs):
        raise AssertionError("the chunked path ran instead of Liger's kernel")

    monkeypatch.setattr(token_logps, "label_logps", not_fused)
    torch.manual_seed(0)
    head = nn.Linear(64, 4096, bias=False).cuda()
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 4096, (300,), device="cuda")
    F.cross_entropy(head(h), labels, reduction="sum").backward()
    want_h, want_w = h.grad.clone(), head.weight.grad.clone()
    h.grad = head.weight.grad = None
    got = label_ce_sum(h, labels, head, "on")
    got.backward()
    torch.testing.assert_close(got, F.cross_entropy(head(h), labels, reduction="sum"), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(h.grad, want_h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.weight.grad, want_w, rtol=1e-4, atol=1e-4)


def test_zero3_ranks_call_the_head_equally_often(monkeypatch):
    """Under ZeRO-3 each head call all-gathers its weight: a rank with fewer labelled tokens must still make as
    many calls (forward and backward recompute) as the rank with the most."""
    import torch.distributed as dist

    torch.manual_seed(0)
    head = nn.Linear(8, VOCAB, bias=False)
    head.weight.ds_id = 0  # what DeepSpeed marks a ZeRO-3 partitioned parameter with
    calls = []
    head.register_forward_hook(lambda mod, args, out: calls.append(args[0].size(0)))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)

    def all_reduce(t, op=None):  # another rank holds 23 labelled tokens
        t.copy_(torch.maximum(t, torch.tensor([23])))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    h = torch.randn(7, 8, requires_grad=True)
    labels = torch.randint(0, VOCAB, (7,))
    got = label_logps(h, labels, head, "on", chunk_tokens=5)
    assert calls == [5, 2, 0, 0, 0]  # ceil(23 / 5) calls, the last ones empty
    got.sum().backward()
    assert len(calls) == 10  # and each recomputed once
    del head.weight.ds_id
    torch.testing.assert_close(got, -F.cross_entropy(head(h), labels, reduction="none"), **TOL)
    # auto decides from the largest rank too: 23 tokens > one chunk of 5 here, though this rank has 7 < 10
    calls.clear()
    head.weight.ds_id = 0
    monkeypatch.setattr(token_logps, "CHUNK_BYTES", 10 * 4 * VOCAB)
    label_logps(h, labels, head, "auto")
    assert calls == [7, 0, 0]


@pytest.mark.parametrize("head_trains", [True, False])
def test_ce_sum_forms_gradients_in_forward_without_recompute(monkeypatch, head_trains):
    """A plain head's CE sum takes the gradient-in-forward path: no checkpoint (no recomputed head matmul),
    values and gradients of h and the weight equal the full logits', also when the upstream gradient is not 1."""
    def no_recompute(*args, **kwargs):
        raise AssertionError("the recomputing path ran")

    monkeypatch.setattr(token_logps, "checkpoint", no_recompute)
    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB, bias=False).requires_grad_(head_trains)
    h = torch.randn(12, 16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (12,))
    want = F.cross_entropy(head(h), labels, reduction="sum")
    (3.0 * want).backward()
    want_h, want_w = h.grad.clone(), head.weight.grad.clone() if head_trains else None
    h.grad = head.weight.grad = None
    got = label_ce_sum(h, labels, head, "on", chunk_tokens=5)
    (3.0 * got).backward()
    torch.testing.assert_close(got, want.detach(), **TOL)
    torch.testing.assert_close(h.grad, want_h, **TOL)
    if head_trains:
        torch.testing.assert_close(head.weight.grad, want_w, **TOL)
    else:
        assert head.weight.grad is None
