"""KV-cache generation: cache == no cache == transformers, left padding, stop tokens, sampling."""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from model_defs import ModelConfig, Transformer
from model_defs.generate import generate, sample_next
from model_defs.hf import config_from_hf, state_dict_from_hf

transformers.logging.set_verbosity_error()
V = 256


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    # A larger init spreads the logits so greedy choices are far from numerical ties.
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=V, init_std=0.1)).eval()


def _prompts(seed: int = 0, B: int = 3, T: int = 7) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_greedy_cache_equals_no_cache(model):
    x = _prompts()
    cached = generate(model, x, max_new_tokens=12)
    uncached = generate(model, x, max_new_tokens=12, use_cache=False)
    assert cached.shape == (3, 19)
    assert torch.equal(cached[:, :7], x)
    assert torch.equal(cached, uncached)


def test_greedy_matches_naive_argmax_loop(model):
    x = _prompts(1, B=1)
    seq = x
    with torch.no_grad():
        for _ in range(8):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generate(model, x, max_new_tokens=8), seq)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "dynamic", "factor": 2.0}])
def test_greedy_matches_transformers_generate(rope_scaling):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=16, rope_scaling=rope_scaling, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = LlamaForCausalLM(config).eval()
    cfg = config_from_hf(hf.config)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    x = _prompts(2, B=2, T=6)
    # 20 new tokens run past max_position_embeddings=16, where dynamic NTK rescales while decoding.
    expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=20, do_sample=False,
                           pad_token_id=0)
    assert torch.equal(generate(ours, x, max_new_tokens=20), expected)


@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_rows_alone(model, use_cache):
    rows = [_prompts(3, B=1, T=9)[0], _prompts(4, B=1, T=4)[0], _prompts(5, B=1, T=6)[0]]
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    batch = generate(model, x, attention_mask=mask, max_new_tokens=10, use_cache=use_cache)
    for i, r in enumerate(rows):
        alone = generate(model, r[None], max_new_tokens=10)
        assert torch.equal(batch[i, T:], alone[0, len(r):]), f"row {i}"


def test_stop_tokens_finish_rows_and_pad(model):
    x = _prompts(6, B=2)
    free = generate(model, x, max_new_tokens=10)
    stop = int(free[0, 7 + 2])  # row 0's third new token
    if stop in free[1, 7:].tolist():
        pytest.skip("row 1 would also stop; pick another prompt seed")
    out = generate(model, x, max_new_tokens=10, stop_token_ids=[stop], pad_token_id=-1)
    first = free[0, 7:].tolist().index(stop)
    assert out[0, 7 + first] == stop
    assert (out[0, 7 + first + 1:] == -1).all()
    assert torch.equal(out[1], free[1])  # the other row runs on

    single = generate(model, x[:1], max_new_tokens=10, stop_token_ids=[stop])
    assert single.shape[1] == 7 + first + 1  # everything finished: no more steps


def test_sampling_reproducible_and_top_k1_is_greedy(model):
    x = _prompts(7)
    greedy = generate(model, x, max_new_tokens=10)
    a = generate(model, x, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = generate(model, x, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(3))
    c = generate(model, x, max_new_tokens=10, temperature=1.0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    k1 = generate(model, x, max_new_tokens=10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(k1, greedy)
    p0 = generate(model, x, max_new_tokens=10, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(p0, greedy)


def test_top_k_top_p_restrict_support():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    # softmax([0,1,2,3]) = [.032, .087, .237, .644]: top_p=0.7 keeps tokens 3 and 2 only.
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert set(sample_next(logits, 1.0, top_p=0.6, generator=g).tolist()) == {3}
    assert set(sample_next(logits, 1.0, generator=g).tolist()) == {0, 1, 2, 3}


def test_bad_masks_rejected(model):
    x = _prompts(8, B=2, T=4)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, x, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="no real tokens"):
        generate(model, x, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), max_new_tokens=2)


def _left_padded(lengths=(9, 4, 6), seed: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(lengths)
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, n in enumerate(lengths):
        x[i, T - n:] = torch.randint(1, V, (n,), generator=g)
        mask[i, T - n:] = 1
    return x, mask


FAMILIES = {
    "llama-gqa": {},
    "mistral-window": {"family": "mistral", "sliding_window": 5},  # binds in the prompt and while decoding
    "qwen2-bias": {"family": "qwen2", "qkv_bias": True, "n_kv_heads": 1},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_decoder_equals_module_path_and_full_recompute(family):
    from model_defs.decode import mkl_packing_available

    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny", vocab_size=V, init_std=0.1, **FAMILIES[family])).eval()
    if m.cfg.qkv_bias:
        for layer in m.layers:  # non-zero biases, so a dropped or misplaced bias shows
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                torch.nn.init.normal_(lin.bias, std=0.1)
    x, mask = _left_padded()
    reference = generate(m, x, attention_mask=mask, max_new_tokens=12, use_cache=False)
    assert torch.equal(generate(m, x, attention_mask=mask, max_new_tokens=12, fused=False), reference)
    packs = [False, True] if mkl_packing_available(m.output.weight) else [False]
    for pack in packs:
        got = generate(m, x, attention_mask=mask, max_new_tokens=12, fused=True, pack=pack)
        assert torch.equal(got, reference), f"pack={pack}"


def test_fused_sampling_reproducible_and_equal_to_module_path(model):
    x, mask = _left_padded(seed=11)

    def run(seed, **kw):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(x))]  # one stream per row
        return generate(model, x, attention_mask=mask, max_new_tokens=10, temperature=0.9, top_p=0.9,
                        generator=gens, **kw)
    a, b = run(3, fused=True), run(3, fused=True)
    assert torch.equal(a, b) and not torch.equal(a, run(30, fused=True))
    assert torch.equal(a, run(3, fused=False))  # same logits bits, so the same draws


def test_fused_refuses_wrapped_projections():
    from model_defs.decode import fusable

    torch.manual_seed(0)
    m = Transformer(ModelConfig.from_preset("tiny", vocab_size=V)).eval()
    assert fusable(m)
    m.layers[1].attention.wv = torch.nn.Sequential(m.layers[1].attention.wv)  # as an adapter would wrap it
    assert not fusable(m)
    x = _prompts(12, B=1)
    with pytest.raises(ValueError, match="fused=True"):
        generate(m, x, max_new_tokens=2, fused=True)
    assert generate(m, x, max_new_tokens=3).shape == (1, 10)  # the default takes the module path


def test_packing_refuses_non_fp32():
    m = Transformer(ModelConfig.from_preset("tiny", vocab_size=V)).eval().double()
    with pytest.raises(ValueError, match="packed projections need fp32"):
        generate(m, _prompts(13, B=1), max_new_tokens=2, pack=True)


def test_stop_checks_every_k_steps_cut_at_the_last_stop(model, monkeypatch):
    import model_defs.generate as gen

    x = _prompts(6, B=2)
    free = generate(model, x, max_new_tokens=12)
    stops = [int(free[0, 7 + 2]), int(free[1, 7 + 4])]  # rows stop at different steps, neither at a multiple of 4
    expected = generate(model, x, max_new_tokens=12, stop_token_ids=stops, pad_token_id=-1)
    assert expected.shape[1] < 7 + 12  # every row stopped early
    monkeypatch.setitem(gen.STOP_CHECK_EVERY, "cpu", 4)  # as on an accelerator: syncs every 4th step only
    assert torch.equal(generate(model, x, max_new_tokens=12, stop_token_ids=stops, pad_token_id=-1), expected)
