"""What only a CUDA device can check: bf16 packed training, chunked token log-probs, QLoRA. Skipped without one
(conftest); `bench/gpu_check.sh` runs them with every other `gpu`-marked test."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model_defs import ModelConfig, Transformer
from model_defs.attention import flash_attn_available
from tests.sft_fixtures import tiny_model
from trainer.token_logps import label_ce_sum

pytestmark = pytest.mark.gpu


def _packed_vs_one_by_one(attention: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention=attention)
    model = Transformer(cfg).cuda()
    docs = [torch.randint(0, cfg.vocab_size, (n,), device="cuda") for n in (9, 17, 6)]
    packed = torch.cat(docs)[None]
    ids = torch.cat([torch.full((len(d),), i, device="cuda") for i, d in enumerate(docs)])[None]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        together = model(packed, document_ids=ids)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    return together.float(), alone.float()


@pytest.mark.parametrize("attention", ["sdpa", "flash_attn"])
def test_packed_documents_in_bf16_match_one_by_one(attention):
    """The varlen path (flash-attn when it installs, SDPA's masked path otherwise) keeps documents apart."""
    if attention == "flash_attn" and not flash_attn_available():
        pytest.skip("flash_attn not installed")
    together, alone = _packed_vs_one_by_one(attention)
    torch.testing.assert_close(together, alone, atol=3e-2, rtol=3e-2)


def test_bf16_training_step_tracks_fp32():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).cuda()
    x = torch.randint(0, 512, (2, 64), device="cuda")
    y = torch.roll(x, -1, dims=1)
    losses, grads = {}, {}
    for mode in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        losses[mode] = loss.item()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]
    assert F.cosine_similarity(grads["bf16"], grads["fp32"], dim=0) > 0.99


def test_chunked_ce_equals_plain_on_cuda():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 4096, bias=False).cuda()
    h = torch.randn(300, 64, device="cuda", requires_grad=True)
    labels = torch.randint(0, 4096, (300,), device="cuda")
    want = F.cross_entropy(head(h), labels, reduction="sum")
    want.backward()
    want_h, want_w = h.grad.clone(), head.weight.grad.clone()
    h.grad = head.weight.grad = None
    got = label_ce_sum(h, labels, head, "on", chunk_tokens=37)
    got.backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(h.grad, want_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad, want_w, rtol=1e-4, atol=1e-5)


def test_qlora_on_cuda_trains_lora_in_bf16():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from trainer.sft.config import SFTSection
    from trainer.tuning.methods import apply_method

    reference = tiny_model(300, seed=4).cuda()
    model = apply_method(tiny_model(300, seed=4).cuda(), SFTSection(method="qlora"), key="sft",
                         compute_dtype=torch.bfloat16)
    layer = model.base_model.model.layers[0].attention.wq
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.device.type == "cuda"
    ids = torch.randint(0, 300, (2, 12), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids)
    assert F.cosine_similarity(logits.flatten().float(), reference(ids).flatten(), dim=0) > 0.9
    logits.float().pow(2).mean().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_A["default"].weight.grad.abs().sum() > 0
