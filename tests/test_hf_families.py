"""Qwen2 and Mistral: logits equal to transformers' `Qwen2ForCausalLM` / `MistralForCausalLM` on the same
weights, in both directions, on every attention path (plain, packed documents, padded KV-cache decoding)."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from model_defs import ModelConfig, Transformer
from model_defs.generate import generate
from model_defs.hf import config_from_hf, load_hf_model, save_hf_model, state_dict_from_hf

transformers.logging.set_verbosity_error()
ATOL = 1e-5
SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)


def _randomize(model):
    with torch.no_grad():  # norms at 1 and biases at 0 would let a dropped or swapped one pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
    return model.eval()


def hf_qwen2(tie=True, seed=0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(**SHAPE, rope_theta=1_000_000.0, tie_word_embeddings=tie, use_sliding_window=False,
                         attn_implementation="eager")
    return _randomize(Qwen2ForCausalLM(config))


def hf_mistral(window=8, seed=0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    config = MistralConfig(**SHAPE, rope_theta=1_000_000.0, sliding_window=window, tie_word_embeddings=False,
                           attn_implementation="eager")
    return _randomize(MistralForCausalLM(config))


FAMILIES = {"qwen2": hf_qwen2, "qwen2-untied": lambda: hf_qwen2(tie=False), "mistral": hf_mistral,
            "mistral-full": lambda: hf_mistral(window=None)}


def _ours(hf, **overrides) -> Transformer:
    cfg = config_from_hf(hf.config, **overrides)
    model = Transformer(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_hf_to_ours_logits_match(family, attention):
    hf = FAMILIES[family]()
    ours = _ours(hf, attention=attention)
    assert ours.cfg.family == family.split("-")[0]
    assert ours.cfg.qkv_bias == (ours.cfg.family == "qwen2")
    # 6 tokens sit inside Mistral's 8-token window, 40 slide it.
    for T in (6, 40):
        x = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_folders_round_trip_both_ways(tmp_path, family):
    hf = FAMILIES[family]()
    hf.save_pretrained(tmp_path / "theirs")
    ours = load_hf_model(tmp_path / "theirs")
    x = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(x).logits
        torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=1e-4)
    save_hf_model(ours, ours.cfg, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == [type(hf).__name__] and config["model_type"] == family
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back) is type(hf)
    assert back.config.sliding_window == hf.config.sliding_window
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, expected, atol=ATOL, rtol=1e-4)


def test_packed_documents_with_a_sliding_window_equal_separate_rows():
    """Packed rows (block-diagonal + band mask) give each document the logits it gets alone."""
    ours = _ours(hf_mistral(window=5))
    lengths = [7, 12, 3]
    docs = [torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        together = ours(packed, document_ids=document_ids)
        alone = torch.cat([ours(d) for d in docs], dim=1)
    torch.testing.assert_close(together, alone, atol=ATOL, rtol=1e-4)
    with torch.no_grad():  # the window is doing something: full attention differs past 5 tokens
        ours.cfg.sliding_window = None
        assert not torch.allclose(ours(docs[1]), alone[:, 7:19], atol=1e-3)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_kv_cache_generation_matches_transformers(family):
    """Greedy decoding with our KV cache (left-padded batch, past the window) equals transformers'."""
    hf = FAMILIES[family]()
    ours = _ours(hf)
    prompts = [[5, 9, 33, 7], [11, 2, 40, 41, 42, 43, 44, 45, 46, 47]]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    got = generate(ours, input_ids, attention_mask=attention_mask, max_new_tokens=12, pad_token_id=0)
    for prompt, row in zip(prompts, got):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
        assert row[width:].tolist() == out[0, len(prompt):].tolist()


def test_presets_have_the_published_shapes():
    qwen = ModelConfig.from_preset("qwen2.5-0.5b")
    assert (qwen.family, qwen.qkv_bias, qwen.tie_embeddings, qwen.head_dim, qwen.rope_theta) == (
        "qwen2", True, True, 64, 1e6)
    mistral = ModelConfig.from_preset("mistral-7b-v0.1")
    assert (mistral.family, mistral.sliding_window, mistral.n_kv_heads, mistral.head_dim) == ("mistral", 4096, 8, 128)
    for name in ("qwen2.5-1.5b", "qwen2.5-3b", "mistral-7b"):
        ModelConfig.from_preset(name)


def test_qwen2_per_layer_windows_and_flags_outside_their_family_are_refused():
    config = hf_qwen2().config.to_dict() | {"use_sliding_window": True, "sliding_window": 8}
    with pytest.raises(ValueError, match="use_sliding_window"):
        config_from_hf(config)
    with pytest.raises(ValueError, match="qkv_bias=True does not fit family='llama'"):
        ModelConfig.from_preset("tiny", qkv_bias=True)
    with pytest.raises(ValueError, match="qkv_bias=False does not fit family='qwen2'"):
        ModelConfig.from_preset("tiny", family="qwen2")
    with pytest.raises(ValueError, match="sliding_window=8 needs family='mistral'"):
        ModelConfig.from_preset("tiny", sliding_window=8)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_flash_attn_window_equals_the_sdpa_band(packed):
    """flash_attn's window_size (dense and varlen) against the band mask SDPA gets, in bf16 on CUDA."""
    from model_defs.attention import flash_attn_available

    if not flash_attn_available():
        pytest.skip("flash_attn is not installed")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", family="mistral", sliding_window=7, vocab_size=256)
    model = Transformer(cfg).to("cuda", torch.bfloat16).eval()
    x = torch.randint(0, 256, (2, 48), device="cuda")
    document_ids = (torch.arange(48, device="cuda") >= 20).long().expand(2, 48) if packed else None
    with torch.no_grad():
        model.cfg.attention = "sdpa"
        expected = model(x, document_ids=document_ids).float()
        model.cfg.attention = "flash_attn"
        got = model(x, document_ids=document_ids).float()
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=3e-2)
