"""Model core: config round trip, presets, backends agree, packed documents stay separate, checkpointing."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model_defs import PRESETS, ModelConfig, Transformer, count_params, flops_per_token
from model_defs.config import llama_ffn_dim


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()


def test_config_round_trip_and_unknown_keys():
    cfg = ModelConfig.from_preset("llama3.1-8b")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus_key"):
        ModelConfig.from_dict({**d, "bogus_key": 1})


def test_config_validation_names_every_problem():
    with pytest.raises(ValueError) as err:
        ModelConfig(dim=65, n_heads=4, attention="fast", rope_scaling={"rope_type": "llama3", "factor": 8.0})
    msg = str(err.value)
    assert "n_heads" in msg and "attention" in msg and "low_freq_factor" in msg
    with pytest.raises(ValueError, match="rope_scaling.rope_type"):
        ModelConfig(rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("gpt5")


def test_presets_have_published_shapes():
    # Published parameter counts of Llama 3.2 1B / 3B and Llama 3.1 8B.
    assert round(count_params(ModelConfig.from_preset("llama3.2-1b")) / 1e6) == 1236
    assert round(count_params(ModelConfig.from_preset("llama3.2-3b")) / 1e6) == 3213
    assert round(count_params(ModelConfig.from_preset("llama3.1-8b")) / 1e6) == 8030
    for name in ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b"):
        cfg = ModelConfig.from_preset(name)
        # The explicit width equals Meta's derivation from multiple_of / ffn_dim_multiplier.
        assert cfg.ffn_dim == llama_ffn_dim(cfg.dim, cfg.multiple_of, cfg.ffn_dim_multiplier)
    assert set(PRESETS) >= {"tiny", "debug", "125m", "350m"}
    assert ModelConfig.from_preset("tiny", dim=128).ffn_dim == llama_ffn_dim(128, 32, None)


@pytest.mark.parametrize("tie", [False, True])
def test_count_params_matches_module(tie):
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=tie)
    model = Transformer(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert count_params(cfg, exclude_embeddings=True) == count_params(cfg) - cfg.vocab_size * cfg.dim
    n = count_params(cfg, exclude_embeddings=True) + (cfg.vocab_size * cfg.dim if tie else 0)
    assert flops_per_token(cfg, 128) == 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 128


def test_init_statistics_and_tying():
    model = _model(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    w = model.layers[0].feed_forward.w1.weight
    assert abs(w.std().item() - 0.02) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert "rope.cos" not in model.state_dict()


def test_shapes_and_hidden_feed_head():
    model = _model()
    x = torch.randint(0, 512, (2, 12))
    logits = model(x)
    hidden = model(x, return_hidden=True)
    assert logits.shape == (2, 12, 512) and hidden.shape == (2, 12, 64)
    torch.testing.assert_close(model.output(hidden), logits)


def test_eager_equals_sdpa():
    sdpa, eager = _model(attention="sdpa"), _model(attention="eager")
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 512, (2, 20))
    torch.testing.assert_close(eager(x), sdpa(x), atol=1e-5, rtol=1e-5)
    docs = torch.tensor([[0] * 7 + [1] * 13, [0] * 20])
    torch.testing.assert_close(eager(x, document_ids=docs), sdpa(x, document_ids=docs), atol=1e-5, rtol=1e-5)


def test_causality():
    model = _model()
    x = torch.randint(0, 512, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 512
    torch.testing.assert_close(model(x)[:, :10], model(y)[:, :10])
    assert not torch.allclose(model(x)[:, 10:], model(y)[:, 10:])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["document_ids", "position_ids", "both"])
def test_packed_documents_equal_separate_runs(attention, mode):
    model = _model(attention=attention)
    lengths = [[5, 9, 6], [20]]
    rows, docs, pos = [], [], []
    for row in lengths:
        rows.append(torch.randint(0, 512, (sum(row),)))
        docs.append(torch.cat([torch.full((n,), i) for i, n in enumerate(row)]))
        pos.append(torch.cat([torch.arange(n) for n in row]))
    x, docs, pos = torch.stack(rows), torch.stack(docs), torch.stack(pos)
    kwargs = {"document_ids": {"document_ids": docs}, "position_ids": {"position_ids": pos},
              "both": {"document_ids": docs, "position_ids": pos}}[mode]
    packed = model(x, **kwargs)
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            alone = model(x[b:b + 1, start:start + n])
            torch.testing.assert_close(packed[b:b + 1, start:start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
    # Without the boundaries, later documents would see earlier ones.
    assert not torch.allclose(model(x)[0, 5:14], packed[0, 5:14], atol=1e-3)


def test_positions_beyond_table_grow_rope():
    model = _model(max_seq_len=16)
    x = torch.randint(0, 512, (1, 40))
    assert model.rope.cos.shape[0] == 16
    out = model(x)
    assert model.rope.cos.shape[0] >= 40
    fresh = _model(max_seq_len=64)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(out, fresh(x))


def test_activation_checkpointing_same_grads():
    torch.manual_seed(0)
    x = torch.randint(0, 512, (2, 16))
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    grads = []
    for ckpt in (False, True):
        model = _model(activation_checkpointing=ckpt).train()
        model(x, document_ids=docs).float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_meta_init_then_materialize():
    cfg = ModelConfig.from_preset("tiny", tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(buffer_device="cpu")
    ref = _model(tie_embeddings=True)
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(model.eval()(x), ref(x))


def test_flash_attn_requested_without_package_is_clear():
    from model_defs.attention import flash_attn_available

    if flash_attn_available():
        pytest.skip("flash_attn is installed")
    with pytest.raises(ValueError, match="flash_attn"):
        Transformer(ModelConfig.from_preset("tiny", attention="flash_attn"))


@pytest.mark.gpu
def test_flash_attn_matches_sdpa_on_gpu():
    from model_defs.attention import flash_attn_available

    if not flash_attn_available():
        pytest.skip("flash_attn not installed")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny")
    sdpa = Transformer(cfg).cuda().to(torch.bfloat16).eval()
    flash = Transformer(dataclasses.replace(cfg, attention="flash_attn")).cuda().to(torch.bfloat16).eval()
    flash.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 512, (2, 32), device="cuda")
    docs = torch.tensor([[0] * 10 + [1] * 22, [0] * 32], device="cuda")
    torch.testing.assert_close(flash(x).float(), sdpa(x).float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flash(x, document_ids=docs).float(), sdpa(x, document_ids=docs).float(),
                               atol=2e-2, rtol=2e-2)


def test_bf16_weights_and_autocast_track_fp32():
    model = _model()
    x = torch.randint(0, 512, (2, 16))
    docs = torch.tensor([[0] * 6 + [1] * 10, [0] * 16])
    ref = model(x, document_ids=docs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(x, document_ids=docs)
    half = _model().to(torch.bfloat16)(x, document_ids=docs)
    assert auto.dtype == torch.bfloat16 and half.dtype == torch.bfloat16
    torch.testing.assert_close(auto.float(), ref, atol=0.05, rtol=0.05)
    torch.testing.assert_close(half.float(), ref, atol=0.05, rtol=0.05)


def test_bad_shapes_are_named():
    model = _model()
    with pytest.raises(ValueError, match="document_ids"):
        model(torch.randint(0, 512, (2, 8)), document_ids=torch.zeros(2, 7, dtype=torch.long))


def test_left_padding_mask_matches_unpadded_rows():
    model = _model()
    x = torch.randint(1, 512, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    out = model(x, attention_mask=mask)
    torch.testing.assert_close(out[0], model(x[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 4:], model(x[1:, 4:])[0], atol=1e-5, rtol=1e-5)


def _fake_flash_attn_module():
    """A CPU stand-in with flash_attn's signatures, so the varlen plumbing is tested without a GPU."""
    import types

    import torch.nn.functional as F

    def _causal(q, k, v):  # (T, H, D) each, GQA by repeating kv heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)

    def flash_attn_func(q, k, v, causal, window_size=(-1, -1)):
        assert causal and tuple(window_size) == (-1, -1)
        return torch.stack([_causal(q[b], k[b], v[b]) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal, window_size=(-1, -1)):
        assert causal and tuple(window_size) == (-1, -1) and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        bounds = cu_q.tolist()
        assert max_q == max_k == max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
        return torch.cat([_causal(q[s:e], k[s:e], v[s:e]) for s, e in zip(bounds[:-1], bounds[1:])])

    mod = types.ModuleType("flash_attn")
    mod.flash_attn_func, mod.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return mod


def test_flash_varlen_plumbing_with_stand_in(monkeypatch):
    import sys

    import model_defs.model as model_module

    monkeypatch.setitem(sys.modules, "flash_attn", _fake_flash_attn_module())
    monkeypatch.setattr(model_module, "resolve_backend", lambda requested, device: requested)
    sdpa = _model().to(torch.bfloat16)
    flash = _model(attention="flash_attn").to(torch.bfloat16)
    flash.load_state_dict(sdpa.state_dict())
    x = torch.randint(0, 512, (2, 24))
    pos = torch.tensor([list(range(5)) + list(range(12)) + list(range(7)), list(range(24))])
    torch.testing.assert_close(flash(x).float(), sdpa(x).float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(flash(x, position_ids=pos).float(), sdpa(x, position_ids=pos).float(),
                               atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="fp16/bf16"):
        _model(attention="flash_attn")(x)


def test_inputs_embeds_equal_input_ids():
    model = _model()
    x = torch.randint(0, 512, (2, 10))
    docs = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    embeds = model.tok_embeddings(x)
    torch.testing.assert_close(model(None, inputs_embeds=embeds), model(x))
    torch.testing.assert_close(model(None, document_ids=docs, inputs_embeds=embeds), model(x, document_ids=docs))
    with pytest.raises(ValueError, match="exactly one"):
        model(x, inputs_embeds=embeds)
